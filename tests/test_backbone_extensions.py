"""Learnable text context (CoOp) and weight-delta (LoRA) points on the linear maps of a block."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vladapt.backbones import LINEAR_POINT_KINDS, CLIPConfig, CLIPModel, ForwardContext, InsertionPoint
from vladapt.backbones.model import Attention, Block, _causal_mask
from vladapt.errors import BackboneError


def randn(*shape, seed=0, std=0.02):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# ------------------------------------------------------------------------------ learned text context
def test_end_position_equals_coop_placeholder_replacement(tiny):
    # CoOp builds "X X X X {name}." and swaps the placeholders' embeddings for the context vectors.
    m, tok = tiny.model, tiny.tokenizer
    ctx = randn(4, 128)
    names = ["red star.", "dog.", "a striped background."]
    placeholder = tok(["X X X X " + n for n in names])
    ref = m.embed_text(placeholder).clone()
    ref[:, 1:5] = ctx
    ref_eot = placeholder.argmax(-1)
    x, eot = m.context_prompt_embeddings(tok(names), ctx)
    assert torch.equal(x, ref) and torch.equal(eot, ref_eot)
    with torch.no_grad():
        ours = m.encode_text_with_context(tok(names), ctx)
        assert torch.equal(ours, m.encode_text_embeddings(ref, ref_eot))
        assert torch.equal(m.encode_text_with_context(tok(names), ctx, normalize=True), F.normalize(ours, dim=-1))


def test_context_initialized_from_words_equals_the_written_prompt(tiny):
    m, tok = tiny.model, tiny.tokenizer
    ctx = m.context_from_text(tok("a photo of a"))
    assert ctx.shape == (4, 128) and not ctx.requires_grad
    assert torch.equal(ctx, m.context_from_text(tok("a photo of a")[0]))
    with torch.no_grad():
        got = m.encode_text_with_context(tok(["red star.", "dog."]), ctx)
        assert torch.equal(got, m.encode_text(tok(["a photo of a red star.", "a photo of a dog."])))
    with pytest.raises(BackboneError, match="no tokens"):
        m.context_from_text(tok(""))
    with pytest.raises(BackboneError, match="one text"):
        m.context_from_text(tok(["a", "b"]))


def test_gradient_reaches_shared_and_class_specific_context_only(tiny):
    m, tok = tiny.model, tiny.tokenizer
    tokens = tok(["red star.", "dog."])
    shared = nn.Parameter(randn(4, 128))
    m.encode_text_with_context(tokens, shared).sum().backward()
    assert shared.grad is not None and (shared.grad.abs().sum(-1) > 0).all()
    specific = nn.Parameter(torch.stack([randn(4, 128, seed=1), randn(4, 128, seed=2)]))
    feats = m.encode_text_with_context(tokens, specific)
    feats[0].sum().backward()
    assert specific.grad[0].abs().sum() > 0 and torch.equal(specific.grad[1], torch.zeros(4, 128))
    assert all(p.grad is None for p in m.parameters())
    with torch.no_grad():  # class i is prompted with its own context
        alone = m.encode_text_with_context(tokens[1:], specific[1])
    assert torch.allclose(feats[1], alone[0], atol=1e-6)


@pytest.mark.parametrize("n_ctx", [4, 3])
def test_front_and_middle_equal_hand_built_sequences(tiny, n_ctx):
    m, tok = tiny.model, tiny.tokenizer
    tokens = tok(["red star.", "dog."])  # names of 2 and 1 tokens
    ctx = randn(2, n_ctx, 128)
    e = m.embed_text(tokens)
    half = n_ctx // 2
    for position, build in {
        "front": lambda i, k: [e[i, :1 + k], ctx[i], e[i, 1 + k:]],
        "middle": lambda i, k: [e[i, :1], ctx[i, :half], e[i, 1:1 + k], ctx[i, half:], e[i, 1 + k:]],
    }.items():
        x, eot = m.context_prompt_embeddings(tokens, ctx, position)
        ref = torch.stack([torch.cat(build(i, k))[:77] for i, k in enumerate([2, 1])])
        assert torch.equal(x, ref), position
        assert eot.tolist() == [4 + n_ctx, 3 + n_ctx]
    # a prompt without the closing "." names its length explicitly
    bare = tok(["red star"])
    x, eot = m.context_prompt_embeddings(bare, ctx[0], "front", name_lengths=[2])
    eb = m.embed_text(bare)[0]
    assert torch.equal(x[0], torch.cat([eb[:3], ctx[0], eb[3:]])[:77]) and eot.tolist() == [3 + n_ctx]


def test_prompt_that_no_longer_fits_is_an_error(tiny):
    m, tok = tiny.model, tiny.tokenizer
    tokens = tok(["dog.", " ".join(["star"] * 70) + ".", " ".join(["star"] * 71) + "."])
    assert tokens.argmax(-1).tolist() == [3, 72, 73]
    x, eot = m.context_prompt_embeddings(tokens[:2], randn(4, 128))  # EOT lands in the last slot
    assert eot.tolist() == [7, 76] and torch.equal(x[1, 76], m.embed_text(tokens[1:2, 72])[0])
    with pytest.raises(BackboneError, match=r"class 2 \(EOT at position 73\) needs 78 positions.*context length 77"):
        m.context_prompt_embeddings(tokens, randn(4, 128))
    with pytest.raises(BackboneError, match=r"class 1 .*also classes \[2\]"):
        m.encode_text_with_context(tokens, randn(5, 128), class_position="front")


def test_context_argument_errors(tiny):
    m, tok = tiny.model, tiny.tokenizer
    tokens = tok(["red star.", "dog."])
    with pytest.raises(BackboneError, match=r"\[n_ctx, 128\]"):
        m.context_prompt_embeddings(tokens, randn(4, 64))
    with pytest.raises(BackboneError, match="for 2 prompts"):
        m.context_prompt_embeddings(tokens, randn(3, 4, 128))
    with pytest.raises(BackboneError, match="class_position"):
        m.context_prompt_embeddings(tokens, randn(4, 128), "start")
    with pytest.raises(BackboneError, match=r"class 1"):
        m.context_prompt_embeddings(tokens, randn(4, 128), "middle", name_lengths=[2, 3])
    with pytest.raises(BackboneError, match="name_lengths"):
        m.context_prompt_embeddings(tokens, randn(4, 128), "front", name_lengths=[2])
    with pytest.raises(BackboneError, match=r"\[C, 77\]"):
        m.context_prompt_embeddings(tokens[:, :10], randn(4, 128))


# ------------------------------------------------------------------------------- linear-map points
class Delta(nn.Module):
    """``x @ W^T``: the delta of changing a linear map's weight by ``W``."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)
        self.seen = []

    def forward(self, x, ctx):
        self.seen.append(x.detach().clone())
        return x @ self.w.T


def weight_slice(blk, kind):
    d = blk.ln_1.normalized_shape[0]
    return {
        "attn_q": blk.attn.in_proj_weight[:d], "attn_k": blk.attn.in_proj_weight[d:2 * d],
        "attn_v": blk.attn.in_proj_weight[2 * d:], "attn_out": blk.attn.out_proj.weight,
        "mlp_fc": blk.mlp.c_fc.weight, "mlp_proj": blk.mlp.c_proj.weight,
    }[kind]


@contextlib.contextmanager
def weight_added(blk, kind, w):
    target = weight_slice(blk, kind)
    saved = target.detach().clone()
    with torch.no_grad():
        target.add_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            target.copy_(saved)


@pytest.mark.parametrize("tower", ["visual", "text"])
@pytest.mark.parametrize("kind", LINEAR_POINT_KINDS)
def test_delta_equals_the_changed_weight(tiny, images, tokens, tower, kind):
    m = tiny.model
    run = (lambda: m.encode_image(images)) if tower == "visual" else (lambda: m.encode_text(tokens))
    point = m.insertion_points(tower=tower, kind=kind, layers=[1])[0]
    blk = m._blocks(tower)[1]
    w = randn(point.width, point.in_width, seed=3, std=0.1)
    assert weight_slice(blk, kind).shape == w.shape
    for grad in (False, True):  # the SDPA path and the explicit-softmax training path
        with torch.set_grad_enabled(grad):
            base = run().detach()
            with weight_added(blk, kind, w):
                ref = run().detach()
            mod = Delta(w)
            m.attach(point, mod)
            try:
                got = run().detach()
            finally:
                m.detach(point)
        assert (got - ref).abs().max() < 1e-5, (grad, (got - ref).abs().max())
        assert (got - base).abs().max() > 1e-3
        assert mod.seen[0].shape[-1] == point.in_width


def test_linear_points_see_the_documented_inputs(tiny, images):
    m = tiny.model
    blk = m.visual.transformer.resblocks[0]
    seen_in = []
    hook = blk.register_forward_pre_hook(lambda mod, args: seen_in.append(args[0].detach().clone()))
    pts = {p.kind: p for p in m.insertion_points(tower="visual", layers=[0])}

    class Shift(nn.Module):
        def forward(self, x, ctx):
            return x + 0.5

    zero = {k: Delta(torch.zeros(pts[k].width, pts[k].in_width)) for k in LINEAR_POINT_KINDS}
    m.attach(pts["attn_in"], Shift())
    for k, mod in zero.items():
        m.attach(pts[k], mod)
    try:
        with torch.no_grad():
            m.encode_image(images)
            x = seen_in[0]
            h = blk.ln_1(x) + 0.5  # after the attn_in module
            for k in ("attn_q", "attn_k", "attn_v"):
                assert torch.equal(zero[k].seen[0], h)
            y = x + blk.attn(h)
            q, k_, v = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
            heads = lambda t: t.unflatten(-1, (blk.attn.heads, -1)).transpose(1, 2)  # noqa: E731
            merged = F.scaled_dot_product_attention(heads(q), heads(k_), heads(v)).transpose(1, 2).flatten(2)
            assert torch.allclose(zero["attn_out"].seen[0], merged, atol=1e-6)
            assert torch.equal(zero["mlp_fc"].seen[0], blk.ln_2(y))
            assert torch.equal(zero["mlp_proj"].seen[0], blk.act(blk.mlp.c_fc(blk.ln_2(y))))
    finally:
        m.detach_all()
        hook.remove()


def test_gradients_reach_only_the_attached_delta_modules(tiny, images, tokens):
    m = tiny.model

    class LoRA(nn.Module):
        def __init__(self, point, r=2):
            super().__init__()
            self.down = nn.Linear(point.in_width, r, bias=False)
            self.up = nn.Linear(r, point.width, bias=False)
            nn.init.normal_(self.up.weight, std=0.1)

        def forward(self, x, ctx):
            return self.up(self.down(x))

    mods = {}
    for tower, kind in (("visual", "attn_v"), ("visual", "mlp_proj"), ("text", "attn_q"), ("text", "mlp_fc")):
        p = m.insertion_points(tower=tower, kind=kind, layers=[1])[0]
        mods[p.name] = LoRA(p)
        m.attach(p, mods[p.name])
    try:
        (m.encode_image(images).sum() + m.encode_text(tokens).sum()).backward()
    finally:
        m.detach_all()
    for mod in mods.values():
        assert mod.down.weight.grad.abs().sum() > 0 and mod.up.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


def test_linear_points_are_listed_with_their_widths():
    import open_clip

    cfg = CLIPConfig.from_open_clip("ViT-B-16-quickgelu", open_clip.get_model_config("ViT-B-16-quickgelu"))
    with torch.device("meta"):  # ViT-B/16's shapes without allocating its weights
        m = CLIPModel(cfg)
    expect = {  # kind: (visual in, visual out, text in, text out)
        "attn_q": (768, 768, 512, 512), "attn_k": (768, 768, 512, 512), "attn_v": (768, 768, 512, 512),
        "attn_out": (768, 768, 512, 512), "mlp_fc": (768, 3072, 512, 2048), "mlp_proj": (3072, 768, 2048, 512),
    }
    for kind, (vi, vo, ti, to) in expect.items():
        pts = m.insertion_points(kind=kind)
        assert [(p.tower, p.layer) for p in pts] == [(t, i) for t in ("visual", "text") for i in range(12)]
        assert {(p.tower, p.in_width, p.width) for p in pts} == {("visual", vi, vo), ("text", ti, to)}
        assert pts[0].name == f"visual.blocks.0.{kind}"
    assert all(p.in_width == p.width for p in m.insertion_points() if p.kind not in ("mlp_fc", "mlp_proj"))
    assert InsertionPoint("visual", "attn_in", 0, 768).in_width == 768


def test_linear_point_attach_errors(tiny):
    m = tiny.model
    p = m.insertion_points(tower="visual", kind="attn_k", layers=[0])[0]
    mod = Delta(torch.zeros(128, 128))
    m.attach(p, mod)
    try:
        assert m.attached_modules() == {"visual.blocks.0.attn_k": mod}
        with pytest.raises(BackboneError, match="already has a module"):
            m.attach(p, Delta(torch.zeros(128, 128)))
    finally:
        assert m.detach(p) is mod
    assert m.detach(p) is None
    with pytest.raises(BackboneError, match="no insertion point"):
        m.attach(InsertionPoint("visual", "mlp_fc", 9, 512, in_width=128), mod)
    with pytest.raises(BackboneError, match="no insertion point"):
        m.attach(InsertionPoint("visual", "attn_q", None, 128), mod)


# ---------------------------------------------------- nothing attached: the previous forward, bit for bit
def previous_attention_forward(self, x, causal=False, attached=None, ctx=None):
    # Attention.forward before the linear-map points (the fused q/k/v path, both kernels).
    b, n, d = x.shape
    qkv = F.linear(x.contiguous(), self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
    if x.device.type == "cpu" and torch.is_grad_enabled() and n <= 256:
        scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
        if causal:
            scores = scores.masked_fill(_causal_mask(n, x.device), float("-inf"))
        out = scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


def previous_block_forward(self, x, ctx):
    # Block.forward before the linear-map points.
    attached = self.attached
    h = self.ln_1(x)
    parallel = attached["block_ln1"](h, ctx) if "block_ln1" in attached else None
    if "attn_in" in attached:
        h = attached["attn_in"](h, ctx).to(h.dtype)
    y = x + previous_attention_forward(self.attn, h, causal=self.causal)
    u = self.mlp.c_fc(self.ln_2(y))
    if "mlp_hidden" in attached:
        u = attached["mlp_hidden"](u, ctx).to(u.dtype)
    y = y + self.mlp.c_proj(self.act(u))
    if "block" in attached:
        y = y + attached["block"](x, ctx).to(y.dtype)
    if parallel is not None:
        y = y + parallel.to(y.dtype)
    if "block_out" in attached:
        y = attached["block_out"](y, ctx).to(y.dtype)
    return y


@pytest.mark.parametrize("adapters", [False, True])
def test_outputs_are_bit_identical_to_the_previous_forward(tiny, images, tokens, monkeypatch, adapters):
    # HeBA-like modules at attn_in / mlp_hidden (the points it uses) must see and give the same bits.
    m = tiny.model

    class Affine(nn.Module):
        def __init__(self, width, seed):
            super().__init__()
            self.lin = nn.Linear(width, width)
            nn.init.normal_(self.lin.weight, std=0.05, generator=torch.Generator().manual_seed(seed))

        def forward(self, x, ctx):
            return x + self.lin(x)

    if adapters:
        for i, p in enumerate(m.insertion_points(kind="attn_in") + m.insertion_points(kind="mlp_hidden")):
            m.attach(p, Affine(p.width, i))
    try:
        def run():
            outs = []
            for grad in (False, True):  # SDPA, then the explicit-softmax training path
                # every token through the last image block, as the previous forward computed it (the
                # CLS-only tail is checked against the full block in test_backbone_points.py)
                ctx = ForwardContext()
                ctx.cls_only_tail = False
                with torch.set_grad_enabled(grad):
                    outs += [m.encode_image(images, ctx).detach(), m.encode_text(tokens).detach()]
            return outs

        new = run()
        monkeypatch.setattr(Block, "forward", previous_block_forward)
        monkeypatch.setattr(Attention, "forward", previous_attention_forward)
        old = run()
    finally:
        monkeypatch.undo()
        m.detach_all()
    assert all(torch.equal(a, b) for a, b in zip(new, old))
