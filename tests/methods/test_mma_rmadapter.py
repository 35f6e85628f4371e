"""MMA and RMAdapter: parameter counts, the training step against an independent forward, RMAdapter's loss terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vladapt.backbones import ForwardContext
from vladapt.methods import create_method
from vladapt.methods.base import StepInfo

NAMES = ["cat", "dog", "red star", "blue ring", "green cross"]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 2, 2, 4])


def manual_features(m, images, tokens, scale, with_branch=True):
    """Adapted features by an independent forward: the backbone's blocks with nothing attached, plus
    ``scale * up(relu(shared(relu(down(LN1(x))))))`` added to each adapted block's output."""
    clip = m.clip
    assert clip.attached_modules() == {}

    def run(blocks, x, tower):
        for i, blk in enumerate(blocks):
            out = blk(x, ForwardContext())
            key = f"{tower}_blocks_{i}_block_ln1"
            if with_branch and key in m.adapters:
                a = m.adapters[key]
                h = blk.ln_1(x)
                out = out + scale * a.up(F.relu(m.shared[str(i)](F.relu(a.down(h)))))
            x = out
        return x

    v = clip.visual
    x = run(v.transformer.resblocks, v.embed(images), "visual")
    image = v.ln_post(x[:, 0]) @ v.proj
    eot = tokens.argmax(-1)
    t = clip.token_embedding(tokens) + clip.positional_embedding
    t = run(clip.transformer.resblocks, t, "text")
    text = clip.ln_final(t[torch.arange(len(t)), eot]) @ clip.text_projection
    return image, text


def test_vit_b16_parameter_counts(vit_b16):
    bb = vit_b16
    mma = create_method("mma", bb, ["a", "b"])
    assert mma.num_trainable_parameters() == 674_560  # METHODS.md §4.6
    rma = create_method("rmadapter", bb, ["a", "b"])
    assert rma.num_trainable_parameters() == 674_560 + 354_816  # MMA + METHODS.md §2.6's reconstruction branches
    assert sorted({k.split(".")[1] for k in mma.checkpoint_state() if k.startswith("adapters.")}) == sorted(
        f"{t}_blocks_{i}_block_ln1" for t in ("visual", "text") for i in range(4, 12))
    assert all(not p.requires_grad for p in bb.model.parameters()) and bb.model.attached_modules() == {}


def test_the_shared_layer_is_one_module_per_depth_for_both_towers(tiny):
    m = create_method("mma", tiny, NAMES, {"adapter_start": 1})
    for i in range(2):
        assert m.adapters[f"visual_blocks_{i}_block_ln1"].shared is m.shared[str(i)]
        assert m.adapters[f"text_blocks_{i}_block_ln1"].shared is m.shared[str(i)]
    keys = list(m.checkpoint_state())
    assert len(keys) == len(set(keys)) and sum(k.startswith("shared.") for k in keys) == 2 * 2
    no_share = create_method("mma", tiny, NAMES, {"adapter_start": 1, "shared": False})
    assert m.num_trainable_parameters() - no_share.num_trainable_parameters() == 2 * (32 * 32 + 32)


def test_mma_training_step_equals_an_independent_forward(tiny, batch):
    images, labels = batch
    torch.manual_seed(0)
    m = create_method("mma", tiny, NAMES, {"adapter_start": 1, "scale": 0.01})
    m.train()
    out = m.training_step(images, labels, StepInfo.single(labels))
    assert out.logits.shape == (4, len(NAMES))  # all classes every step (no negative sampling)
    tokens = tiny.tokenizer([f"a photo of a {c}." for c in NAMES])
    image, text = manual_features(m, images, tokens, 0.01)
    cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    expected = tiny.model.logit_scale.exp() * cos
    assert torch.allclose(out.logits, expected, atol=1e-4)
    assert torch.allclose(out.loss, F.cross_entropy(expected, labels), atol=1e-5)
    # the gradient-scale layers: the branch output receives the upstream gradient unscaled, so its
    # parameter gradients are those of the plain ``s * branch`` divided by s (lr and scale decoupled)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    image, text = manual_features(m, images, tokens, 0.01)
    logits = tiny.model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    F.cross_entropy(logits, labels).backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[n], p.grad / 0.01, rtol=1e-3, atol=1e-6), n
    assert any(got[n].abs().sum() > 0 for n in got if n.startswith("shared."))


def test_scale_zero_is_zero_shot_clip(tiny, images):
    mma = create_method("mma", tiny, NAMES, {"adapter_start": 1, "scale": 0.0}).eval()
    zs = create_method("zeroshot", tiny, NAMES, {"templates": "a photo of a {}."})
    with torch.no_grad():
        assert torch.equal(mma(images), zs(images))


def rmadapter(tiny, **cfg):
    torch.manual_seed(0)
    return create_method("rmadapter", tiny, NAMES, {"adapter_start": 1, "scale": 0.01, **cfg}).train()


OFF = dict(rec_visual_weight=0.0, rec_text_weight=0.0, con_image_weight=0.0, con_text_weight=0.0)


def test_rmadapter_without_its_terms_is_mma(tiny, batch):
    images, labels = batch
    rma = rmadapter(tiny, **OFF)
    mma = create_method("mma", tiny, NAMES, {"adapter_start": 1, "scale": 0.01})
    mma.load_state_dict({k: v for k, v in rma.state_dict().items() if k in mma.state_dict()})
    a = rma.training_step(images, labels, StepInfo.single(labels))
    b = mma.train().training_step(images, labels, StepInfo.single(labels))
    assert torch.equal(a.loss, b.loss) and a.extras is None and a.context.aux_losses == []


@pytest.mark.parametrize("off", ["rec_visual", "rec_text", "con_image", "con_text"])
def test_each_term_switched_off_contributes_exactly_zero(tiny, batch, off):
    images, labels = batch
    full = rmadapter(tiny).training_step(images, labels, StepInfo.single(labels))
    assert set(full.extras) == {"ce", "rec_visual", "rec_text", "con_image", "con_text"}
    assert all(v > 0 for v in full.extras.values())
    part = rmadapter(tiny, **{f"{off}_weight": 0.0}).training_step(images, labels, StepInfo.single(labels))
    assert off not in part.extras
    # rel 1e-5: without the visual reconstruction loss the image tower's last block computes only the
    # CLS token (Block.keeps_prefix), which changes the last bits of the image features
    assert part.extras == pytest.approx({k: v for k, v in full.extras.items() if k != off}, rel=1e-5)
    assert float(part.loss.detach()) == pytest.approx(sum(part.extras.values()), rel=1e-6)


def test_consistency_is_zero_for_an_unadapted_model(tiny, batch):
    images, labels = batch
    out = rmadapter(tiny, scale=0.0).training_step(images, labels, StepInfo.single(labels))
    assert out.extras["con_image"] == 0.0 and out.extras["con_text"] == 0.0


def test_loss_terms_equal_an_independent_computation(tiny, batch):
    images, labels = batch
    m = rmadapter(tiny)
    out = m.training_step(images, labels, StepInfo.single(labels))
    clip = tiny.model
    tokens = tiny.tokenizer([f"a photo of a {c}." for c in NAMES])
    with torch.no_grad():
        image, text = manual_features(m, images, tokens, 0.01)
        frozen_i, frozen_t = clip.encode_image(images), clip.encode_text(tokens)
        con_i = 10.0 * (F.normalize(image, dim=-1) - F.normalize(frozen_i, dim=-1)).abs().mean()
        con_t = 25.0 * (F.normalize(text, dim=-1) - F.normalize(frozen_t, dim=-1)).abs().mean()
        # reconstruction of each adapted block's LN1 input, from an unadapted-then-adapted forward
        rec = {"visual": 0.0, "text": 0.0}
        x = clip.visual.embed(images)
        seqs = {"visual": x, "text": clip.token_embedding(tokens) + clip.positional_embedding}
        for tower, blocks in (("visual", clip.visual.transformer.resblocks), ("text", clip.transformer.resblocks)):
            x = seqs[tower]
            for i, blk in enumerate(blocks):
                a = m.adapters[f"{tower}_blocks_{i}_block_ln1"]
                h = blk.ln_1(x)
                r = a.up2(F.relu(a.up1(F.relu(a.down(h)))))
                err = ((r - h) ** 2).mean(-1)
                if tower == "text":  # over each prompt's tokens up to its EOT (not the padding)
                    err = err[torch.arange(77)[None] <= tokens.argmax(-1)[:, None]]
                rec[tower] += err.mean()
                x = blk(x, ForwardContext()) + 0.01 * a.up(F.relu(m.shared[str(i)](F.relu(a.down(h)))))
    assert out.extras["con_image"] == pytest.approx(float(con_i), rel=1e-4)
    assert out.extras["con_text"] == pytest.approx(float(con_t), rel=1e-4)
    assert out.extras["rec_visual"] == pytest.approx(float(rec["visual"]), rel=1e-4)
    assert out.extras["rec_text"] == pytest.approx(float(rec["text"]), rel=1e-4)


@pytest.mark.parametrize("reconstruct", ["input", "output"])
def test_a_reconstruction_loss_reaches_only_its_own_layer(tiny, batch, reconstruct):
    images, labels = batch
    m = rmadapter(tiny, reconstruct=reconstruct)
    out = m.training_step(images, labels, StepInfo.single(labels))
    assert len(out.context.aux_losses) == 4  # 2 blocks x 2 towers
    point, loss = out.context.aux_losses[1]
    loss.backward()
    own = f"adapters.{point.tower}_blocks_{point.layer}_block_ln1."
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        reached = p.grad is not None and p.grad.abs().sum() > 0
        expected = name.startswith(own) and name[len(own):].split(".")[0] in ("down", "up1", "up2")
        assert reached == expected, name


def test_output_reconstruction_reconstructs_the_block_output(tiny, batch):
    images, labels = batch
    m = rmadapter(tiny, reconstruct="output", con_image_weight=0.0, con_text_weight=0.0, rec_text_weight=0.0)
    outputs = []
    blk = tiny.model.visual.transformer.resblocks[0]
    handle = blk.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach()))
    try:
        out = m.training_step(images, labels, StepInfo.single(labels))
    finally:
        handle.remove()
    a = m.adapters["visual_blocks_0_block_ln1"]
    y = outputs[0]
    expected = ((a.up2(F.relu(a.up1(F.relu(a.down(y))))) - y) ** 2).mean()
    point, loss = out.context.aux_losses[0]
    assert (point.tower, point.layer) == ("visual", 0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
