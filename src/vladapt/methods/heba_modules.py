"""HeBA's trainable pieces: the heterogeneous bottleneck, its per-point wrapper and the slow-fast scale.

HeBA (METHODS.md §1) attaches one adapter at two insertion points of every selected block of both
towers: ``attn_in`` (``LN1(x)``, width ``D``) and ``mlp_hidden`` (the MLP pre-activation, width
``4D``). Each adapter computes ``h + s * B(h)`` through :class:`~vladapt.backbones.ScaledResidual`,
so the bottleneck's parameter gradients do not depend on the scale ``s``.

Layer numbering: like the reference configs (``ADAPTER_START``/``ADAPTER_END``), :func:`build_heba_adapters`
takes **1-based** block indices (``range(1, 13)`` = all twelve blocks of ViT-B/16), while
:attr:`InsertionPoint.layer <vladapt.backbones.InsertionPoint>` and the adapter keys are **0-based**
(block 1 of the config is ``visual_blocks_0_attn_in``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import CLIPModel, ForwardContext, InsertionPoint, ScaledResidual, split_prefix
from vladapt.errors import ConfigError
from vladapt.methods.adapters import SlowFastScale, adapter_key, attach_modules, detach_modules

__all__ = ["HEBA_POSITIONS", "HeBABottleneck", "HeBAPointAdapter", "PointResidual", "SlowFastScale", "adapter_key",
           "attach_adapters", "build_heba_adapters", "detach_adapters"]

HEBA_POSITIONS: tuple[str, ...] = ("attn_in", "mlp_hidden")


class HeBABottleneck(nn.Module):
    """The adapter block B of HeBA (the reference's ``RobustAdapterBlock``), bias-free, ``r = D / reduction``.

    * spatial (visual) variant, on the patch tokens ``z: [B, H*W, D]`` of an ``H x W`` grid::

          y = W_up GELU(DepthwiseConv3x3_r(W_down z))   # the depthwise conv runs on the [B, r, H, W] grid
          B(z) = LayerNorm_D(z + y)                      # per token

      The reference writes the two projections as 1x1 convolutions on ``[B, D, H, W]``; a 1x1
      convolution is the same linear map per token (same parameter count and default / Kaiming
      initialization), and applying it to the token-major tensor avoids transposing the D-wide
      activations twice per adapter. Only the r-wide tensor is viewed as a channels-last grid.
    * token-wise (text) variant, on ``z: [..., D]``::

          B(z) = LayerNorm_D(z + W_up GELU(W_down z))

    GELU is the exact (erf) GELU, not CLIP's QuickGELU.

    **B contains its own residual and LayerNorm**: its output is a full-magnitude normalized vector,
    not a small delta, so zero-initializing ``up`` would make ``B(z) = LN(z)``, not zero, and the
    adapted feature ``h + s * B(h)`` would still differ from ``h``. Only ``s = 0`` is an identity.

    Initialization ("Kaiming hot start", §1.4): ``up`` is Kaiming-normal with ``mode="fan_out"``,
    ``nonlinearity="relu"`` (std ``sqrt(2 / D)``); ``down`` and the depthwise kernel keep PyTorch's
    default (Kaiming-uniform with ``a = sqrt(5)``, i.e. ``U(+-1/sqrt(fan_in))``); LayerNorm ``gamma = 1``,
    ``beta = 0``. Passing ``generator`` draws all of these from it instead of the global RNG.

    Outside autocast the input is cast to the weights' dtype for the projections (so a bf16 input
    works with fp32 weights) and the residual and LayerNorm are computed in fp32; under autocast
    everything runs in the autocast dtype (LayerNorm statistics are accumulated in fp32 by the
    kernel). The output has the input's dtype.
    """

    def __init__(self, width: int, *, spatial: bool, reduction: int = 4,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if reduction < 1 or width % reduction:
            raise ConfigError(f"HeBA reduction must be a positive divisor of the adapter width {width}; got {reduction}")
        self.width = width
        self.spatial = spatial
        self.hidden = width // reduction
        self.down = nn.Linear(width, self.hidden, bias=False)
        self.depthwise: nn.Conv2d | None = (
            nn.Conv2d(self.hidden, self.hidden, kernel_size=3, padding=1, groups=self.hidden, bias=False)
            if spatial else None
        )
        self.up = nn.Linear(self.hidden, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Same distributions as PyTorch's Conv/Linear defaults, re-drawn so that a run's single
        # seeded generator can drive them.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        if self.depthwise is not None:
            nn.init.kaiming_uniform_(self.depthwise.weight, a=math.sqrt(5), generator=generator)
        nn.init.kaiming_normal_(self.up.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        self.norm.reset_parameters()

    def forward(self, z: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """``[B, H*W, D]`` with ``grid=(H, W)`` (spatial) or ``[..., D]`` (token-wise) -> same shape and dtype."""
        zw = z if torch.is_autocast_enabled(z.device.type) else z.to(self.up.weight.dtype)
        h = self.down(zw)
        if self.depthwise is not None:
            if grid is None:
                raise ValueError("the spatial HeBA bottleneck needs the patch grid (H, W)")
            b, n, r = h.shape
            # channels-last view of the r-wide tensor: no copy before the depthwise convolution
            h = self.depthwise(h.view(b, grid[0], grid[1], r).permute(0, 3, 1, 2))
            h = h.permute(0, 2, 3, 1).reshape(b, n, r)
        y = self.up(F.gelu(h))
        if torch.is_autocast_enabled(z.device.type):
            # Under autocast the residual and LayerNorm stay in the autocast dtype (the kernels
            # accumulate the statistics in fp32), as the backbone's own LayerNorm does.
            v = z + y.to(z.dtype)
            with torch.autocast(z.device.type, enabled=False):
                return F.layer_norm(v, (self.width,), self.norm.weight.to(v.dtype), self.norm.bias.to(v.dtype),
                                    self.norm.eps)
        return self._norm(z.float() + y.float()).to(z.dtype)

    def _norm(self, v: Tensor) -> Tensor:
        # fp32 LayerNorm whatever the weights' dtype, as CLIP's own LayerNorm does in fp32 runs.
        return F.layer_norm(v, (self.width,), self.norm.weight.float(), self.norm.bias.float(), self.norm.eps)

    def extra_repr(self) -> str:
        return f"width={self.width}, hidden={self.hidden}, spatial={self.spatial}"


class PointResidual(nn.Module):
    """``R_s(h) = h + s * branch(h)`` at one insertion point: the wrapper HeBA and LwEIB share.

    ``make_branch(spatial)`` builds the branch; ``spatial`` is True at visual points (a layout with a
    patch grid), where the branch sees only the patch tokens on their ``H x W`` grid and the CLS
    (prefix) tokens are passed through bit-identically; at text points every token position (SOT,
    words, EOT, padding) goes through the token-wise branch.

    The scale is ``ctx.scale(point)`` when the forward context provides one (training with
    :class:`SlowFastScale`), else :attr:`scale` (the evaluation / base scale). With scale 0 the input
    is returned unchanged (the same tensor).
    """

    def __init__(self, point: InsertionPoint, make_branch, scale: float) -> None:
        super().__init__()
        self.point = point
        # Only a layout with a patch grid (visual tower) gets the spatial branch and CLS pass-through.
        self.layout = point.layout if point.layout is not None and point.layout.grid is not None else None
        self.spatial = self.layout is not None
        self.residual = ScaledResidual(make_branch(self.spatial), scale)
        # What the backbone may skip (Block.keeps_prefix): a spatial adapter passes the CLS tokens
        # through unchanged, a token-wise one treats every token alone.
        self.prefix_passthrough = self.spatial
        self.tokenwise = not self.spatial

    @property
    def branch(self) -> nn.Module:
        return self.residual.branch

    @property
    def scale(self) -> float:
        """The scale used when the forward context gives none (evaluation)."""
        return self.residual.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.residual.scale = float(value)

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        """Tokens ``[B, N, D]`` -> ``[B, N, D]`` in ``x``'s dtype."""
        s = ctx.scale(self.point) if ctx is not None else None
        if s is None:
            s = self.scale
        if s == 0.0:
            return x
        # Outside autocast keep the frozen residual path in at least x's precision (fp32 adapters on a
        # bf16 input compute in fp32); under autocast stay in x's dtype, as the backbone does.
        if torch.is_autocast_enabled(x.device.type):
            compute = x.dtype
        else:
            compute = torch.promote_types(x.dtype, next(self.branch.parameters()).dtype)
        if self.layout is None:
            return self.residual(x.to(compute), scale=s).to(x.dtype)
        p = self.layout.num_prefix
        if x.shape[1] == p:  # only the prefix tokens (the last block's CLS-only tail): passed through
            return self._zero_gradient_edge(x)
        prefix, patches = split_prefix(x, p)
        patches = self.residual(patches.to(compute), scale=s, grid=self.layout.grid).to(x.dtype)
        return torch.cat([prefix, patches], dim=1)

    def _zero_gradient_edge(self, x: Tensor) -> Tensor:
        """``x`` unchanged, tied (times 0) to the branch's trainable weights when gradients are on:
        in the full computation the patch tokens of the last block reach nothing, so these weights
        get an exact zero gradient, and they keep getting one (weight decay and momentum then
        treat them as before) rather than none."""
        params = [w for w in self.branch.parameters() if w.requires_grad]
        if not torch.is_grad_enabled() or not params:
            return x
        return x + (torch.stack([w.sum() for w in params]).sum() * 0.0).to(x.dtype)

    def extra_repr(self) -> str:
        return f"point={self.point.name}, scale={self.scale}"


class HeBAPointAdapter(PointResidual):
    """What HeBA attaches at one insertion point: :class:`PointResidual` with a :class:`HeBABottleneck`
    (depthwise-conv bottleneck on the visual patch grid, linear bottleneck on text tokens)."""

    def __init__(self, point: InsertionPoint, reduction: int = 4, scale: float = 0.025,
                 generator: torch.Generator | None = None) -> None:
        if point.kind not in HEBA_POSITIONS:
            raise ConfigError(f"HeBA adapters go at {list(HEBA_POSITIONS)} points, not at {point.name}")
        super().__init__(point, lambda spatial: HeBABottleneck(point.width, spatial=spatial, reduction=reduction,
                                                               generator=generator), scale)

    @property
    def bottleneck(self) -> HeBABottleneck:
        return self.residual.branch  # type: ignore[return-value]


def build_heba_adapters(
    model: CLIPModel,
    layers: Iterable[int],
    towers: Sequence[str] = ("visual", "text"),
    positions: Sequence[str] = HEBA_POSITIONS,
    reduction: int = 4,
    scale: float = 0.025,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> nn.ModuleDict:
    """Create (not attach) one :class:`HeBAPointAdapter` per selected insertion point.

    Args:
        model: the frozen backbone; only its insertion points are read.
        layers: **1-based** block indices as in the reference config (``ADAPTER_START..ADAPTER_END``),
            e.g. ``range(1, 13)`` for blocks 1..12; block ``l`` is ``InsertionPoint.layer == l - 1``.
        towers: ``"visual"`` and/or ``"text"``.
        positions: ``"attn_in"`` and/or ``"mlp_hidden"``.
        reduction: bottleneck width ``D / reduction`` (4 in HeBA).
        scale: the adapters' own scale, used when the forward context provides none (evaluation).
        device: where the adapters live; default: the backbone's device.
        dtype: the adapters' dtype; fp32 by default whatever the backbone's (fp32 master weights).
        generator: draws every initial weight; default the global RNG.

    Returns:
        ``nn.ModuleDict`` keyed by :func:`adapter_key`, in tower / block / position order; each module
        knows its point (``module.point``).
    """
    layers = sorted(set(layers))
    if not layers:
        raise ConfigError("HeBA needs at least one adapter layer (1-based block indices)")
    bad_positions = [p for p in positions if p not in HEBA_POSITIONS]
    if bad_positions:
        raise ConfigError(f"unknown HeBA adapter position(s) {bad_positions}; choose from {list(HEBA_POSITIONS)}")
    adapters = nn.ModuleDict()
    for tower in dict.fromkeys(towers):
        if tower not in ("visual", "text"):
            raise ConfigError(f"unknown tower {tower!r}; choose from ['visual', 'text']")
        n = model.num_layers(tower)
        out_of_range = [l for l in layers if not 1 <= l <= n]
        if out_of_range:
            raise ConfigError(
                f"HeBA adapter layers are 1-based block indices; the {tower} tower has blocks 1..{n}, "
                f"not {out_of_range}"
            )
        for point in model.insertion_points(tower, layers=[l - 1 for l in layers]):
            if point.kind in positions:
                adapters[adapter_key(point)] = HeBAPointAdapter(point, reduction, scale, generator)
    if device is None:
        device = model.logit_scale.device
    return adapters.to(device=device, dtype=dtype)


# The shared plumbing under HeBA's earlier names.
attach_adapters = attach_modules
detach_adapters = detach_modules
