"""CoOp and CoCoOp against independent recomputations in the reference code's own way.

CoOp's reference builds "X X X X {name}." prompts, swaps the placeholders' token embeddings for the
context (and, for "middle" / "front", concatenates prefix, context halves, class tokens and suffix
with each name's token count) and runs the text transformer; CoCoOp's loops over the images of a
batch, shifting the context by the meta-net output of each normalized image feature. The tests below
do exactly that and compare logits with the methods' vectorized ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vladapt.errors import ConfigError
from vladapt.methods import create_method
from vladapt.methods.base import StepInfo

NAMES = ["red star", "dog", "big_cat", "a striped background"]


def reference_prompts(bb, names, ctx, position="end"):
    """CoOp's PromptLearner: the embeddings of "X .. X {name}." with the context put in CoOp's way
    -> (prompt embeddings [C, L, D], EOT index [C]). ``ctx``: [n, D] or [C, n, D]."""
    m, tok = bb.model, bb.tokenizer
    names = [n.replace("_", " ") for n in names]
    n_ctx = ctx.shape[-2]
    ctx = ctx.unsqueeze(0).expand(len(names), -1, -1) if ctx.ndim == 2 else ctx
    tokenized = tok([" ".join(["X"] * n_ctx) + " " + n + "." for n in names])
    with torch.no_grad():
        embedding = m.token_embedding(tokenized)
    prefix, suffix = embedding[:, :1], embedding[:, 1 + n_ctx:]
    name_lens = [int(tok([n]).argmax(-1)) - 1 for n in names]  # len(_tokenizer.encode(name))
    ctx = ctx.to(embedding.dtype)
    if position == "end":
        prompts = torch.cat([prefix, ctx, suffix], dim=1)
    else:
        half = n_ctx // 2
        rows = []
        for i, k in enumerate(name_lens):
            cls, rest = suffix[i:i + 1, :k], suffix[i:i + 1, k:]
            parts = ([prefix[i:i + 1], ctx[i:i + 1, :half], cls, ctx[i:i + 1, half:], rest] if position == "middle"
                     else [prefix[i:i + 1], cls, ctx[i:i + 1], rest])
            rows.append(torch.cat(parts, dim=1))
        prompts = torch.cat(rows)
    return prompts, tokenized.argmax(dim=-1)


def reference_text(bb, names, ctx, position="end"):
    x, eot = reference_prompts(bb, names, ctx, position)
    return F.normalize(bb.model.encode_text_embeddings(x, eot, truncate=False).float(), dim=-1)


def image_features(bb, images):
    with torch.no_grad():
        return F.normalize(bb.model.encode_image(images).float(), dim=-1)


def coop_reference_logits(bb, names, ctx, images, position="end"):
    return bb.model.logit_scale.exp() * image_features(bb, images) @ reference_text(bb, names, ctx, position).t()


def cocoop_reference_logits(bb, method, names, images):
    """CoCoOp's CustomCLIP.forward: one image at a time, its context shifted by meta_net(normalized feature)."""
    feats = image_features(bb, images)
    rows = []
    for f in feats:
        ctx_i = method.ctx + method.meta_net(f.unsqueeze(0))  # [n, D] + [1, D]
        text = reference_text(bb, names, ctx_i)
        rows.append(bb.model.logit_scale.exp() * f @ text.t())
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------ CoOp
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_coop_logits_equal_coops_placeholder_replacement(tiny, images, position, csc):
    torch.manual_seed(0)
    m = create_method("coop", tiny, NAMES, {"ctx_init": "", "n_ctx": 5, "class_token_position": position, "csc": csc})
    assert m.ctx.shape == ((len(NAMES), 5, 128) if csc else (5, 128))
    with torch.no_grad():
        ref = coop_reference_logits(tiny, NAMES, m.ctx, images, position)
        assert torch.allclose(m(images), ref, atol=1e-5, rtol=1e-5)
    labels = torch.tensor([0, 3, 1])
    out = m.training_step(images, labels, StepInfo.single(labels))
    assert torch.allclose(out.logits.detach(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.loss.detach(), F.cross_entropy(ref, labels), atol=1e-5)


def test_coop_starts_as_zero_shot_clip_with_a_photo_of_a(tiny, images):
    m = create_method("coop", tiny, NAMES)  # the defaults: 4 tokens from "a photo of a", class at the end
    words = tiny.tokenizer("a photo of a")[0]
    assert words.argmax().item() == 5  # [SOT] a photo of a [EOT]
    assert torch.equal(m.ctx.detach(), tiny.model.token_embedding.weight[words[1:5]].float())
    assert torch.equal(m.ctx.detach(), tiny.model.context_from_text(words))
    zs = create_method("zeroshot", tiny, NAMES, {"templates": "a photo of a {}."})
    with torch.no_grad():
        assert torch.allclose(m(images), zs(images), atol=1e-5, rtol=0)
    assert m.num_trainable_parameters() == 4 * 128


def test_coop_gradient_reaches_only_the_context_through_the_frozen_text_encoder(tiny, images):
    m = create_method("coop", tiny, NAMES)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    labels = torch.tensor([0, 1, 2])
    m.training_step(images, labels).loss.backward()
    assert m.ctx.grad is not None and (m.ctx.grad.abs().sum(-1) > 0).all()
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["ctx"]
    assert all(p.grad is None for p in tiny.model.parameters())
    torch.optim.SGD(m.param_groups(), lr=1.0).step()
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in before.items())


def test_coop_new_class_names_reuse_the_context_and_the_cache_follows_the_weights(tiny, images):
    m = create_method("coop", tiny, NAMES[:2], {"ctx_init": "", "n_ctx": 3})
    m.set_classnames(NAMES[2:], split="new")
    with torch.no_grad():
        first = m(images)
        assert torch.allclose(first, coop_reference_logits(tiny, NAMES[2:], m.ctx, images), atol=1e-5)
        m.ctx.add_(torch.randn_like(m.ctx))  # in place, as an optimizer step: the classifier is recomputed
        assert torch.allclose(m(images), coop_reference_logits(tiny, NAMES[2:], m.ctx, images), atol=1e-5)
        assert not torch.allclose(m(images), first)


def test_class_specific_context(tiny, images):
    m = create_method("coop", tiny, NAMES[:2], {"csc": True})  # with ctx_init: every class starts from the words
    assert m.ctx.shape == (2, 4, 128) and torch.equal(m.ctx[0], m.ctx[1])
    assert torch.equal(m.ctx[0].detach(), tiny.model.context_from_text(tiny.tokenizer("a photo of a")))
    m.set_classnames(NAMES[:2], split="base")  # its own classes: fine
    with pytest.raises(ConfigError, match="csc=true.*2 classes.*cannot classify other classes"):
        m.set_classnames(NAMES[2:], split="new")


def test_random_initialization_and_config_errors(tiny):
    torch.manual_seed(3)
    a = create_method("coop", tiny, NAMES, {"ctx_init": "", "n_ctx": 16})
    torch.manual_seed(3)
    b = create_method("coop", tiny, NAMES, {"ctx_init": "", "n_ctx": 16})
    assert a.ctx.shape == (16, 128) and torch.equal(a.ctx, b.ctx)  # seeded by the run's torch seed
    assert 0.015 < float(a.ctx.detach().std()) < 0.025 and abs(float(a.ctx.detach().mean())) < 0.005
    with pytest.raises(ConfigError, match="'a photo of a' gives 4 context tokens but method.n_ctx=8"):
        create_method("coop", tiny, NAMES, {"n_ctx": 8})
    with pytest.raises(ConfigError, match="class_token_position"):
        create_method("coop", tiny, NAMES, {"class_token_position": "start"})
    # underscores in ctx_init become spaces, as in the reference
    c = create_method("coop", tiny, NAMES, {"ctx_init": "a_photo_of_a"})
    assert torch.equal(c.ctx, create_method("coop", tiny, NAMES).ctx)


# ---------------------------------------------------------------------------------------- CoCoOp
@pytest.mark.parametrize("text_batch_size", [256, 5, 2])
def test_cocoop_logits_equal_a_per_image_loop(tiny, images, text_batch_size):
    torch.manual_seed(0)
    m = create_method("cocoop", tiny, NAMES, {"text_batch_size": text_batch_size})
    with torch.no_grad():
        m.ctx.add_(0.01 * torch.randn_like(m.ctx))
        ref = cocoop_reference_logits(tiny, m, NAMES, images)
        # the meta-net output is not zero: every image gets different prompts
        assert not torch.allclose(m.meta_net(image_features(tiny, images[:1])), torch.zeros(1, 128))
        assert torch.allclose(m(images), ref, atol=1e-5, rtol=1e-5)
    labels = torch.tensor([2, 0, 3])
    out = m.training_step(images, labels, StepInfo.single(labels))
    assert torch.allclose(out.logits.detach(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.loss.detach(), F.cross_entropy(ref, labels), atol=1e-5)  # mean over the batch


def test_cocoop_batch_equals_images_one_at_a_time(tiny, images):
    m = create_method("cocoop", tiny, NAMES)
    with torch.no_grad():
        together = m(images)
        alone = torch.cat([m(images[i:i + 1]) for i in range(len(images))])
    assert torch.allclose(together, alone, atol=1e-5, rtol=1e-5)


def test_cocoop_meta_net_and_gradients(tiny, images):
    m = create_method("cocoop", tiny, NAMES)
    # test-tiny: image features of width 64 -> 64 // 16 = 4 hidden units -> text width 128
    assert [tuple(p.shape) for p in m.meta_net.parameters()] == [(4, 64), (4,), (128, 4), (128,)]
    assert m.num_trainable_parameters() == 4 * 128 + (64 * 4 + 4) + (4 * 128 + 128)
    assert set(m.checkpoint_state()) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                         "meta_net.linear2.weight", "meta_net.linear2.bias"}
    labels = torch.tensor([0, 1, 2])
    m.training_step(images, labels).loss.backward()
    assert m.ctx.grad.abs().sum() > 0 and m.meta_net.linear2.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())
    # the untrained model is zero-shot CLIP shifted by the meta-net's bias, not zero-shot CLIP itself
    zs = create_method("zeroshot", tiny, NAMES, {"templates": "a photo of a {}."})
    with torch.no_grad():
        assert not torch.allclose(m(images), zs(images), atol=1e-3)


def test_checkpoint_state_round_trip(tiny, images):
    for name in ("coop", "cocoop"):
        torch.manual_seed(1)
        a = create_method(name, tiny, NAMES, {"ctx_init": "", "n_ctx": 3})
        torch.manual_seed(2)
        b = create_method(name, tiny, NAMES, {"ctx_init": "", "n_ctx": 3})
        with torch.no_grad():
            assert not torch.allclose(a(images), b(images))
            b.load_checkpoint_state(a.checkpoint_state())
            assert torch.equal(a(images), b(images))


@pytest.mark.parametrize("name,csc,expected", [
    ("coop", False, 2_048), ("coop", True, 2 * 2_048), ("cocoop", False, 35_360),
])
def test_trainable_parameters_on_vit_b16(vit_b16, name, csc, expected):
    # CoOp: 4 context vectors x 512; CoCoOp adds Linear(512 -> 32) + Linear(32 -> 512) = 16,416 + 16,896
    m = create_method(name, vit_b16, ["cat", "dog"], {"csc": csc})
    assert m.num_trainable_parameters() == expected
    assert not vit_b16.model.attached_modules()
