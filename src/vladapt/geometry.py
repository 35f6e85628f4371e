"""Hyperbolic geometry for embedding hierarchies: the Lorentz model, the Poincaré ball and a switch.

This module is method-agnostic (it depends on torch only). It provides the operations a
hyperbolic adapter needs: lifting Euclidean features onto the hyperbolic space, geodesic
distances, and entailment cones (a "parent" point whose cone should contain its "children").

Conventions
-----------
* The space has constant curvature ``-c`` with ``c > 0``. ``c`` is a positive Python float or a
  0-dim tensor (for a learnable curvature, see :class:`Curvature`).
* **Lorentz model** (the conventions of MERU, Desai et al. 2023): a point is stored by its space
  components ``x [..., D]`` only. Its time component is implicit, ``x_time = sqrt(1/c + |x|^2)``,
  so every stored vector is a point of the hyperboloid ``<x, x>_L = -1/c`` and the origin is
  ``x = 0``. Tangent vectors at the origin have a zero time component and are given by their
  space components ``v [..., D]``; :func:`exp_map0` sends ``v`` to the point at geodesic distance
  ``|v|`` from the origin in the direction of ``v``.
* **Poincaré ball**: a point is ``p [..., D]`` with ``|p| < 1/sqrt(c)``. It is isometric to the
  Lorentz model through :func:`lorentz_to_poincare` / :func:`poincare_to_lorentz`. Its standard
  exponential map at the origin, :func:`poincare_exp_map0`, moves a distance ``2 |v|`` (the ball's
  metric is ``4 / (1 - c|p|^2)^2`` times the Euclidean one, i.e. 4 at the origin), so
  ``poincare_exp_map0(v) == lorentz_to_poincare(exp_map0(2 v))``.
* Shapes: ``[..., D]`` inputs broadcast against each other; distances and angles drop the last
  dimension (``[...]``); ``pairwise_*`` functions map ``[..., N, D]`` and ``[..., M, D]`` to
  ``[..., N, M]``.

Precision
---------
Every public function runs with autocast disabled and computes in float32: float16/bfloat16 inputs
(and a lower-precision curvature) are upcast, and the result is float32. Float64 inputs stay
float64 (so the functions can be checked with ``torch.autograd.gradcheck``). The pairwise
distances accumulate their inner products in float64 (except on MPS, which has no float64): these
inner products cancel for nearly parallel points far from the origin.

The formulas are rearranged, without changing their value, so that float32 keeps them accurate
where the textbook forms cancel catastrophically:

* the distance uses the hyperbolic law of cosines written with non-negative terms only,
  ``sinh^2(sqrt(c) d / 2) = sinh^2((r_x - r_y) / 2) + c |x||y| (1 - cos θ) / 2`` with
  ``r = asinh(sqrt(c) |x|)`` and ``θ`` the angle between the space components, instead of
  ``acosh(-c <x, y>_L)`` (whose argument is a difference of two numbers of size ``c |x||y|``), so
  ``dist(x, x)`` is exactly 0 and ``dist(x, y) == dist(y, x)`` bit for bit at any norm;
* the log map uses ``asinh(sqrt(c)|x|)`` in place of the equal ``acosh(sqrt(1 + c|x|^2))``, whose
  argument rounds to 1 near the origin (mapping small points to 0) and where ``acosh``'s
  derivative is infinite;
* the exterior angle of the entailment cone is computed as ``atan2(sin, cos)`` of the angle
  between the radial direction at the parent and the direction towards the child, both written
  without differences of large numbers, instead of ``acos`` of the closed form in which
  ``1 - c x_time^2`` cancels; a child on the parent's ray then gets an angle of ~1e-6 rad, where
  the closed form in float32 gives up to ~1e-2 rad at depth ``sqrt(c)|v| = 1`` and ~0.15 rad at
  depth 5 -- wider than the cone, i.e. a spurious entailment loss.

Numerical guards (each one's reason is given where it is applied):

=====================  ============  ====================================================================
constant               value         guards
=====================  ============  ====================================================================
``SINH_INPUT_MAX``     asinh(2^15)   the exp map saturates at ``|x| = 2^15 / sqrt(c)`` (as MERU does)
``MIN_NORM``           1e-15         floor of every norm used as a divisor (its square is still a
                                     normal float32, so the divisions' gradients stay finite), and of
                                     ``t`` in ``sinh(t)/t``, ``asinh(t)/t``, ``tanh(t)/t``, ``atanh(t)/t``:
                                     no 0/0 at the origin, where these ratios already round to their
                                     limit 1 (so the maps' Jacobian at the origin is the identity)
``ASIN_EPS``           1e-6          the arcsin argument of the half-aperture stays in
                                     ``[eps, 1 - eps]``, so the aperture is in the open interval
                                     ``(0, pi/2)``; 1 - 1e-8 would round to 1 in float32
``BALL_EPS``           1e-5          Poincaré points are kept at ``|p| <= (1 - eps) / sqrt(c)``
=====================  ============  ====================================================================

Where a direction is needed (the exterior angle, the unit vectors inside the distance), a point with
``|x| < MIN_NORM`` counts as the origin. Square roots of quantities that can be exactly 0 (distances
of coincident points) use a zero subgradient there instead of the infinite derivative of ``sqrt``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable
from typing import Literal, TypeVar, cast

import torch
from torch import Tensor, nn

from vladapt.errors import ConfigError

__all__ = [
    "ASIN_EPS",
    "BALL_EPS",
    "MIN_NORM",
    "SINH_INPUT_MAX",
    "Curvature",
    "FeatureScale",
    "GeometryKind",
    "LogScalar",
    "Manifold",
    "clip_norm",
    "dist",
    "entailment_loss",
    "exp_map0",
    "half_aperture",
    "hyperboloid_coords",
    "log_map0",
    "lorentz_inner",
    "lorentz_time",
    "lorentz_to_poincare",
    "oxy_angle",
    "pairwise_dist",
    "poincare_dist",
    "poincare_exp_map0",
    "poincare_log_map0",
    "poincare_pairwise_dist",
    "poincare_to_lorentz",
    "scalar_parameters",
]

SINH_INPUT_MAX: float = math.asinh(2.0**15)
MIN_NORM: float = 1e-15
ASIN_EPS: float = 1e-6
BALL_EPS: float = 1e-5

Curv = float | Tensor
_F = TypeVar("_F", bound=Callable[..., Tensor])


# --------------------------------------------------------------------------- precision plumbing
def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _float_math(fn: _F) -> _F:
    """Run ``fn`` with autocast off and its tensor arguments in float32 (float64 if any is float64).

    Also checks that a Python-number curvature argument ``c`` is positive (a tensor curvature is
    not checked: reading its value would synchronise with the device).
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        tensors = [v for v in bound.arguments.values() if isinstance(v, Tensor)]
        c = bound.arguments.get("c")
        if c is not None and not isinstance(c, Tensor) and not c > 0:
            raise ConfigError(f"the curvature parameter c must be positive (the space has curvature -c), got {c!r}")
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        for name, value in bound.arguments.items():
            if isinstance(value, Tensor):
                bound.arguments[name] = value.to(dtype)
        with contextlib.ExitStack() as stack:
            for device_type in {t.device.type for t in tensors}:
                stack.enter_context(_autocast_off(device_type))
            return fn(*bound.args, **bound.kwargs)

    return cast(_F, wrapper)


def _wide(t: Tensor) -> Tensor:
    # Accumulation dtype for inner products that cancel: float64 wherever the device has it.
    return t if t.device.type == "mps" else t.to(torch.float64)


# --------------------------------------------------------------------------- small helpers
def _sq(x: Tensor) -> Tensor:
    """``|x|^2`` over the last dim, kept: ``[..., D] -> [..., 1]``."""
    return (x * x).sum(dim=-1, keepdim=True)


def _norm(x: Tensor) -> Tensor:
    """``|x|`` over the last dim, kept: ``[..., D] -> [..., 1]`` (zero subgradient at 0)."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _unit(x: Tensor, norm: Tensor) -> Tensor:
    """``x / |x|``, or 0 for ``|x| < MIN_NORM``: such a point counts as the origin, which has no
    direction (dividing by a smaller norm would make the gradient overflow)."""
    return torch.where(norm < MIN_NORM, torch.zeros_like(x), x / norm.clamp_min(MIN_NORM))


def _safe_sqrt(s: Tensor) -> Tensor:
    """``sqrt(max(s, 0))`` whose gradient is 0 (not infinite) where ``s <= 0``."""
    positive = s > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, s, torch.ones_like(s))), torch.zeros_like(s))


def _nonneg(s: Tensor) -> Tensor:
    """``max(s, 0)`` for quantities that are >= 0 in exact arithmetic (rounding can make them slightly
    negative); unlike ``clamp_min`` it passes the gradient at exactly 0, which is where the distance
    from the origin gets its gradient."""
    return torch.where(s < 0, torch.zeros_like(s), s)


def _sqrt_c(c: Curv) -> Curv:
    return c**0.5


def _ratio_at(f: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """``f(t) / t`` for an odd ``f`` with ``f'(0) = 1`` (sinh, asinh, tanh, atanh), with ``t`` floored at
    ``MIN_NORM``: below it the ratio equals its limit 1 to far better than float32 precision (the
    next term is ``t^2 / 6``) and its derivative is 0, so there is no 0/0 at the origin."""
    t = t.clamp_min(MIN_NORM)
    return f(t) / t


def _atan2_nonneg(sin_part: Tensor, cos_part: Tensor) -> Tensor:
    """Angle in ``[0, pi]`` from ``(k sin, k cos)`` with any ``k > 0`` and ``sin_part >= 0``.

    Both parts are divided by the larger magnitude first, so the backward pass (``1 / (x^2 + y^2)``)
    cannot overflow; ``(0, 0)`` (coincident points) gives the angle 0 with a finite gradient.
    """
    scale = torch.maximum(sin_part.abs(), cos_part.abs())
    degenerate = scale == 0
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    cos_n = torch.where(degenerate, torch.ones_like(cos_part), cos_part / scale)
    return torch.atan2(sin_part / scale, cos_n)


@_float_math
def clip_norm(v: Tensor, max_norm: float) -> Tensor:
    """Shrink ``v [..., D]`` to norm at most ``max_norm`` (feature clipping before an exp map,
    which keeps Poincaré points away from the boundary where the ball saturates)."""
    if not max_norm > 0:
        raise ConfigError(f"clip_norm: max_norm must be positive, got {max_norm!r}")
    return v * (max_norm / _norm(v).clamp_min(MIN_NORM)).clamp(max=1.0)


# --------------------------------------------------------------------------- Lorentz model
@_float_math
def lorentz_time(x: Tensor, c: Curv = 1.0) -> Tensor:
    """Time component ``sqrt(1/c + |x|^2)`` of the Lorentz point with space components ``x [..., D]``; ``[...]``."""
    return torch.sqrt(1.0 / c + _sq(x)).squeeze(-1)


@_float_math
def hyperboloid_coords(x: Tensor, c: Curv = 1.0) -> Tensor:
    """Full Minkowski coordinates ``[..., 1 + D]`` (time first) of the points ``x [..., D]``."""
    return torch.cat([lorentz_time(x, c).unsqueeze(-1), x], dim=-1)


@_float_math
def lorentz_inner(x: Tensor, y: Tensor, c: Curv = 1.0) -> Tensor:
    """Lorentzian inner product ``<x, y>_L = <x_s, y_s> - x_time y_time`` of points ``[..., D]``; ``[...]``.

    ``<x, x>_L = -1/c`` for every point. This is the raw product: for points far from the origin
    its two terms nearly cancel, which is why :func:`dist` does not use it.
    """
    return (x * y).sum(dim=-1) - lorentz_time(x, c) * lorentz_time(y, c)


@_float_math
def exp_map0(v: Tensor, c: Curv = 1.0) -> Tensor:
    """Exponential map at the origin: tangent vectors ``v [..., D]`` -> points ``[..., D]`` (space components).

    ``x = sinh(sqrt(c)|v|) / (sqrt(c)|v|) * v``: the point at geodesic distance ``|v|`` from the
    origin along ``v``. The sinh input is capped at ``SINH_INPUT_MAX`` (``|x| <= 2^15 / sqrt(c)``,
    i.e. distances above ``asinh(2^15) / sqrt(c) ~ 11.09 / sqrt(c)`` saturate, direction kept) so
    that squares of the coordinates stay far from float32 overflow.
    """
    t = _sqrt_c(c) * _norm(v)
    # beyond the cap only the direction of v matters: sinh(cap) / t shrinks v onto |x| = sinh(cap) / sqrt(c)
    return _ratio_at(lambda tb: torch.sinh(tb.clamp(max=SINH_INPUT_MAX)), t) * v


@_float_math
def log_map0(x: Tensor, c: Curv = 1.0) -> Tensor:
    """Logarithmic map at the origin, inverse of :func:`exp_map0`: points ``[..., D]`` -> tangent vectors ``[..., D]``.

    ``v = asinh(sqrt(c)|x|) / (sqrt(c)|x|) * x``, so ``|v|`` is the distance of ``x`` from the origin.
    """
    t = _sqrt_c(c) * _norm(x)
    return _ratio_at(torch.asinh, t) * x


def _dist_from_parts(radial_gap: Tensor, cross: Tensor, c: Curv) -> Tensor:
    """Distance from the law of cosines: ``radial_gap = r_x - r_y`` (with ``r = asinh(sqrt(c)|x|)``) and
    ``cross = |x||y| (1 - cos θ) >= 0``."""
    s = torch.sinh(radial_gap / 2.0) ** 2 + c * cross / 2.0
    return 2.0 / _sqrt_c(c) * torch.asinh(_safe_sqrt(s))


@_float_math
def dist(x: Tensor, y: Tensor, c: Curv = 1.0) -> Tensor:
    """Geodesic distance between Lorentz points ``x, y [..., D]`` (broadcast); ``[...]``.

    Equal to ``acosh(-c <x, y>_L) / sqrt(c)``, computed as the hyperbolic law of cosines in the
    triangle origin-x-y (see the module docstring): exactly 0 for ``x == y`` and exactly symmetric.
    """
    ax, ay = _norm(x), _norm(y)
    ux, uy = _unit(x, ax), _unit(y, ay)
    radial_gap = torch.asinh(_sqrt_c(c) * ax) - torch.asinh(_sqrt_c(c) * ay)
    cos = (ux * uy).sum(dim=-1, keepdim=True)
    # |x||y|(1 - cos θ) two ways: through the difference of the unit vectors when they are close
    # (1 - cos θ would cancel), and as |x||y| - <x, y> otherwise -- the latter also gives the right
    # gradient when x or y is exactly the origin (where the unit vector is undefined).
    cross_close = ax * ay * _sq(ux - uy) / 2.0
    cross_far = _nonneg(ax * ay - (x * y).sum(dim=-1, keepdim=True))
    cross = torch.where(cos > 0.5, cross_close, cross_far)
    return _dist_from_parts(radial_gap, cross, c).squeeze(-1)


@_float_math
def pairwise_dist(x: Tensor, y: Tensor, c: Curv = 1.0) -> Tensor:
    """Geodesic distances between every ``x [..., N, D]`` and every ``y [..., M, D]``; ``[..., N, M]``.

    Same formula as :func:`dist`, with ``|x||y| - <x, y>`` from one matrix product accumulated in
    float64 (float32 on MPS), so memory stays ``O(N M)``. Unlike :func:`dist`, a point's distance to
    itself is not exactly 0 but of the order of ``1e-8 |x|`` (``1e-3 |x|`` on MPS): use :func:`dist`
    where nearly coincident points far from the origin matter.
    """
    ax, ay = _norm(x), _norm(y)
    radial_gap = torch.asinh(_sqrt_c(c) * ax) - torch.asinh(_sqrt_c(c) * ay).transpose(-1, -2)
    xw, yw = _wide(x), _wide(y)
    cross = _norm(xw) * _norm(yw).transpose(-1, -2) - xw @ yw.transpose(-1, -2)
    return _dist_from_parts(radial_gap, _nonneg(cross).to(x.dtype), c)


@_float_math
def half_aperture(x: Tensor, c: Curv = 1.0, min_radius: float = 0.1) -> Tensor:
    """Half-aperture of the entailment cone at the Lorentz points ``x [..., D]``; ``[...]``, in ``(0, pi/2)``.

    ``asin(2 K / (sqrt(c) |x|))`` with ``K = min_radius``: wide near the origin, narrowing with
    depth. Inside the radius ``2 K / sqrt(c)`` the arcsin argument would exceed 1; like everywhere
    it is clamped to ``[ASIN_EPS, 1 - ASIN_EPS]``, which keeps the result strictly inside
    ``(0, pi/2)`` and the derivative finite.
    """
    arg = 2.0 * min_radius / (_sqrt_c(c) * _norm(x)).clamp_min(MIN_NORM)
    return torch.asin(arg.clamp(ASIN_EPS, 1.0 - ASIN_EPS)).squeeze(-1)


@_float_math
def oxy_angle(x: Tensor, y: Tensor, c: Curv = 1.0) -> Tensor:
    """Exterior angle at ``x`` of the triangle origin-x-y, Lorentz points ``x, y [..., D]``; ``[...]`` in ``[0, pi]``.

    It is the angle at ``x`` between the ray from the origin through ``x`` (continued past ``x``)
    and the geodesic from ``x`` to ``y``: 0 when ``y`` lies further out on the ray of ``x``, ``pi``
    when it lies between the origin and ``x``. Its closed form (MERU, hyperbolic law of cosines) is
    ``acos((y_t + c<x,y>_L x_t) / (|x| sqrt((c<x,y>_L)^2 - 1)))``. Here the same angle is
    ``atan2(sin, cos)`` with, up to a common positive factor,
    ``sin ∝ q`` (law of sines; ``q`` = distance of ``y`` from the line through ``x``) and
    ``cos ∝ sqrt(c) (x_t p - y_t |x|)`` (``p`` = component of ``y`` along ``x``). When ``p > 0`` the
    difference ``x_t p - y_t |x|`` is rationalised (multiplied by ``x_t p + y_t |x|`` on both parts)
    so that it is computed from the small offsets ``y - x`` rather than by cancelling large terms.

    Conventions at degenerate inputs: ``y == x`` gives 0 (a point lies in its own cone); ``x`` at
    the origin (``|x| < MIN_NORM``) gives ``pi/2``, as there is no radial direction. Near the origin
    the gradient with respect to ``x`` grows like ``1 / |x|``, as the angle's own derivative does.
    """
    sqrt_c = _sqrt_c(c)
    a = _norm(x)
    ux = _unit(x, a)
    offset = y - x
    delta = (ux * offset).sum(dim=-1, keepdim=True)  # p - |x|: how far y lies past x along the ray
    q = _norm(offset - delta * ux)  # |y - p ux|, computed from the offset so that y == x gives exactly 0
    p = a + delta
    x_t = torch.sqrt(1.0 / c + _sq(x))
    y_t = torch.sqrt(1.0 / c + _sq(y))
    ahead = p > 0
    # p > 0: (x_t p - y_t a)(x_t p + y_t a) = (p^2 - a^2)/c - q^2 a^2 and p^2 - a^2 = delta (p + a).
    sin_ahead = q * (x_t * p + y_t * a)
    cos_ahead = delta * (p + a) / sqrt_c - sqrt_c * (q * a) ** 2
    # p <= 0: both terms of x_t p - y_t a are <= 0, nothing cancels.
    sin_behind = q
    cos_behind = sqrt_c * (x_t * p - y_t * a)
    angle = _atan2_nonneg(torch.where(ahead, sin_ahead, sin_behind), torch.where(ahead, cos_ahead, cos_behind))
    return angle.squeeze(-1)


@_float_math
def entailment_loss(parent: Tensor, child: Tensor, c: Curv = 1.0, min_radius: float = 0.1) -> Tensor:
    """Entailment-cone loss "parent entails child", Lorentz points ``[..., D]`` (broadcast); ``[...]``, not reduced.

    ``relu(oxy_angle(parent, child) - half_aperture(parent))``: 0 when the child lies inside the
    cone rooted at the parent, else the angle by which it falls outside. Average it yourself.
    """
    return torch.relu(oxy_angle(parent, child, c) - half_aperture(parent, c, min_radius))


# --------------------------------------------------------------------------- Poincaré ball
def _ball_project(p: Tensor, c: Curv) -> Tensor:
    """Pull points back inside the ball of radius ``(1 - BALL_EPS) / sqrt(c)``: on the boundary the
    ball's conformal factor ``1 / (1 - c|p|^2)`` is infinite (and float32 rounds ``tanh`` to 1 for
    arguments above ~9, which would put exp-mapped points exactly there)."""
    max_norm = (1.0 - BALL_EPS) / _sqrt_c(c)
    return p * (max_norm / _norm(p).clamp_min(MIN_NORM)).clamp(max=1.0)


@_float_math
def poincare_exp_map0(v: Tensor, c: Curv = 1.0) -> Tensor:
    """Exponential map at the origin of the Poincaré ball: tangent vectors ``v [..., D]`` -> points ``[..., D]``.

    ``p = tanh(sqrt(c)|v|) v / (sqrt(c)|v|)``, kept inside the ball (``BALL_EPS``). The point lies
    at distance ``2|v|`` from the origin (the ball's metric is 4x the Euclidean one there).
    """
    t = _sqrt_c(c) * _norm(v)
    return _ball_project(_ratio_at(torch.tanh, t) * v, c)


@_float_math
def poincare_log_map0(p: Tensor, c: Curv = 1.0) -> Tensor:
    """Logarithmic map at the origin of the Poincaré ball, the inverse of :func:`poincare_exp_map0`; ``[..., D]``.

    ``v = atanh(sqrt(c)|p|) p / (sqrt(c)|p|)``; points on or beyond the boundary are first pulled
    inside (``BALL_EPS``), so the result is finite.
    """
    p = _ball_project(p, c)
    t = _sqrt_c(c) * _norm(p)
    return _ratio_at(torch.atanh, t) * p


def _poincare_dist_from_parts(sq_gap: Tensor, conf_x: Tensor, conf_y: Tensor, c: Curv) -> Tensor:
    # cosh(sqrt(c) d) = 1 + 2 c |x - y|^2 / ((1 - c|x|^2)(1 - c|y|^2)), i.e.
    # sinh^2(sqrt(c) d / 2) = c |x - y|^2 / ((1 - c|x|^2)(1 - c|y|^2)): no acosh near 1, no Möbius sum.
    return 2.0 / _sqrt_c(c) * torch.asinh(_safe_sqrt(c * sq_gap / (conf_x * conf_y)))


@_float_math
def poincare_dist(x: Tensor, y: Tensor, c: Curv = 1.0) -> Tensor:
    """Geodesic distance between Poincaré points ``x, y [..., D]`` (broadcast); ``[...]``.

    Equal to ``(2 / sqrt(c)) artanh(sqrt(c) |(-x) ⊕_c y|)`` (Möbius addition), computed from
    ``|x - y|^2`` (see the comment inside), so ``poincare_dist(x, x)`` is exactly 0. Points on or
    beyond the boundary are first pulled inside (``BALL_EPS``).
    """
    x, y = _ball_project(x, c), _ball_project(y, c)
    conf_x = (1.0 - c * _sq(x)).clamp_min(MIN_NORM)
    conf_y = (1.0 - c * _sq(y)).clamp_min(MIN_NORM)
    return _poincare_dist_from_parts(_sq(x - y), conf_x, conf_y, c).squeeze(-1)


@_float_math
def poincare_pairwise_dist(x: Tensor, y: Tensor, c: Curv = 1.0) -> Tensor:
    """Poincaré distances between every ``x [..., N, D]`` and every ``y [..., M, D]``; ``[..., N, M]``.

    ``|x - y|^2 = |x|^2 + |y|^2 - 2<x, y>`` comes from one matrix product accumulated in float64
    (float32 on MPS), so memory stays ``O(N M)``.
    """
    x, y = _ball_project(x, c), _ball_project(y, c)
    conf_x = (1.0 - c * _sq(x)).clamp_min(MIN_NORM)
    conf_y = (1.0 - c * _sq(y)).clamp_min(MIN_NORM).transpose(-1, -2)
    xw, yw = _wide(x), _wide(y)
    sq_gap = _nonneg(_sq(xw) + _sq(yw).transpose(-1, -2) - 2.0 * xw @ yw.transpose(-1, -2))
    return _poincare_dist_from_parts(sq_gap.to(x.dtype), conf_x, conf_y, c)


@_float_math
def lorentz_to_poincare(x: Tensor, c: Curv = 1.0) -> Tensor:
    """Isometry from the Lorentz model (space components ``[..., D]``) to the ball, ``x / (1 + sqrt(c) x_time)``."""
    sqrt_c_time = torch.sqrt(1.0 + c * _sq(x))  # sqrt(c) * x_time
    return _ball_project(x / (1.0 + sqrt_c_time), c)


@_float_math
def poincare_to_lorentz(p: Tensor, c: Curv = 1.0) -> Tensor:
    """Inverse of :func:`lorentz_to_poincare`: ``2 p / (1 - c|p|^2)`` (space components ``[..., D]``).

    Points on or beyond the boundary are first pulled inside (``BALL_EPS``), so ``|x|`` stays below
    about ``1 / (BALL_EPS sqrt(c))``.
    """
    p = _ball_project(p, c)
    return 2.0 * p / (1.0 - c * _sq(p)).clamp_min(MIN_NORM)


# --------------------------------------------------------------------------- Euclidean counterparts (for the switch)
@_float_math
def _euclidean_dist(x: Tensor, y: Tensor) -> Tensor:
    return _safe_sqrt(_sq(x - y)).squeeze(-1)


@_float_math
def _euclidean_pairwise_dist(x: Tensor, y: Tensor) -> Tensor:
    xw, yw = _wide(x), _wide(y)
    sq_gap = _sq(xw) + _sq(yw).transpose(-1, -2) - 2.0 * xw @ yw.transpose(-1, -2)
    return _safe_sqrt(sq_gap.to(x.dtype))


@_float_math
def _euclidean_entailment_loss(parent: Tensor, child: Tensor, min_radius: float = 0.1) -> Tensor:
    # Euclidean cone (Ganea et al. 2018) with the same 2K as the hyperbolic one, so that all three
    # geometries agree near the origin, where the hyperbolic space is nearly flat: the exterior angle
    # at the parent between its ray and the segment to the child, against asin(2K / |parent|).
    a = _norm(parent)
    ux = _unit(parent, a)
    offset = child - parent
    along = (ux * offset).sum(dim=-1, keepdim=True)
    angle = _atan2_nonneg(_norm(offset - along * ux), along)
    aperture = torch.asin((2.0 * min_radius / a.clamp_min(MIN_NORM)).clamp(ASIN_EPS, 1.0 - ASIN_EPS))
    return torch.relu(angle - aperture).squeeze(-1)


@_float_math
def _lorentz_depth(x: Tensor, c: Curv) -> Tensor:
    return (torch.asinh(_sqrt_c(c) * _norm(x)) / _sqrt_c(c)).squeeze(-1)


@_float_math
def _poincare_depth(p: Tensor, c: Curv) -> Tensor:
    p = _ball_project(p, c)
    return (2.0 / _sqrt_c(c) * torch.atanh(_sqrt_c(c) * _norm(p))).squeeze(-1)


# --------------------------------------------------------------------------- learnable scalars
class LogScalar(nn.Module):
    """A positive scalar stored as its logarithm (float32 parameter ``log_value``), kept in ``[min_value, max_value]``.

    The bound is enforced by projection, as MERU does: :meth:`value` first clamps the parameter in
    place (through ``.data``, so no autograd history is recorded and graphs built earlier in the step
    stay valid), then returns ``exp(log_value)``. An optimiser step that overshoots a bound is thus
    undone at the next use, and the gradient at the bound still flows, so the value can move back
    inside. Such scalars should take no weight decay (see :func:`scalar_parameters`).
    """

    def __init__(self, init: float, min_value: float | None = None, max_value: float | None = None,
                 learnable: bool = True) -> None:
        super().__init__()
        if not init > 0:
            raise ConfigError(f"{type(self).__name__}: the initial value must be positive, got {init!r}")
        for name, bound in (("min_value", min_value), ("max_value", max_value)):
            if bound is not None and not bound > 0:
                raise ConfigError(f"{type(self).__name__}: {name} must be positive, got {bound!r}")
        if not (min_value or 0.0) <= init <= (max_value or math.inf):
            raise ConfigError(f"{type(self).__name__}: the initial value {init} lies outside "
                              f"[{min_value}, {max_value}]")
        self.log_value = nn.Parameter(torch.tensor(math.log(init), dtype=torch.float32), requires_grad=learnable)
        self.min_value = min_value
        self.max_value = max_value

    def project_(self) -> None:
        """Clamp ``log_value`` into ``[log(min_value), log(max_value)]`` in place."""
        lo = None if self.min_value is None else math.log(self.min_value)
        hi = None if self.max_value is None else math.log(self.max_value)
        if lo is not None or hi is not None:
            self.log_value.data.clamp_(min=lo, max=hi)

    def value(self) -> Tensor:
        """The scalar (0-dim tensor, differentiable with respect to ``log_value``)."""
        self.project_()
        return self.log_value.exp()

    def extra_repr(self) -> str:
        return (f"value={math.exp(float(self.log_value.detach())):.4g}, min_value={self.min_value}, "
                f"max_value={self.max_value}, learnable={self.log_value.requires_grad}")


class Curvature(LogScalar):
    """Learnable curvature parameter ``c > 0`` (the space has curvature ``-c``); ``forward() -> c`` (0-dim).

    Defaults follow MERU: ``init = 1`` and the range ``[init / 10, 10 init]``.
    """

    def __init__(self, init: float = 1.0, min_value: float | None = None, max_value: float | None = None,
                 learnable: bool = True) -> None:
        super().__init__(init, init / 10.0 if min_value is None else min_value,
                         init * 10.0 if max_value is None else max_value, learnable)

    def forward(self) -> Tensor:
        return self.value()


class FeatureScale(LogScalar):
    """Learnable scale ``alpha`` applied to one modality's features before the exp map; ``forward(x) = alpha * x``.

    Defaults follow MERU: ``init = 1 / sqrt(dim)`` and ``alpha <= 1`` (the scale may shrink feature
    norms but never enlarge them), no lower bound.
    """

    def __init__(self, dim: int | None = None, init: float | None = None, max_value: float | None = 1.0,
                 min_value: float | None = None, learnable: bool = True) -> None:
        if init is None:
            if dim is None or dim < 1:
                raise ConfigError("FeatureScale needs the feature dimension (init = 1/sqrt(dim)) or an explicit init")
            init = dim**-0.5
        super().__init__(init, min_value, max_value, learnable)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D] -> alpha * x [..., D]`` (float32 ``alpha``: half-precision ``x`` is promoted)."""
        return x * self.value()


def scalar_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The log-parameters of every :class:`LogScalar` (curvatures, feature scales) inside ``module``.

    They are scalars in log space: exclude them from weight decay (decay would pull them towards
    ``log = 0``, i.e. value 1). A module shared by several parents is listed once.
    """
    return [m.log_value for m in module.modules() if isinstance(m, LogScalar)]


# --------------------------------------------------------------------------- the switch
GeometryKind = Literal["lorentz", "poincare", "euclidean"]
_KINDS: tuple[str, ...] = ("lorentz", "poincare", "euclidean")


class Manifold(nn.Module):
    """One geometry behind one interface, so that a method can ablate Lorentz / Poincaré / Euclidean.

    * ``project(v)``: tangent vectors at the origin ``[..., D]`` -> points ``[..., D]``
      (:func:`exp_map0`, :func:`poincare_exp_map0`, identity), after optional feature clipping
      ``|v| <= clip_radius``;
    * ``dist(x, y)``: geodesic distance ``[...]`` (broadcast) and ``pairwise_dist(x, y)``
      ``[..., N, M]``; Euclidean distance for ``"euclidean"``;
    * ``entailment_loss(parent, child)``: the cone loss ``[...]``. The Poincaré version maps both
      points to the Lorentz model (angles and distances to the origin are preserved by the isometry,
      so it is the same cone); the Euclidean version uses flat cones with half-aperture
      ``asin(2 K / |parent|)``.

    The hyperbolic kinds own a :class:`Curvature` (``self.curvature``, a fresh one by default); the
    Euclidean kind has none (and therefore no parameter). Note that for the same ``v`` the standard
    Poincaré exp map lands twice as far from the origin as the Lorentz one (module docstring).
    """

    def __init__(self, kind: GeometryKind = "lorentz", curvature: Curvature | None = None,
                 clip_radius: float | None = None, min_radius: float = 0.1) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ConfigError(f"unknown geometry {kind!r}; choose from {list(_KINDS)}")
        if kind == "euclidean" and curvature is not None:
            raise ConfigError("the euclidean geometry has no curvature; pass curvature=None")
        if clip_radius is not None and not clip_radius > 0:
            raise ConfigError(f"clip_radius must be positive or None, got {clip_radius!r}")
        self.kind: str = kind
        self.curvature: Curvature | None = None if kind == "euclidean" else (curvature or Curvature())
        self.clip_radius = clip_radius
        self.min_radius = min_radius

    def c(self) -> Tensor | None:
        """The current curvature (None for the Euclidean geometry)."""
        return None if self.curvature is None else self.curvature()

    def project(self, v: Tensor) -> Tensor:
        if self.clip_radius is not None:
            v = clip_norm(v, self.clip_radius)
        if self.kind == "lorentz":
            return exp_map0(v, self.c())
        if self.kind == "poincare":
            return poincare_exp_map0(v, self.c())
        return v

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        if self.kind == "lorentz":
            return dist(x, y, self.c())
        if self.kind == "poincare":
            return poincare_dist(x, y, self.c())
        return _euclidean_dist(x, y)

    def pairwise_dist(self, x: Tensor, y: Tensor) -> Tensor:
        if self.kind == "lorentz":
            return pairwise_dist(x, y, self.c())
        if self.kind == "poincare":
            return poincare_pairwise_dist(x, y, self.c())
        return _euclidean_pairwise_dist(x, y)

    def depth(self, x: Tensor) -> Tensor:
        """Distance of the points ``x [..., D]`` from the origin, ``[...]`` (the depth of a node in a
        hierarchy: generic nodes near the origin, specific ones further out)."""
        if self.kind == "lorentz":
            return _lorentz_depth(x, self.c())
        if self.kind == "poincare":
            return _poincare_depth(x, self.c())
        return _norm(x.float()).squeeze(-1)

    def entailment_loss(self, parent: Tensor, child: Tensor) -> Tensor:
        if self.kind == "lorentz":
            return entailment_loss(parent, child, self.c(), self.min_radius)
        if self.kind == "poincare":
            c = self.c()
            return entailment_loss(poincare_to_lorentz(parent, c), poincare_to_lorentz(child, c), c, self.min_radius)
        return _euclidean_entailment_loss(parent, child, self.min_radius)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, clip_radius={self.clip_radius}, min_radius={self.min_radius}"
