"""Linear probe: the fitted model is the optimum of the regularized objective, C is searched as CoOp
searches it and on the validation split only, unseen classes are an error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_heba_engine import color_folder
from vladapt.data import load_custom
from vladapt.engine.features import FrozenFeatures
from vladapt.errors import ConfigError
from vladapt.methods import create_method
from vladapt.methods.linear_probe import INITIAL_C, bisect_c, fit_logistic_regression, search_c


def test_the_fit_is_the_optimum_of_the_regularized_objective():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    for c in (0.01, 1.0, 100.0):
        w, b = fit_logistic_regression(x, y, 3, c)
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        objective = c * F.cross_entropy(x @ w.t() + b, y, reduction="sum") + 0.5 * (w * w).sum()
        gw, gb = torch.autograd.grad(objective, [w, b])
        tol = 1e-5 * max(1.0, c * len(x))  # stationary point of a strictly convex problem
        assert gw.abs().max() < tol and gb.abs().max() < tol
    w_small, _ = fit_logistic_regression(x, y, 3, 1e-4)
    assert w_small.norm() < 1e-2 < w.norm()  # a small C shrinks the weights (the intercept is free)


def coop_search(score_of_c, steps):
    """CoOp's lpclip search, written out independently: the coarse list, then the bisection."""
    accs = [score_of_c(c) for c in [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]]
    peak = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6][accs.index(max(accs))]
    lo, hi, final = 0.1 * peak, 10 * peak, None
    for _ in range(steps):
        a_lo, a_hi = score_of_c(lo), score_of_c(hi)
        if a_lo < a_hi:
            final = hi
            lo, hi = 10 ** ((math.log10(hi) + math.log10(lo)) / 2), hi
        else:
            final = lo
            lo, hi = lo, 10 ** ((math.log10(hi) + math.log10(lo)) / 2)
    return final


@pytest.mark.parametrize("best", [37.0, 3e-3, 1e5])
def test_c_search_follows_coops_procedure(best):
    score = lambda c: -abs(math.log10(c) - math.log10(best))  # noqa: E731  peaked at `best`
    peak, trace = search_c(lambda c: c, score)
    assert [c for c, _ in trace] == INITIAL_C
    chosen, model = bisect_c(peak, 8, lambda c: c, score, trace)
    assert chosen == pytest.approx(coop_search(score, 8)) and model == chosen
    assert abs(math.log10(chosen) - math.log10(best)) < 0.5


class ValOnly(FrozenFeatures):
    def image_features(self, split="train", augment_passes=0, normalize=True):
        self.seen = getattr(self, "seen", []) + [split]
        if split not in ("train", "val"):
            raise AssertionError(f"the search touched the {split} split")
        return super().image_features(split, augment_passes, normalize)


def test_probe_fits_on_train_searches_on_val_and_refuses_unseen_classes(tmp_path, tiny):
    splits = load_custom(color_folder(tmp_path / "data", per_class=6), save_split=False)
    m = create_method("linear_probe", tiny, splits.classnames, {"search_steps": 2, "max_iter": 100})
    source = ValOnly(tiny, splits)
    m.prepare(splits, source)
    assert source.seen == ["train", "val"]
    x, y = source.image_features("train", normalize=False)
    w, b = fit_logistic_regression(x, y, len(splits.classnames), float(m.c), max_iter=100)
    torch.testing.assert_close(m.weight, w.float(), rtol=1e-4, atol=1e-4)  # the kept model is the fit at the chosen C
    with torch.no_grad():
        raw = tiny.model.encode_image(torch.randn(2, 3, 32, 32)).float()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, len(splits.classnames)) and raw.shape[1] == x.shape[1]
    assert m.evaluation_info()["C"] == float(m.c)
    m.set_classnames(splits.classnames, split="base")  # its own classes: fine
    with pytest.raises(ConfigError, match="unseen classes"):
        m.set_classnames(splits.classnames[:2], split="new")
