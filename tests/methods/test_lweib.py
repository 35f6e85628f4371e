"""LwEIB (METHODS.md §4.9, §1.12): parameter count, the training step against an independent forward,
slow/fast scales, negative sampling, evaluation and checkpoints.

The independent forward runs the backbone's blocks by hand with nothing attached and adds each
adapter's branch where LwEIB puts it (attention input, MLP hidden pre-activation), the depthwise
convolution written out as a sum of shifted copies: visual on the row-major patch grid with the CLS
token left alone, text along all context positions, zero-padded on both sides.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vladapt.config import from_mapping
from vladapt.data import load_custom
from vladapt.engine.checkpoint import load_checkpoint
from vladapt.engine.runconfig import resolve_run_config
from vladapt.engine.train import TrainConfig, fit
from vladapt.errors import ConfigError
from vladapt.methods import create_method
from vladapt.methods.base import StepInfo
from vladapt.methods.lweib import LwEIBConfig

NAMES = [f"class {chr(ord('a') + i)}" for i in range(20)]
DESCRIPTIONS = {c: [f"{c} has feature {k}.", f"the {k}th look of a {c}", f"a {c} seen from side {k}"]
                for k, c in enumerate(NAMES)}


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _step(labels: list[int], seed: int, batch_size: int | None = None) -> StepInfo:
    y = torch.tensor(labels)
    return StepInfo(epoch=0, step=0, generator=torch.Generator().manual_seed(seed), global_labels=y,
                    local=slice(0, len(labels)), batch_size=batch_size or len(labels))


def _blocks(tiny) -> set[tuple[str, int]]:
    return {(t, layer) for t in ("visual", "text") for layer in range(tiny.model.num_layers(t))}


@pytest.fixture
def bank(tmp_path):
    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps(DESCRIPTIONS))
    return str(path)


# --------------------------------------------------------------------------- the independent forward
def shifted_sum_1d(h: torch.Tensor, w: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """``y[t] = sum_j w[:, 0, j] * h[t + j - c]`` (zeros outside), ``c = k // 2`` or ``k - 1`` (causal)."""
    k, length = w.shape[-1], h.shape[1]
    c = k - 1 if causal else k // 2
    padded = F.pad(h, (0, 0, c, k - 1 - c))
    return sum(w[:, 0, j] * padded[:, j : j + length] for j in range(k))


def shifted_sum_2d(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``g [B, H, W, D]``: ``y[i, j] = sum_{a,b} w[:, 0, a, b] * g[i + a - c, j + b - c]`` (zeros outside)."""
    k, (hh, ww) = w.shape[-1], g.shape[1:3]
    c = k // 2
    padded = F.pad(g, (0, 0, c, c, c, c))
    return sum(w[:, 0, a, b] * padded[:, a : a + hh, b : b + ww] for a in range(k) for b in range(k))


def branch_delta(m, key: str, h: torch.Tensor, tower: str) -> torch.Tensor:
    w = m.adapters[key].branch.conv.weight
    if tower == "text":
        return shifted_sum_1d(h, w, causal=m.config.text_conv == "causal")
    gh, gw = m.clip.visual.cfg.grid
    patches = h[:, 1:].reshape(len(h), gh, gw, -1)  # row-major grid, as the patch embedding flattens it
    delta = shifted_sum_2d(patches, w).reshape(len(h), gh * gw, -1)
    return torch.cat([torch.zeros_like(h[:, :1]), delta], dim=1)  # CLS: no adapter


def manual_features(m, images, tokens, scales):
    """Adapted (image, text) features with nothing attached: each block written out, ``s * DWConv(.)``
    added to LN1(x) and to the MLP pre-activation at the per-(tower, block) scale ``scales``."""
    clip = m.clip
    assert clip.attached_modules() == {}

    def run(blocks, x, tower):
        for i, blk in enumerate(blocks):
            s = scales[(tower, i)]
            h = blk.ln_1(x)
            if f"{tower}_blocks_{i}_attn_in" in m.adapters:
                h = h + s * branch_delta(m, f"{tower}_blocks_{i}_attn_in", h, tower)
            x = x + blk.attn(h, causal=tower == "text")
            u = blk.mlp.c_fc(blk.ln_2(x))
            if f"{tower}_blocks_{i}_mlp_hidden" in m.adapters:
                u = u + s * branch_delta(m, f"{tower}_blocks_{i}_mlp_hidden", u, tower)
            x = x + blk.mlp.c_proj(blk.act(u))
        return x

    v = clip.visual
    x = run(v.transformer.resblocks, v.embed(images), "visual")
    image = v.ln_post(x[:, 0]) @ v.proj
    t = clip.token_embedding(tokens) + clip.positional_embedding  # the whole context, padding included
    t = run(clip.transformer.resblocks, t, "text")
    text = clip.ln_final(t[torch.arange(len(t)), tokens.argmax(-1)]) @ clip.text_projection
    return image, text


def manual_logits(m, tiny, images, prompts, scales):
    tokens = tiny.tokenizer(prompts)
    image, text = manual_features(m, images, tokens, scales)
    return tiny.model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def match_columns(step_logits: torch.Tensor, full: torch.Tensor, tol: float) -> list[int]:
    """For each column of the step's logits, the one reference column it equals."""
    ids = []
    for k in range(step_logits.shape[1]):
        diff = (full - step_logits[:, k : k + 1]).abs().amax(0)
        hits = (diff < tol).nonzero().flatten().tolist()
        assert len(hits) == 1, f"column {k} matches {hits} (closest diff {diff.min().item():.3g})"
        ids.append(hits[0])
    return ids


# --------------------------------------------------------------------------- parameters and config
def test_vit_b16_has_506_880_trainable_parameters(vit_b16):
    m = create_method("lweib", vit_b16, ["gerenuk", "okapi"])
    assert m.num_trainable_parameters() == 506_880  # 12 * (9 * (768 + 3072) + 3 * (512 + 2048)), METHODS.md §1.11
    shapes = {k: tuple(v.shape) for k, v in m.checkpoint_state().items()}
    expected = {}
    for i in range(12):
        expected[f"adapters.visual_blocks_{i}_attn_in.residual.branch.conv.weight"] = (768, 1, 3, 3)
        expected[f"adapters.visual_blocks_{i}_mlp_hidden.residual.branch.conv.weight"] = (3072, 1, 3, 3)
        expected[f"adapters.text_blocks_{i}_attn_in.residual.branch.conv.weight"] = (512, 1, 3)
        expected[f"adapters.text_blocks_{i}_mlp_hidden.residual.branch.conv.weight"] = (2048, 1, 3)
    assert shapes == expected  # depthwise convolutions only: no bias, projection or norm
    assert all(not p.requires_grad for p in vit_b16.model.parameters())
    assert vit_b16.model.attached_modules() == {}


def test_defaults_are_the_released_configs():
    method_cfg, train_cfg = resolve_run_config("lweib", "base2new")
    assert method_cfg == from_mapping(LwEIBConfig, {}).__dict__
    assert (method_cfg["scale"], method_cfg["scale_factor"], method_cfg["slow_fast_ratio"]) == (0.025, 2.5, 0.8)
    assert (method_cfg["neg_sampling_ratio"], method_cfg["label_smoothing"]) == (7, 0.0)
    assert (method_cfg["adapter_start"], method_cfg["adapter_end"], method_cfg["text_conv"]) == (1, None, "symmetric")
    assert (train_cfg.optimizer, train_cfg.lr, train_cfg.epochs, train_cfg.batch_size) == ("sgd", 0.28, 25, 16)
    for protocol in ("cross_dataset", "dg"):
        xd, xd_train = resolve_run_config("lweib", protocol)
        assert (xd["scale"], xd["scale_factor"], xd["neg_sampling_ratio"]) == (0.075, 7.5, -1)
        assert (xd_train.batch_size, xd_train.lr, xd_train.epochs) == (128, 0.15, 10)
    assert resolve_run_config("lweib", "fewshot") == resolve_run_config("lweib", "base2new")
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        resolve_run_config("lweib", "base2new", overrides=["method.kernel_size=4"])
    with pytest.raises(ConfigError, match="text_conv"):
        resolve_run_config("lweib", "base2new", overrides=["method.text_conv=left"])


def test_init_is_pytorchs_conv_default(vit_b16):
    torch.manual_seed(0)
    m = create_method("lweib", vit_b16, ["a", "b"])
    for key, fan_in in (("visual_blocks_3_mlp_hidden", 9), ("text_blocks_5_mlp_hidden", 3)):
        w = m.adapters[key].branch.conv.weight
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        w = w.detach()
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


# --------------------------------------------------------------------------- the training step
@pytest.mark.parametrize("labels, seed, cfg", [
    ([13, 4], 0, {}),
    ([7, 7], 1, {"scale": 0.2}),
    ([19, 0], 2, {"scale": 0.2, "slow_fast_ratio": 0.5}),
    ([2, 11], 3, {"scale": 0.2, "text_conv": "causal"}),
])
def test_step_equals_an_independent_forward(tiny, bank, labels, seed, cfg):
    torch.manual_seed(seed)
    m = create_method("lweib", tiny, NAMES, {"descriptions": bank, **cfg}).train()
    images = _images(2, seed)
    out = m.training_step(images, torch.tensor(labels), _step(labels, seed=seed, batch_size=2))
    scales = out.context.scales
    assert set(scales) == _blocks(tiny)

    positives = sorted(set(labels))
    k = len(positives) + min(len(NAMES) - len(positives), 7 * len(positives))
    assert out.logits.shape == (2, k)

    # every (class, description) prompt, written out from the spec: "a photo of a {c}, {d}"
    pairs = [(c, t) for c in range(len(NAMES)) for t in range(3)]
    prompts = [f"a photo of a {NAMES[c]}, {DESCRIPTIONS[NAMES[c]][t]}" for c, t in pairs]
    with torch.no_grad():
        full = manual_logits(m, tiny, images, prompts, scales)
    cols = match_columns(out.logits.detach(), full, tol=2e-4)
    ids = [pairs[j][0] for j in cols]
    assert ids[: len(positives)] == positives  # the batch's classes first, sorted
    negatives = ids[len(positives):]
    assert len(set(negatives)) == len(negatives) and not set(negatives) & set(positives)
    y = torch.tensor([positives.index(c) for c in labels])
    assert out.labels.tolist() == y.tolist()

    expected = full[:, cols]
    assert torch.allclose(out.logits.detach(), expected, atol=2e-4, rtol=0)
    assert float(out.loss.detach()) == pytest.approx(float(F.cross_entropy(expected, y)), abs=1e-5)  # plain CE

    # gradient-scale layers: each branch's output receives the upstream gradient unscaled, so the
    # weights' gradients are those of the plain ``s * DWConv`` forward divided by that block's s.
    # The last visual block's MLP adapter sees only patch tokens, whose MLP outputs nothing reads
    # (the image feature is the CLS token's): its gradient is exactly zero, in the released code too.
    dead = f"adapters.visual_blocks_{tiny.model.num_layers('visual') - 1}_mlp_hidden.residual.branch.conv.weight"
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    chosen = [prompts[j] for j in cols]
    F.cross_entropy(manual_logits(m, tiny, images, chosen, scales), y).backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            key = name.split(".")[1]
            s = scales[(m.adapters[key].point.tower, m.adapters[key].point.layer)]
            assert torch.allclose(got[name], p.grad / s, rtol=1e-3, atol=1e-5), name
            assert bool(got[name].abs().sum() > 0) is (name != dead), name


def test_one_random_description_per_class_per_step(tiny, bank):
    m = create_method("lweib", tiny, NAMES, {"descriptions": bank, "neg_sampling_ratio": -1, "slow_fast_ratio": 1.0,
                                             "scale": 0.2})
    images = _images(2, 7)
    pairs = [(c, t) for c in range(len(NAMES)) for t in range(3)]
    prompts = [f"a photo of a {NAMES[c]}, {DESCRIPTIONS[NAMES[c]][t]}" for c, t in pairs]
    with torch.no_grad():
        full = manual_logits(m, tiny, images, prompts, {b: 0.2 for b in _blocks(tiny)})
        chosen = []
        for seed in range(3):
            out = m.training_step(images, torch.tensor([3, 5]), _step([3, 5], seed=seed))
            cols = match_columns(out.logits, full, tol=2e-4)
            assert [pairs[j][0] for j in cols] == list(range(len(NAMES)))  # all classes, in order
            chosen.append([pairs[j][1] for j in cols])
    assert len({t for ts in chosen for t in ts}) == 3  # every description gets drawn
    assert chosen[0] != chosen[1]  # independently per step


# --------------------------------------------------------------------------- slow/fast scales
def test_fast_scale_drawn_with_probability_one_minus_ratio(tiny):
    m = create_method("lweib", tiny, NAMES[:4])
    base, fast = 0.025, 0.025 * 2.5  # the defaults: SlowFastScale(base=0.025, factor=2.5, ratio=0.8)
    draws: list[float] = []
    with torch.no_grad():
        for k in range(25):
            out = m.training_step(_images(1), torch.tensor([2]), _step([2], seed=1000 + k))
            assert set(out.context.scales) == _blocks(tiny)  # one draw per (tower, block) per step
            draws.extend(out.context.scales.values())
    assert all(s == pytest.approx(base, abs=1e-12) or s == pytest.approx(fast, abs=1e-12) for s in draws)
    n, n_fast = len(draws), sum(s == pytest.approx(fast, abs=1e-12) for s in draws)
    # Binomial(100, 0.2): mean 20, sd 4; 4 sd either side is [4, 36] (an inverted ratio gives ~80)
    assert abs(n_fast - 0.2 * n) <= 4 * math.sqrt(n * 0.2 * 0.8), (n_fast, n)
    assert m.eval_context().scale(m.adapters["visual_blocks_0_attn_in"].point) == base  # no draw at test


@pytest.mark.parametrize("ratio, expect_fast", [(1.0, False), (0.0, True)])
def test_slow_fast_ratio_extremes(tiny, ratio, expect_fast):
    m = create_method("lweib", tiny, NAMES[:4], {"slow_fast_ratio": ratio})
    want = 0.025 * 2.5 if expect_fast else 0.025
    with torch.no_grad():
        for k in range(4):
            out = m.training_step(_images(1), torch.tensor([0]), _step([0], seed=k))
            assert all(s == pytest.approx(want, abs=1e-12) for s in out.context.scales.values())


# --------------------------------------------------------------------------- negative sampling
@pytest.mark.parametrize("num_classes, labels, batch_size, expected", [
    (40, [0, 0, 0, 0], 4, 1 + 7),         # one positive, seven negatives
    (40, [5, 9, 9, 30], 4, 3 + 21),       # three positives, 21 negatives
    (20, [0, 1, 2, 3], 4, 20),            # min(16 absent, 28): every class
    (4, [0, 1], 4, 4),                    # C <= batch size: every class, labels unchanged
])
def test_negative_sampling_ratio_is_seven(tiny, num_classes, labels, batch_size, expected):
    names = [f"c{i}" for i in range(num_classes)]
    m = create_method("lweib", tiny, names)
    step = _step(labels, seed=0, batch_size=batch_size)
    class_ids, remapped = m.step_classes(step)
    assert len(class_ids) == expected and len(set(class_ids.tolist())) == expected
    assert class_ids[remapped].tolist() == labels
    if num_classes > batch_size:
        assert class_ids[: len(set(labels))].tolist() == sorted(set(labels))
    else:
        assert class_ids.tolist() == list(range(num_classes)) and remapped.tolist() == labels
    with torch.no_grad():
        out = m.training_step(_images(len(labels)), torch.tensor(labels), step)
    assert out.logits.shape == (len(labels), expected)


# --------------------------------------------------------------------------- evaluation
def test_eval_logits_average_the_descriptions_at_the_base_scale(tiny, bank, images):
    torch.manual_seed(0)
    m = create_method("lweib", tiny, NAMES[:5], {"descriptions": bank, "scale": 0.3}).eval()
    with torch.no_grad():
        got = m(images)
        scales = {b: 0.3 for b in _blocks(tiny)}
        image, _ = manual_features(m, images, tiny.tokenizer(["x"]), scales)
        texts = []
        for t in range(3):
            tokens = tiny.tokenizer([f"a photo of a {c}, {DESCRIPTIONS[c][t]}" for c in NAMES[:5]])
            texts.append(F.normalize(manual_features(m, images, tokens, scales)[1], dim=-1))
        w = F.normalize(torch.stack(texts).mean(0), dim=-1)
        expected = tiny.model.logit_scale.exp() * F.normalize(image, dim=-1) @ w.t()
    assert torch.allclose(got, expected, atol=2e-4)
    assert m.evaluation_info() == {"eval_scale": 0.3, "templates": 3, "prompts": "descriptions"}


def test_eval_scales_for_base_and_new_classes(tiny, images):
    m = create_method("lweib", tiny, ["cat", "dog"], {"new_eval_scale": 0.01}).eval()
    m.set_classnames(["cat", "dog"], split="base")
    assert m.eval_scale() == 0.025  # the released code tests base and new classes at ADAPTER_SCALE
    m.set_classnames(["cow", "owl"], split="new")
    assert m.eval_scale() == 0.01
    zero = create_method("lweib", tiny, ["cat", "dog"], {"scale": 0.0}).eval()
    zs = create_method("zeroshot", tiny, ["cat", "dog"], {"templates": "a photo of a {}."})
    with torch.no_grad():
        # scale 0: the frozen CLIP (up to summation order: LwEIB runs the whole text context)
        assert torch.allclose(zero(images), zs(images), atol=1e-5)


def test_symmetric_text_conv_needs_the_whole_context_and_causal_does_not(tiny):
    tokens = tiny.tokenizer(["a photo of a cat, a small animal with whiskers", "a dog"])
    for text_conv, truncate in (("symmetric", False), ("causal", True)):
        torch.manual_seed(0)
        m = create_method("lweib", tiny, ["cat"], {"scale": 0.5, "text_conv": text_conv})
        assert m.truncate_text is truncate
        with torch.no_grad(), m.attached():
            whole = tiny.model.encode_text(tokens, m.eval_context(), truncate=False)
            cut = tiny.model.encode_text(tokens, m.eval_context(), truncate=True)
        # the longest prompt's EOT sees the padding token after it through the symmetric kernel
        assert torch.allclose(whole, cut, atol=1e-5) is (text_conv == "causal")


# --------------------------------------------------------------------------- checkpoints
def _color_folder(root, per_class=6):
    g = torch.Generator().manual_seed(0)
    for name, rgb in (("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (torch.tensor(rgb).float() + torch.rand(24, 24, 3, generator=g) * 60 - 30).clamp(0, 255)
            Image.fromarray(arr.byte().numpy()).save(root / name / f"{i}.png")
    return root


def test_checkpoint_round_trip_gives_identical_logits(tiny, tmp_path, images):
    splits = load_custom(_color_folder(tmp_path / "data"), save_split=False)
    torch.manual_seed(0)
    m = create_method("lweib", tiny, splits.classnames, {"scale": 0.2})
    before = {k: v.clone() for k, v in m.checkpoint_state().items()}
    cfg = from_mapping(TrainConfig, dict(epochs=1, batch_size=4, lr=0.05, precision="fp32"))
    fit(m, splits, cfg, seed=0, run_dir=tmp_path / "run", progress=False)
    assert any(not torch.equal(before[k], v) for k, v in m.checkpoint_state().items())  # training moved them
    torch.manual_seed(123)  # another initialization, overwritten by the checkpoint
    again = create_method("lweib", tiny, splits.classnames, {"scale": 0.2})
    meta = load_checkpoint(tmp_path / "run", again, tiny.fingerprint)
    assert meta["method"] == "lweib" and meta["classnames"] == splits.classnames
    assert set(again.checkpoint_state()) == set(before)
    m.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(m(images), again(images))
    with pytest.raises(ConfigError, match="of method 'lweib', not 'heba'"):
        load_checkpoint(tmp_path / "run", create_method("heba", tiny, splits.classnames))
