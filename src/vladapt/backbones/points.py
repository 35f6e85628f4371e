"""Insertion points, the per-forward context, the gradient-scale operator and the scaled residual.

Methods attach trainable modules to a frozen backbone at named *insertion points* instead of copying
or editing the transformer code (the PEFT idea). Per block of each tower there are five points that
see or replace activations, six points on the block's linear maps, and each tower has one more
point at its output:

``attn_in``
    the input of self-attention, i.e. ``LN1(x)``; width ``D``.
``mlp_hidden``
    the MLP hidden pre-activation, i.e. ``W_fc LN2(x) + b_fc`` (plus any ``mlp_fc`` delta); width
    ``mlp_ratio * D``.
``block``
    parallel to the whole block: the module receives the block input and its output is *added* to
    the block output; width ``D``.
``block_ln1``
    parallel to the whole block like ``block``, but the module receives ``LN1(x)`` (the block's
    own first LayerNorm of its input, before any ``attn_in`` module changes it); its output is
    added to the block output (MMA, RMAdapter); width ``D``.
``block_out``
    the block output (after any parallel branch is added); the module's return value replaces
    it; width ``D``.
``output``
    the final projected embedding of the tower, ``[B, E]``; width ``E``.

Linear-map points (LoRA and other weight deltas): the module receives the *input* of one linear map
of the block, ``[B, N, in_width]``, and returns a *delta* ``[B, N, width]`` that is added to that
map's output, i.e. the map becomes ``W x + b + module(x)`` without copying the block:

``attn_q``, ``attn_k``, ``attn_v``
    the query / key / value slices of the fused in-projection; input: the attention input
    (``LN1(x)`` after any ``attn_in`` module); ``in_width = width = D``.
``attn_out``
    the attention output projection; input: the merged heads before it; ``in_width = width = D``.
``mlp_fc``
    the MLP's first linear map; input: ``LN2(x)``; ``in_width = D``, ``width = mlp_ratio * D``.
``mlp_proj``
    the MLP's second linear map; input: the activation output; ``in_width = mlp_ratio * D``,
    ``width = D``.

An attached module is called as ``module(x, ctx)``; except at the linear-map points it returns a
tensor of the same shape. Token tensors are batch-first ``[B, N, D]``; a point's ``width`` is the
last dimension of what its module returns, ``in_width`` that of what it receives. A visual point's
:class:`TokenLayout` says where the CLS token is and how the patch tokens form a 2-D grid, so a
spatial module can work on the grid and leave CLS untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

Tower = Literal["visual", "text"]
PointKind = Literal["attn_in", "mlp_hidden", "block", "block_ln1", "block_out",
                    "attn_q", "attn_k", "attn_v", "attn_out", "mlp_fc", "mlp_proj", "output"]

TOWERS: tuple[str, ...] = ("visual", "text")
# Points whose module returns a delta added to the output of one of the block's linear maps.
LINEAR_POINT_KINDS: tuple[str, ...] = ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_fc", "mlp_proj")
POINT_KINDS: tuple[str, ...] = ("attn_in", "mlp_hidden", "block", "block_ln1", "block_out",
                                *LINEAR_POINT_KINDS, "output")


@dataclass(frozen=True)
class TokenLayout:
    """Layout of the token axis of one tower.

    ``num_prefix`` tokens (CLS for a ViT) come first; for the visual tower the remaining
    ``grid[0] * grid[1]`` tokens are the patch grid in row-major order, the order in which the
    patch-embedding convolution output is flattened. The text tower has ``grid=None``.
    """

    num_prefix: int
    grid: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int | None:
        if self.grid is None:
            return None
        return self.num_prefix + self.grid[0] * self.grid[1]

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, N, C]`` -> (prefix ``[B, P, C]``, patch grid ``[B, C, H, W]``)."""
        if self.grid is None:
            raise ValueError("this layout has no patch grid (text tower)")
        h, w = self.grid
        b, n, c = x.shape
        if n != self.num_prefix + h * w:
            raise ValueError(f"expected {self.num_prefix + h * w} tokens ({self.num_prefix} prefix + {h}x{w} grid), got {n}")
        prefix = x[:, : self.num_prefix]
        grid = x[:, self.num_prefix :].transpose(1, 2).reshape(b, c, h, w)
        return prefix, grid

    def merge(self, prefix: Tensor, grid: Tensor) -> Tensor:
        """Inverse of :meth:`split`: (``[B, P, C]``, ``[B, C, H, W]``) -> ``[B, N, C]``."""
        b, c, h, w = grid.shape
        return torch.cat([prefix, grid.reshape(b, c, h * w).transpose(1, 2)], dim=1)


@dataclass(frozen=True)
class InsertionPoint:
    """One place of a backbone where a method may attach a module.

    ``width`` is the last dimension of what the module returns; ``in_width`` that of what it
    receives. They differ only at the linear-map points ``mlp_fc`` (``D -> mlp_ratio * D``) and
    ``mlp_proj`` (``mlp_ratio * D -> D``); ``in_width`` defaults to ``width``.
    """

    tower: str
    kind: str
    layer: int | None
    width: int
    layout: TokenLayout | None = None
    in_width: int | None = None

    def __post_init__(self) -> None:
        if self.in_width is None:
            object.__setattr__(self, "in_width", self.width)

    @property
    def name(self) -> str:
        if self.kind == "output":
            return f"{self.tower}.output"
        return f"{self.tower}.blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


ScaleFn = Callable[[str, int], float]


class ForwardContext:
    """State of one forward pass that attached modules may read from and write to.

    * ``scale(point)``: a per-forward scale chosen by the method for the point's (tower, block);
      it is drawn once per block and tower and shared by all points of that block (HeBA/LwEIB
      slow-fast scales), or ``None`` when the method gave no scale function.
    * ``add_aux_loss(point, value)``: per-layer auxiliary losses (e.g. RMAdapter's reconstruction
      loss), read back with :attr:`aux_losses` / :meth:`total_aux_loss`.
    * ``text_valid``: set by the text tower for its blocks, ``[B, N]`` bool, True at the positions
      up to and including each prompt's EOT (the rest is padding), for modules that reduce over tokens.
    * ``cls_only_tail`` (in): whether the image tower's last block may compute only the CLS token
      when its attached modules allow it (default True; see ``Block.keeps_prefix``);
      ``used_cls_only_tail`` (out): whether it did, set by the image tower. A second pass that must
      equal this one bit for bit (a frozen reference pass) sets its ``cls_only_tail`` to it.
    """

    def __init__(self, scale_fn: ScaleFn | None = None) -> None:
        self._scale_fn = scale_fn
        self._scales: dict[tuple[str, int | None], float] = {}
        self.aux_losses: list[tuple[InsertionPoint, Tensor]] = []
        self.text_valid: Tensor | None = None
        self.cls_only_tail = True
        self.used_cls_only_tail: bool | None = None

    def scale(self, point: InsertionPoint) -> float | None:
        if self._scale_fn is None:
            return None
        key = (point.tower, point.layer)
        if key not in self._scales:
            self._scales[key] = float(self._scale_fn(point.tower, -1 if point.layer is None else point.layer))
        return self._scales[key]

    @property
    def scales(self) -> dict[tuple[str, int | None], float]:
        """The scales drawn so far in this forward pass, keyed by (tower, layer)."""
        return dict(self._scales)

    def add_aux_loss(self, point: InsertionPoint, value: Tensor) -> None:
        self.aux_losses.append((point, value))

    def total_aux_loss(self) -> Tensor | None:
        if not self.aux_losses:
            return None
        return torch.stack([v.float() for _, v in self.aux_losses]).sum()


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """GS_scale(x): identity in the forward pass; multiplies the incoming gradient by ``scale``."""
    return _GradScale.apply(x, float(scale))


class _ForwardScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        return y * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def forward_scale(y: Tensor, scale: float) -> Tensor:
    """``GS_{1/s}(s * y)`` in one op: ``s * y`` in the forward pass, while ``y`` receives exactly the
    incoming gradient (the composition would multiply it by ``1/s`` and then by ``s``, two passes
    over the tensor that round to the same value up to the last bit)."""
    return _ForwardScale.apply(y, float(scale))


class _ScaledAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, y: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        return torch.add(h, y, alpha=scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        return grad, grad, None


def scaled_add(h: Tensor, y: Tensor, scale: float) -> Tensor:
    """``h + GS_{1/s}(s * y)`` in one op: ``h + s * y`` forward; ``h`` and ``y`` both receive exactly the
    incoming gradient (:func:`forward_scale` fused with the residual addition)."""
    if h.dtype != y.dtype or h.shape != y.shape:
        return h + forward_scale(y, scale)
    return _ScaledAdd.apply(h, y, float(scale))


class _SplitPrefix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.p, ctx.shape = p, x.shape
        return x[:, :p].clone(), x[:, p:]

    @staticmethod
    def backward(ctx, g_prefix: Tensor | None, g_rest: Tensor | None) -> tuple[Tensor, None]:  # type: ignore[override]
        b, _, *rest = ctx.shape
        like = g_rest if g_rest is not None else g_prefix
        if g_prefix is None:
            g_prefix = like.new_zeros(b, ctx.p, *rest)
        if g_rest is None:
            g_rest = like.new_zeros(b, ctx.shape[1] - ctx.p, *rest)
        return torch.cat([g_prefix, g_rest], dim=1), None


def split_prefix(x: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """``(x[:, :p], x[:, p:])`` of tokens ``[B, N, ...]`` whose backward writes the gradient of ``x``
    once (one concatenation) instead of zero-filling and copying a full-size tensor per part."""
    return _SplitPrefix.apply(x, int(p))


class ScaledResidual(nn.Module):
    """R_s(h) = h + GS_{1/s}(s * B(GS_s(h))) around a branch module B.

    Forward: ``h + s * B(h)``. Backward: B's output receives exactly the upstream gradient, so
    B's parameter gradients do not depend on ``s`` (learning rate and scale are decoupled); the
    gradient that flows back into ``h`` through the branch is ``s * J_B^T g``.
    With ``s == 0`` the branch is skipped and ``h`` is returned unchanged.
    """

    def __init__(self, branch: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.branch = branch
        self.scale = float(scale)

    def forward(self, h: Tensor, *args, scale: float | None = None, **kwargs) -> Tensor:
        s = self.scale if scale is None else float(scale)
        if s == 0.0:
            return h
        return scaled_add(h, self.branch(grad_scale(h, s), *args, **kwargs), s)
