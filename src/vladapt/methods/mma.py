"""MMA: Multi-Modal Adapter (Yang et al., CVPR 2024), as its authors' code computes it (METHODS.md §4.6).

In blocks ``adapter_start..adapter_end`` (1-based; 5..12 for ViT-B/16) of both towers a bottleneck
branch runs parallel to the whole block, fed with the block's own ``LN1(x)`` (insertion point
``block_ln1``), and its output is added to the block output::

    y = GS_{1/s}( s * up( ReLU(shared( ReLU(down(GS_s(LN1(x)))) )) ) )
    x_out = x + MHA(LN1 x) + MLP(LN2 .) + y

``down``: Linear(d -> dim) and ``up``: Linear(dim -> d) per tower and block; ``shared``: one
Linear(dim -> dim) per block **shared by the two towers** at that depth (the cross-modal coupling);
every token (CLS, patches, all text positions) goes through the branch. ``GS`` is the gradient-scale
operator of METHODS.md §0.1, so the branch's parameter gradients do not depend on ``s``. All linears
are Kaiming-normal (fan_out, ReLU) with zero biases. Text: one prompt per class,
``"a photo of a {c}."``; training uses all classes each step with plain cross-entropy; the text
classifier is cached at evaluation.

Differences from the released code: none in the numbers (tests/methods/test_parity.py compares
logits and every gradient with theirs). Embedding-level adapters (their ``ADAPTER_START = 0``, never
used by their configs) are not supported; the blocks are 1-based as in their configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone, ForwardContext, InsertionPoint, forward_scale, grad_scale
from vladapt.methods.adapters import AdapterMethod, block_range, build_point_modules, check_towers
from vladapt.methods.registry import register_method

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class MMAConfig:
    """MMA's settings; the defaults are the released ``vit_b16_ep5.yaml``."""

    adapter_start: int = field(default=5, metadata={"min": 1, "help": "first adapted block (1-based)"})
    adapter_end: int | None = field(default=None, metadata={"min": 1, "help": "last adapted block; none = the last"})
    towers: list[str] = field(default_factory=lambda: ["visual", "text"])
    dim: int = field(default=32, metadata={"min": 1, "help": "bottleneck width"})
    scale: float = field(default=0.001, metadata={"min": 0.0, "help": "branch scale s"})
    shared: bool = field(default=True, metadata={"help": "the dim x dim layer shared by both towers at each depth"})
    activation: str = field(default="relu", metadata={"choices": ["relu", "gelu"]})
    neg_sampling_ratio: int = field(default=-1, metadata={"help": "<0: all classes every step (MMA)"})
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    text_prefix: str = "a photo of a"
    text_batch_size: int = field(default=256, metadata={"min": 1})

    def validate(self) -> None:
        check_towers(self.towers)


def kaiming_linear(d_in: int, d_out: int) -> nn.Linear:
    linear = nn.Linear(d_in, d_out)
    nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(linear.bias)
    return linear


class MMABranch(nn.Module):
    """MMA's branch at one ``block_ln1`` point: ``h [B, N, D] -> s * up(act(shared(act(down(h)))))``.

    The shared layer belongs to the method (one per depth, used by both towers); the branch only
    refers to it. The scale is ``ctx.scale(point)`` when the forward context gives one, else
    :attr:`scale`; with scale 0 the branch adds exactly zero.
    """

    tokenwise = True  # each token alone (the backbone may skip tokens nothing reads: Block.keeps_prefix)

    def __init__(self, point: InsertionPoint, dim: int, scale: float, shared: nn.Linear | None,
                 activation: str = "relu") -> None:
        super().__init__()
        self.point = point
        self.scale = float(scale)
        self.activation = activation
        self.down = kaiming_linear(point.width, dim)
        self.up = kaiming_linear(dim, point.width)
        self._shared = [shared]  # a reference, not a submodule: its parameters are the method's

    @property
    def shared(self) -> nn.Linear | None:
        return self._shared[0]

    def hidden(self, h: Tensor) -> Tensor:
        """``act(down(h))``, the bottleneck code (RMAdapter's reconstruction branch starts here too)."""
        hw = h if torch.is_autocast_enabled(h.device.type) else h.to(self.down.weight.dtype)
        return ACTIVATIONS[self.activation](self.down(hw))

    def branch(self, h: Tensor) -> Tensor:
        z = self.hidden(h)
        if self.shared is not None:
            z = ACTIVATIONS[self.activation](self.shared(z))
        return self.up(z)

    def forward(self, h: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        s = ctx.scale(self.point) if ctx is not None else None
        s = self.scale if s is None else s
        if s == 0.0:
            return torch.zeros_like(h)
        return forward_scale(self.branch(grad_scale(h, s)), s).to(h.dtype)

    def extra_repr(self) -> str:
        return f"point={self.point.name}, scale={self.scale}, shared={self.shared is not None}"


@register_method("mma")
class MMA(AdapterMethod):
    Config = MMAConfig
    branch_class: type[MMABranch] = MMABranch

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        layers = {t: block_range(self.clip, t, cfg.adapter_start, cfg.adapter_end, "MMA") for t in cfg.towers}
        depths = sorted({i for t in cfg.towers for i in layers[t]})
        self.shared = nn.ModuleDict({str(i): kaiming_linear(cfg.dim, cfg.dim) for i in depths} if cfg.shared else {})
        self.adapters = build_point_modules(self.clip, cfg.towers, layers, ["block_ln1"], self.make_branch)
        self.to(self.device)

    def make_branch(self, point: InsertionPoint) -> MMABranch:
        cfg = self.config
        shared = self.shared[str(point.layer)] if cfg.shared else None
        return self.branch_class(point, cfg.dim, cfg.scale, shared, cfg.activation)
