"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck on the frozen image feature.

``f' = ratio * ReLU(W2 ReLU(W1 f)) + (1 - ratio) * f`` with ``W1: E -> E/reduction``,
``W2: E/reduction -> E``, no biases (ratio 0.2, reduction 4 as released); logits
``exp(logit_scale) * cos(f', t_c)`` against the frozen CLIP text classifier of the dataset's CoOp
template; cross-entropy. Trainable: the two matrices (131,072 parameters for E = 512).

It is a feature-level method: the frozen image feature is all it needs, so the engine trains and
evaluates it on cached features. The released code feeds the raw (unnormalized) image feature to the
adapter and vladapt the L2-normalized one: the adapter has no biases and ReLU is positively
homogeneous, so ``f'`` scales with ``|f|`` and the cosine logits are identical (tested). The release
ships no training config; the configs use the CoOp/Dassl settings the trainer was written for
(assumed, see ``configs/clip_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone
from vladapt.errors import ConfigError
from vladapt.methods.base import StepInfo, StepOutput
from vladapt.methods.registry import register_method
from vladapt.methods.zeroshot import ZeroShotCLIP, ZeroShotConfig


class ResidualAdapter(nn.Module):
    """CLIP-Adapter's residual bottleneck: ``x -> ratio * ReLU(W2 ReLU(W1 x)) + (1 - ratio) * x``, no biases."""

    def __init__(self, dim: int, reduction: int, ratio: float) -> None:
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ConfigError(f"method.reduction={reduction} leaves no bottleneck for features of width {dim}")
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.ratio = float(ratio)

    def forward(self, x: Tensor) -> Tensor:
        return self.ratio * F.relu(self.fc2(F.relu(self.fc1(x)))) + (1.0 - self.ratio) * x

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"


@dataclass
class CLIPAdapterConfig(ZeroShotConfig):
    reduction: int = field(default=4, metadata={"min": 1, "help": "bottleneck = E / reduction"})
    ratio: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0, "help": "residual ratio (released: 0.2)"})
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})


@register_method("clip_adapter")
class CLIPAdapter(ZeroShotCLIP):
    Config = CLIPAdapterConfig
    trainable = True
    feature_level = True

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        self.adapter = ResidualAdapter(self.clip.text_projection.shape[1], self.config.reduction, self.config.ratio)
        self.to(self.device)

    def feature_logits(self, features: Tensor) -> Tensor:
        f = F.normalize(self.adapter(features.to(self.device).float()), dim=-1)
        return self.clip.logit_scale.exp().float() * f @ self.text_classifier().t()

    def feature_step(self, features: Tensor, labels: Tensor, step: StepInfo | None = None) -> StepOutput:
        logits = self.feature_logits(features)
        y = labels.to(self.device)
        return StepOutput(loss=F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing),
                          logits=logits, labels=y)

    def forward(self, images: Tensor) -> Tensor:
        return self.feature_logits(self.frozen_image_features(images))
