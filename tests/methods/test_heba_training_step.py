"""HeBA's training step (METHODS.md §1.5-§1.9) checked from the outside, through ``training_step``.

The step's class subset, logits and loss are recomputed from public pieces only: the backbone's
tokenizer and encoders with the method's adapters attached (``HeBA.attached``) at the scales the step
reports in ``out.context.scales``, the prompt text written out from the spec, and the label-smoothed
cross-entropy written out from its formula (§1.7).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vladapt.backbones import ForwardContext
from vladapt.engine.train import StepInfo
from vladapt.methods import create_method

NAMES = [f"class {chr(ord('a') + i)}" for i in range(20)]  # 20 classes, one prompt each


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _step(labels: list[int], seed: int, batch_size: int | None = None) -> StepInfo:
    y = torch.tensor(labels)
    return StepInfo(epoch=0, step=0, generator=torch.Generator().manual_seed(seed), global_labels=y,
                    local=slice(0, len(labels)), batch_size=batch_size or len(labels))


def _blocks(tiny) -> set[tuple[str, int]]:
    return {(t, layer) for t in ("visual", "text") for layer in range(tiny.model.num_layers(t))}


# --------------------------------------------------------------------------- slow/fast scales
def test_training_step_draws_fast_scales_with_probability_one_minus_ratio(tiny):
    heba = create_method("heba", tiny, NAMES[:4], {"scale": 0.03, "scale_factor": 3.0})
    assert heba.config.slow_fast_ratio == 0.8  # the default: P(fast) = 0.2 (§1.5)
    base, fast = 0.03, 0.03 * 3.0
    images, labels = _images(1), torch.tensor([2])
    blocks = _blocks(tiny)
    draws: list[float] = []
    with torch.no_grad():
        for k in range(20):
            out = heba.training_step(images, labels, _step([2], seed=1000 + k))
            scales = out.context.scales
            assert set(scales) == blocks  # one draw per (tower, block) of every adapted block
            draws.extend(scales.values())
    assert all(s == pytest.approx(base, abs=1e-12) or s == pytest.approx(fast, abs=1e-12) for s in draws)
    n = len(draws)
    n_fast = sum(s == pytest.approx(fast, abs=1e-12) for s in draws)
    # Binomial(80, 0.2): mean 16, sd 3.6; 4 sd either side is [2, 30] (an inverted ratio gives ~64).
    mean, sd = 0.2 * n, math.sqrt(n * 0.2 * 0.8)
    assert abs(n_fast - mean) <= 4 * sd, (n_fast, n)


@pytest.mark.parametrize("ratio, expect_fast", [(1.0, False), (0.0, True)])
def test_slow_fast_ratio_extremes_in_the_step(tiny, ratio, expect_fast):
    heba = create_method("heba", tiny, NAMES[:4], {"scale": 0.02, "scale_factor": 2.5, "slow_fast_ratio": ratio})
    want = 0.02 * 2.5 if expect_fast else 0.02
    with torch.no_grad():
        for k in range(5):
            out = heba.training_step(_images(1), torch.tensor([0]), _step([0], seed=k))
            assert set(out.context.scales) == _blocks(tiny)
            assert all(s == pytest.approx(want, abs=1e-12) for s in out.context.scales.values())


# ------------------------------------------------------------------ independent recomputation
def _reference_logits(heba, tiny, images, scales) -> torch.Tensor:
    """``exp(logit_scale) * cos(image, text)`` over ALL classes at the given per-(tower, block) scales,
    with prompts written out from §1.6 ("a photo of a" + " " + c + "." without a description bank)."""
    tokens = tiny.tokenizer([f"a photo of a {c}." for c in heba.classnames])
    ctx = ForwardContext(lambda tower, layer: scales[(tower, layer)])
    with torch.no_grad(), heba.attached():
        text = tiny.model.encode_text(tokens, ctx).double()
        image = tiny.model.encode_image(images, ctx).double()
    text = text / text.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    return tiny.model.logit_scale.double().exp() * image @ text.t()


def _smoothed_ce(logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """§1.7: (1 - eps) * (-log p_y) + (eps / K) * sum_k (-log p_k), averaged over the batch."""
    logp = logits.log_softmax(-1)
    k = logits.shape[1]
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    return ((1 - eps) * nll + (eps / k) * (-logp).sum(-1)).mean()


def _match_columns(step_logits: torch.Tensor, full: torch.Tensor, tol: float) -> list[int]:
    """For each column of the step's logits, the one class whose reference column it equals."""
    ids = []
    for k in range(step_logits.shape[1]):
        diff = (full - step_logits[:, k : k + 1].double()).abs().amax(0)
        hits = (diff < tol).nonzero().flatten().tolist()
        assert len(hits) == 1, f"column {k} matches classes {hits} (closest diff {diff.min().item():.3g})"
        ids.append(hits[0])
    return ids


@pytest.mark.parametrize("labels, seed", [([13, 4], 0), ([7, 7], 1), ([19, 0], 2)])
def test_step_classes_logits_and_loss_equal_an_independent_recomputation(tiny, labels, seed):
    torch.manual_seed(0)
    heba = create_method("heba", tiny, NAMES)  # defaults: ratio 5, smoothing 0.1, P(fast) 0.2
    images = _images(2, seed)
    out = heba.training_step(images, torch.tensor(labels), _step(labels, seed=seed, batch_size=2))
    scales = out.context.scales
    assert set(scales) == _blocks(tiny)

    positives = sorted(set(labels))
    num_classes = len(NAMES)
    k = len(positives) + min(num_classes - len(positives), 5 * len(positives))
    assert out.logits.shape == (2, k)

    full = _reference_logits(heba, tiny, images, scales)  # [2, 20]
    ids = _match_columns(out.logits.detach(), full, tol=1e-4)
    assert ids[: len(positives)] == positives  # positives first, in sorted order
    negatives = ids[len(positives):]
    assert len(set(negatives)) == len(negatives) and not set(negatives) & set(positives)
    y = torch.tensor([positives.index(c) for c in labels])  # labels remapped to their index in P
    assert out.labels.tolist() == y.tolist()

    expected_logits = full[:, ids]
    assert torch.allclose(out.logits.detach().double(), expected_logits, atol=1e-5, rtol=0)
    expected_loss = _smoothed_ce(expected_logits, y, 0.1)
    assert float(out.loss.detach()) == pytest.approx(float(expected_loss), abs=1e-5)
    # the smoothing is visible: plain cross-entropy differs by far more than the tolerance
    assert abs(float(F.cross_entropy(expected_logits, y)) - float(expected_loss)) > 1e-3


def test_negative_ratio_below_zero_uses_all_classes_in_order(tiny):
    heba = create_method("heba", tiny, NAMES, {"neg_sampling_ratio": -1, "slow_fast_ratio": 1.0})
    labels = [11, 3]
    images = _images(2, 5)
    out = heba.training_step(images, torch.tensor(labels), _step(labels, seed=3, batch_size=2))
    assert out.logits.shape == (2, 20)
    assert out.labels.tolist() == labels  # not remapped
    scales = out.context.scales
    assert set(scales.values()) == {heba.config.scale}  # ratio 1: never fast
    full = _reference_logits(heba, tiny, images, scales)
    assert torch.allclose(out.logits.detach().double(), full, atol=1e-5, rtol=0)
    assert float(out.loss.detach()) == pytest.approx(float(_smoothed_ce(full, torch.tensor(labels), 0.1)), abs=1e-5)


def test_negatives_vary_with_the_step_generator_and_repeat_with_it(tiny):
    heba = create_method("heba", tiny, NAMES, {"slow_fast_ratio": 1.0})
    images, labels = _images(2, 9), [5, 6]
    with torch.no_grad():
        full = _reference_logits(heba, tiny, images, {b: heba.config.scale for b in _blocks(tiny)})

        def classes(seed: int) -> list[int]:
            out = heba.training_step(images, torch.tensor(labels), _step(labels, seed=seed, batch_size=2))
            return _match_columns(out.logits, full, tol=1e-4)

        first = classes(0)
        assert classes(0) == first
        assert len({tuple(classes(s)) for s in range(1, 4)} | {tuple(first)}) > 1
