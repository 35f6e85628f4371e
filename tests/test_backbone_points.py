"""The compact CLIP equals open_clip's, and each insertion point changes only what it should."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from reference_models import open_clip_tiny
from vladapt.backbones import LINEAR_POINT_KINDS, CLIPConfig, CLIPModel, ForwardContext, InsertionPoint, load_clip
from vladapt.backbones.loader import load_state_dict_into
from vladapt.errors import BackboneError


class AddConst(nn.Module):
    def __init__(self, c: float = 0.5) -> None:
        super().__init__()
        self.c = c

    def forward(self, x, ctx):
        return x + self.c


class Record(nn.Module):
    """A no-op that remembers what it saw: identity, or zeros (of width ``out``) at an additive point."""

    def __init__(self, additive: bool = False, out: int | None = None) -> None:
        super().__init__()
        self.seen = []
        self.additive = additive
        self.out = out

    def forward(self, x, ctx):
        self.seen.append(x.detach().clone())
        return x.new_zeros(*x.shape[:-1], self.out or x.shape[-1]) if self.additive else x


def block_outputs(model: CLIPModel, tower: str, run):
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in model._blocks(tower)]
    try:
        with torch.no_grad():
            final = run()
    finally:
        for h in hooks:
            h.remove()
    return outs, final


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_untouched_backbone_equals_open_clip(images, tokens, quick_gelu):
    oc = open_clip_tiny(seed=11, quick_gelu=quick_gelu)
    cfg = CLIPConfig.from_open_clip("tiny", {"embed_dim": 64, "quick_gelu": quick_gelu,
                                             "vision_cfg": dict(image_size=32, patch_size=8, width=128, layers=2),
                                             "text_cfg": dict(width=128, heads=2, layers=2)})
    ours = CLIPModel(cfg)
    load_state_dict_into(ours, oc.state_dict(), "test")
    with torch.no_grad():
        assert (ours.encode_image(images) - oc.encode_image(images)).abs().max() < 1e-5
        assert (ours.encode_text(tokens) - oc.encode_text(tokens)).abs().max() < 1e-5


def test_vit_b16_architecture_equals_open_clip_and_counts_parameters():
    import open_clip

    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    bb = load_clip("ViT-B-16-quickgelu")
    load_state_dict_into(bb.model, oc.state_dict(), "open_clip ViT-B-16-quickgelu")
    n_ours = sum(p.numel() for p in bb.model.parameters())
    assert n_ours == sum(p.numel() for p in oc.parameters()) == 149_620_737
    assert bb.model.visual.layout.grid == (14, 14) and bb.model.visual.positional_embedding.shape[0] == 197
    img = torch.randn(2, 3, 224, 224)
    tok = bb.tokenizer(["a photo of a gerenuk, a type of antelope.", "a photo of a dog."])
    with torch.no_grad():
        assert (bb.model.encode_image(img) - oc.encode_image(img)).abs().max() < 1e-5
        assert (bb.model.encode_text(tok) - oc.encode_text(tok)).abs().max() < 1e-5


def test_identity_modules_everywhere_change_nothing(tiny, images, tokens):
    m = tiny.model
    with torch.no_grad():
        ref_img, ref_txt = m.encode_image(images), m.encode_text(tokens)
    keys_before = list(m.state_dict())
    params_before = [id(p) for p in m.parameters()]
    additive = ("block", "block_ln1", *LINEAR_POINT_KINDS)
    records = {p.name: Record(additive=p.kind in additive, out=p.width) for p in m.insertion_points()}
    for r in records.values():
        r.tokenwise = True  # each token alone: the image tower's last block may compute the CLS token only
    for p in m.insertion_points():
        m.attach(p, records[p.name])
    try:
        assert list(m.state_dict()) == keys_before  # attached modules are not backbone weights
        assert [id(p) for p in m.parameters()] == params_before
        with torch.no_grad():
            assert torch.equal(m.encode_image(images), ref_img)
            assert torch.equal(m.encode_text(tokens), ref_txt)
        assert all(len(r.seen) == 1 for n, r in records.items() if n.startswith("visual"))
        assert all(len(r.seen) == 1 for n, r in records.items() if n.startswith("text"))
    finally:
        m.detach_all()
    assert m.attached_modules() == {}


@pytest.mark.parametrize("tower", ["visual", "text"])
@pytest.mark.parametrize("kind", ["attn_in", "mlp_hidden", "block", "block_ln1", "block_out"])
def test_each_block_point_changes_only_its_block_onward(tiny, images, tokens, tower, kind):
    m = tiny.model
    other = "text" if tower == "visual" else "visual"
    run = {"visual": lambda: m.encode_image(images), "text": lambda: m.encode_text(tokens)}
    ref_outs, ref_final = block_outputs(m, tower, run[tower])
    _, ref_other = block_outputs(m, other, run[other])
    layer = 1
    point = m.insertion_points(tower=tower, kind=kind, layers=[layer])[0]
    assert (point.tower, point.kind, point.layer) == (tower, kind, layer)
    m.attach(point, AddConst())
    try:
        outs, final = block_outputs(m, tower, run[tower])
        _, other_final = block_outputs(m, other, run[other])
    finally:
        m.detach(point)
    assert torch.equal(outs[0], ref_outs[0])  # blocks before the point are untouched
    assert not torch.allclose(outs[layer], ref_outs[layer])
    assert not torch.allclose(final, ref_final)
    assert torch.equal(other_final, ref_other)  # the other tower is untouched


def test_point_inputs_are_the_documented_tensors(tiny, images):
    m = tiny.model
    blk = m.visual.transformer.resblocks[1]
    seen_in = []
    h = blk.register_forward_pre_hook(lambda mod, args: seen_in.append(args[0].detach().clone()))
    rec_attn, rec_mlp, rec_block = Record(), Record(), Record(additive=True)
    pts = {p.kind: p for p in m.insertion_points(tower="visual", layers=[1])}
    m.attach(pts["attn_in"], rec_attn)
    m.attach(pts["mlp_hidden"], rec_mlp)
    m.attach(pts["block"], rec_block)
    try:
        with torch.no_grad():
            m.encode_image(images)
            x = seen_in[0]
            assert torch.equal(rec_attn.seen[0], blk.ln_1(x))  # attention input = LN1(x)
            assert torch.equal(rec_block.seen[0], x)  # parallel point sees the block input
            y = x + blk.attn(blk.ln_1(x))
            assert torch.equal(rec_mlp.seen[0], blk.mlp.c_fc(blk.ln_2(y)))  # pre-activation hidden
            assert rec_mlp.seen[0].shape[-1] == pts["mlp_hidden"].width == 4 * pts["attn_in"].width
    finally:
        m.detach_all()
        h.remove()


def test_parallel_point_output_is_added_to_block_output(tiny, images):
    m = tiny.model
    blk = m.visual.transformer.resblocks[0]

    class Echo(nn.Module):
        def forward(self, x, ctx):
            return x

    got = []
    h = blk.register_forward_hook(lambda mod, args, out: got.append((args[0].detach(), out.detach())))
    with torch.no_grad():
        m.encode_image(images)
        p = m.insertion_points(tower="visual", kind="block", layers=[0])[0]
        m.attach(p, Echo())
        try:
            m.encode_image(images)
        finally:
            m.detach(p)
    (x0, out0), (x1, out1) = got
    assert torch.equal(x0, x1)
    assert torch.allclose(out1, out0 + x0, atol=1e-6)


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_output_point_sees_the_projected_embedding(tiny, images, tokens, tower):
    m = tiny.model

    class Double(nn.Module):
        def forward(self, x, ctx):
            return 2 * x

    enc = (lambda: m.encode_image(images)) if tower == "visual" else (lambda: m.encode_text(tokens))
    with torch.no_grad():
        ref = enc()
        p = m.insertion_points(tower=tower, kind="output")[0]
        assert p.width == 64
        m.attach(p, Double())
        try:
            assert torch.equal(enc(), 2 * ref)
        finally:
            m.detach(p)


def test_spatial_module_leaves_cls_untouched(tiny, images):
    m = tiny.model
    point = m.insertion_points(tower="visual", kind="attn_in", layers=[0])[0]
    layout = point.layout
    assert layout.num_prefix == 1 and layout.grid == (4, 4)

    class DWConv(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.conv = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
            self.seen = []

        def forward(self, x, ctx):
            prefix, grid = layout.split(x)
            out = layout.merge(prefix, grid + self.conv(grid))
            self.seen.append((x.detach().clone(), out.detach().clone()))
            return out

    mod = DWConv(point.width)
    m.attach(point, mod)
    try:
        with torch.no_grad():
            m.encode_image(images)
    finally:
        m.detach(point)
    x, out = mod.seen[0]
    assert torch.equal(out[:, 0], x[:, 0])  # CLS untouched
    assert not torch.allclose(out[:, 1:], x[:, 1:])


def test_layout_grid_matches_patch_positions(tiny):
    # Token 1 + r*W + c must be the patch at row r, column c of the image.
    m = tiny.model
    img = torch.zeros(1, 3, 32, 32)
    img[..., 8:16, 24:32] = 5.0  # the patch at row 1, column 3
    with torch.no_grad():
        tokens = m.visual.embed(img)
        base = m.visual.embed(torch.zeros(1, 3, 32, 32))
    _, grid = m.visual.layout.split(tokens - base)
    changed = grid.abs().sum(1)[0]
    assert changed.argmax().item() == 1 * 4 + 3
    assert (changed > 1e-6).sum().item() == 1
    prefix, g = m.visual.layout.split(tokens)
    assert torch.equal(m.visual.layout.merge(prefix, g), tokens)


def test_context_scale_is_drawn_once_per_block_and_tower(tiny, images, tokens):
    m = tiny.model
    calls = []

    def scale_fn(tower, layer):
        calls.append((tower, layer))
        return 0.1 * (layer + 1) + (1.0 if tower == "text" else 0.0)

    class UseScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.got = []

        def forward(self, x, ctx):
            self.got.append(ctx.scale(self.point))
            return x

    mods = []
    for p in m.insertion_points(kind="attn_in") + m.insertion_points(kind="mlp_hidden"):
        mod = UseScale()
        mod.point = p
        mods.append(mod)
        m.attach(p, mod)
    ctx = ForwardContext(scale_fn)
    try:
        with torch.no_grad():
            m.encode_image(images, ctx=ctx)
            m.encode_text(tokens, ctx=ctx)
    finally:
        m.detach_all()
    assert sorted(calls) == sorted({(t, l) for t in ("visual", "text") for l in (0, 1)})
    for mod in mods:
        assert mod.got == [pytest.approx(0.1 * (mod.point.layer + 1) + (1.0 if mod.point.tower == "text" else 0.0))]
    assert ForwardContext().scale(mods[0].point) is None


def test_context_collects_aux_losses(tiny, images):
    m = tiny.model

    class Aux(nn.Module):
        def forward(self, x, ctx):
            ctx.add_aux_loss(self.point, x.pow(2).mean())
            return x

    pts = m.insertion_points(tower="visual", kind="block")
    for p in pts:
        a = Aux()
        a.point = p
        m.attach(p, a)
    ctx = ForwardContext()
    try:
        with torch.no_grad():
            m.encode_image(images, ctx=ctx)
    finally:
        m.detach_all()
    assert [p.layer for p, _ in ctx.aux_losses] == [0, 1]
    assert torch.allclose(ctx.total_aux_loss(), ctx.aux_losses[0][1] + ctx.aux_losses[1][1])


def test_attach_errors(tiny):
    m = tiny.model
    p = m.insertion_points(tower="text", kind="attn_in", layers=[0])[0]
    m.attach(p, AddConst())
    try:
        with pytest.raises(BackboneError, match="already has a module"):
            m.attach(p, AddConst())
    finally:
        m.detach(p)
    with pytest.raises(BackboneError, match="no block"):
        m.insertion_points(tower="visual", layers=[7])
    with pytest.raises(BackboneError, match="no insertion point"):
        m.attach(InsertionPoint("visual", "attn_in", 9, 128), AddConst())
    with pytest.raises(BackboneError, match="kind"):
        m.insertion_points(kind="ffn")


def test_wrong_image_size_is_explained(tiny):
    with pytest.raises(BackboneError, match=r"\[B, 3, 32, 32\]"):
        tiny.model.encode_image(torch.zeros(1, 3, 64, 64))


def test_gradients_flow_to_attached_modules_only(tiny, images):
    m = tiny.model
    p = m.insertion_points(tower="visual", kind="attn_in", layers=[1])[0]

    class Lin(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.lin = nn.Linear(w, w)

        def forward(self, x, ctx):
            return x + self.lin(x)

    mod = Lin(p.width)
    m.attach(p, mod)
    try:
        m.encode_image(images).sum().backward()
    finally:
        m.detach(p)
    assert mod.lin.weight.grad is not None and mod.lin.weight.grad.abs().sum() > 0
    assert all(q.grad is None for q in m.parameters())


def test_text_truncation_after_eot_is_exact(tiny, tokens):
    # causal attention: the EOT feature never sees the padding after it, with token-wise modules too
    m = tiny.model
    p = m.insertion_points(tower="text", kind="mlp_hidden", layers=[0])[0]
    with torch.no_grad():
        assert torch.allclose(m.encode_text(tokens), m.encode_text(tokens, truncate=False), atol=1e-5)
        m.attach(p, AddConst(0.3))
        try:
            assert torch.allclose(m.encode_text(tokens), m.encode_text(tokens, truncate=False), atol=1e-5)
        finally:
            m.detach(p)
    seen = []
    h = m.transformer.resblocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        m.encode_text(tokens)
    h.remove()
    assert seen == [int(tokens.argmax(-1).max()) + 1] and seen[0] < tokens.shape[1]


@pytest.mark.parametrize("causal", [False, True])
def test_training_attention_path_equals_the_fused_kernel(causal):
    from vladapt.backbones.model import Attention

    torch.manual_seed(0)
    attn = Attention(64, 2)
    torch.nn.init.normal_(attn.in_proj_weight, std=0.2)
    x = torch.randn(3, 9, 64, requires_grad=True)
    explicit = attn(x, causal=causal)  # grad enabled on the CPU: the explicit path
    with torch.no_grad():
        fused = attn(x, causal=causal)  # scaled_dot_product_attention
    assert torch.allclose(explicit, fused, atol=1e-5)
    explicit.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if causal:  # the first token never sees later ones
        y = x.detach().clone()
        y[:, 1:] += 1.0
        with torch.enable_grad():
            assert torch.allclose(attn(y, causal=True)[:, 0], explicit[:, 0].detach(), atol=1e-6)


# --------------------------------------------------------------------------- CLS-only last block
def _last_block_seen(m: CLIPModel, images, **attrs) -> tuple[Tensor, int]:
    """encode_image with a Record at the last visual block's mlp_hidden: (features, tokens it saw)."""
    point = m.insertion_points("visual", "mlp_hidden", [m.num_layers("visual") - 1])[0]
    rec = Record()
    for k, v in attrs.items():
        setattr(rec, k, v)
    m.attach(point, rec)
    try:
        with torch.no_grad():
            return m.encode_image(images), rec.seen[0].shape[1]
    finally:
        m.detach(point)


def test_last_image_block_computes_only_the_cls_token_when_its_modules_allow(tiny, images):
    m = tiny.model
    n_tokens = 1 + m.visual.layout.grid[0] * m.visual.layout.grid[1]
    full, seen = _last_block_seen(m, images)  # a module that declares nothing: every token is computed
    assert seen == n_tokens
    for attrs in ({"tokenwise": True}, {"prefix_passthrough": True}):
        pruned, seen = _last_block_seen(m, images, **attrs)
        assert seen == 1
        assert pruned.shape == full.shape
        torch.testing.assert_close(pruned, full, rtol=0, atol=2e-6)  # the same function, other matmul shapes
    point = m.insertion_points("visual", "mlp_hidden", [m.num_layers("visual") - 1])[0]
    rec = Record()
    rec.tokenwise = True
    m.attach(point, rec)
    try:  # a pass that asks for every token (a frozen reference of a full pass) gets them
        with torch.no_grad():
            for wanted, tokens in ((False, n_tokens), (True, 1)):
                ctx = ForwardContext()
                ctx.cls_only_tail = wanted
                m.encode_image(images, ctx)
                assert ctx.used_cls_only_tail is wanted and rec.seen[-1].shape[1] == tokens
    finally:
        m.detach(point)
    with torch.no_grad():  # nothing attached: the CLS-only tail, equal to the full computation
        x = m.visual.embed(images)
        ctx = ForwardContext()
        everything = m.visual.transformer(x, ctx)
        tail = m.visual.transformer(x, ctx, keep=1)
    assert tail.shape[1] == 1 and everything.shape[1] == n_tokens
    torch.testing.assert_close(tail, everything[:, :1], rtol=0, atol=2e-6)


def test_text_attention_refuses_a_query_subset(tiny):
    blk = tiny.model.transformer.resblocks[0]
    with pytest.raises(BackboneError, match="non-causal"):
        blk.attn(torch.randn(1, 5, tiny.model.cfg.text.width), causal=True, queries=1)


def test_quick_gelu_saves_only_its_input_and_has_the_expressions_gradient():
    from vladapt.backbones.model import QuickGELU

    x = (torch.randn(16, 64) * 3).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    y, y_ref = QuickGELU()(x), ref * torch.sigmoid(1.702 * ref)
    assert torch.equal(y, y_ref)  # the same forward values
    assert len(y.grad_fn.saved_tensors) == 1  # x only (autograd through the expression keeps x and the sigmoid)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-6)
    xd = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: QuickGELU()(t), (xd,))
