"""Linear probe CLIP (Radford et al. 2021; the CoOp protocol's ``lpclip``): L2-regularized multinomial
logistic regression on frozen image features, its strength searched on the validation split.

As CoOp's ``lpclip/linear_probe.py`` (which uses scikit-learn): features are the image encoder's raw
outputs on the test transform; the model is ``softmax(W f + b)`` fitted by minimizing
``C * sum_i CE_i + |W|^2 / 2`` (the intercept is not penalized) with L-BFGS; ``C`` is chosen on the
validation split only: first the best of ``1e6, 1e4, ..., 1e-6``, then ``search_steps`` rounds of
CoOp's bisection in log space around it (the left end is kept on ties); the classifier of the last
round is kept. vladapt solves the same convex problem with torch's L-BFGS in float64 instead of
scikit-learn (no extra dependency); the optimum is unique, so the fitted model agrees up to the
solvers' tolerances. CoOp samples a few-shot validation set (at most 4 per class); the protocols give
vladapt's few-shot validation split, which is sampled the same way.

It classifies only the classes it was fitted on: base-to-new's new classes, cross-dataset targets and
other class sets are a :class:`ConfigError` (use the ``fewshot`` protocol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vladapt.backbones import Backbone
from vladapt.errors import ConfigError
from vladapt.methods.base import FeatureSource, Method
from vladapt.methods.registry import register_method

INITIAL_C = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]


@dataclass
class LinearProbeConfig:
    search_steps: int = field(default=8, metadata={"min": 0, "help": "bisection rounds after the coarse search (CoOp: 8)"})
    c: float | None = field(default=None, metadata={"min": 0.0, "help": "a fixed C instead of the search"})
    max_iter: int = field(default=1000, metadata={"min": 1, "help": "L-BFGS iterations (scikit-learn's max_iter)"})
    tolerance: float = field(default=1e-6, metadata={
        "min": 0.0, "help": "stop when the gradient's max |g| is below tolerance * max(1, C * n)"})


def fit_logistic_regression(x: Tensor, y: Tensor, num_classes: int, c: float, max_iter: int = 1000,
                            tolerance: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(W [C, E], b [C])`` minimizing ``c * sum CE(x W^T + b, y) + |W|^2 / 2`` (float64, L-BFGS)."""
    x, y = x.double(), y.long()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    # the tolerance is relative to the data term's scale c * n (which spans 12 orders of magnitude over the search)
    scale = max(1.0, c * len(x))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance * scale, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = c * F.cross_entropy(x @ w.t() + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> float:
    return float(((x.double() @ w.t() + b).argmax(-1) == y).double().mean())


def search_c(fit, score) -> tuple[float, list[tuple[float, float]]]:
    """CoOp's coarse search: ``fit(c) -> model``, ``score(model) -> validation accuracy``; returns the
    first C of the best accuracy and the (C, accuracy) trace."""
    trace = []
    scores = []
    for c in INITIAL_C:
        scores.append(score(fit(c)))
        trace.append((c, scores[-1]))
    peak = INITIAL_C[max(range(len(scores)), key=lambda i: (scores[i], -i))]  # first maximum, as np.argmax
    return peak, trace


def bisect_c(peak: float, steps: int, fit, score, trace: list) -> tuple[float, Any]:
    """CoOp's refinement: ``steps`` rounds comparing the ends of a range around ``peak`` (starting at
    ``[peak / 10, 10 peak]``), halving it in log space towards the better end; returns the last
    round's C and model (``(peak, None)`` for 0 steps)."""
    left, right = 0.1 * peak, 10.0 * peak
    chosen, model = peak, None
    for _ in range(steps):
        m_left, m_right = fit(left), fit(right)
        a_left, a_right = score(m_left), score(m_right)
        trace += [(left, a_left), (right, a_right)]
        if a_left < a_right:
            chosen, model = right, m_right
            left, right = 0.5 * (math.log10(right) + math.log10(left)), math.log10(right)
        else:
            chosen, model = left, m_left
            left, right = math.log10(left), 0.5 * (math.log10(right) + math.log10(left))
        left, right = 10.0 ** left, 10.0 ** right
    return chosen, model


@register_method("linear_probe")
class LinearProbe(Method):
    Config = LinearProbeConfig
    trainable = False
    unseen_classes = False

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        self.register_state_buffer("weight", None)
        self.register_state_buffer("bias", None)
        self.register_state_buffer("c", None)
        self._fitted_classes: list[str] | None = None

    def set_classnames(self, classnames: list[str], dataset: str | None = None, split: str | None = None) -> None:
        fitted = self._fitted_classes
        if fitted is not None and list(classnames) != fitted:
            raise ConfigError(
                f"the linear probe classifies only the {len(fitted)} classes it was fitted on, not these "
                f"{len(classnames)} ({split or 'other'} classes); it has no weights for unseen classes: "
                "use the fewshot protocol")
        super().set_classnames(classnames, dataset, split)

    def prepare(self, train: Any, features: FeatureSource | None = None) -> None:
        if features is None:
            raise ConfigError("the linear probe needs the frozen features of its training and validation splits")
        x, y = features.image_features("train", normalize=False)
        if len(getattr(train, "val", [])) == 0 and self.config.c is None:
            raise ConfigError(f"the linear probe searches C on the validation split, and {train.name} has none; "
                              "set method.c")
        cfg, n = self.config, len(self.classnames)

        def fit(c: float):
            return fit_logistic_regression(x, y, n, c, cfg.max_iter, cfg.tolerance)

        if cfg.c is not None:
            c, (w, b) = cfg.c, fit(cfg.c)
            self.search_trace = []
        else:
            xv, yv = features.image_features("val", normalize=False)  # the search sees validation items only

            def score(model) -> float:
                return accuracy(*model, xv, yv)

            peak, trace = search_c(fit, score)
            c, model = bisect_c(peak, cfg.search_steps, fit, score, trace)
            w, b = model if model is not None else fit(peak)
            self.search_trace = trace
        self._set_buffer("weight", w.float())
        self._set_buffer("bias", b.float())
        self._set_buffer("c", torch.tensor(float(c)))
        self._fitted_classes = list(self.classnames)

    def forward(self, images: Tensor) -> Tensor:
        if self.weight is None:
            raise ConfigError("the linear probe is not fitted: run it through a protocol (prepare) first")
        with torch.no_grad():
            f = self.clip.encode_image(images.to(self.device)).float()
        return f @ self.weight.t() + self.bias

    def evaluation_info(self) -> dict[str, Any]:
        return {"C": None if self.c is None else float(self.c)}
