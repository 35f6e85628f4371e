"""vladapt.geometry: Lorentz model, Poincaré ball, entailment cones, learnable scalars, the geometry switch.

Most checks are properties over random inputs (hypothesis draws seeds, dimensions, norms and
curvatures; torch draws the directions). References are computed independently in float64: the
textbook closed forms (acosh of the Lorentzian product, Möbius addition, tangent-vector angles in
Minkowski coordinates, right-triangle trigonometry), never by calling the module under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vladapt.geometry as G
from vladapt.errors import ConfigError

FAST = settings(max_examples=25, deadline=None)

seeds = st.integers(0, 2**16)
dims = st.integers(1, 12)
curvatures = st.floats(0.1, 10.0)
# "depth" R = sqrt(c) |v| of a tangent vector, the argument of sinh in the exp map (saturates at ~11.09)
depths = st.floats(0.0, 10.0)


def _directions(seed: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=g)
    return u / u.norm(dim=-1, keepdim=True)


def _tangents(seed: int, n: int, d: int, max_depth: float, c: float) -> torch.Tensor:
    """n tangent vectors with depths sqrt(c)|v| spread over [0, max_depth] (one exactly 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    depth = torch.rand(n, 1, generator=g) * max_depth
    depth[0] = 0.0
    return _directions(seed, n, d) * depth / math.sqrt(c)


# --------------------------------------------------------------------------- float64 references
def ref_time(x: torch.Tensor, c: float) -> torch.Tensor:
    x = x.double()
    return torch.sqrt(1.0 / c + (x * x).sum(-1))


def ref_lorentz_dist(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    x, y = x.double(), y.double()
    inner = (x * y).sum(-1) - ref_time(x, c) * ref_time(y, c)
    return torch.acosh((-c * inner).clamp_min(1.0)) / math.sqrt(c)


def ref_oxy_angle(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Angle between two tangent vectors at X in full Minkowski coordinates: towards Y and away from the origin O."""
    x, y = x.double(), y.double()

    def full(p):
        return torch.cat([ref_time(p, c).unsqueeze(-1), p], dim=-1)

    def mink(a, b):
        return (a[..., 1:] * b[..., 1:]).sum(-1) - a[..., 0] * b[..., 0]

    X, Y = full(x), full(y)
    O = torch.zeros_like(X)
    O[..., 0] = 1.0 / math.sqrt(c)
    # tangent projection at X of a point P: P + c <X, P> X  (Lorentz-orthogonal to X)
    to_y = Y + c * mink(X, Y).unsqueeze(-1) * X
    away = -(O + c * mink(X, O).unsqueeze(-1) * X)
    cos = mink(to_y, away) / torch.sqrt(mink(to_y, to_y) * mink(away, away))
    return torch.acos(cos.clamp(-1.0, 1.0))


def ref_mobius_dist(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    x, y = x.double(), y.double()
    mx = -x
    xy = (mx * y).sum(-1, keepdim=True)
    x2, y2 = (mx * mx).sum(-1, keepdim=True), (y * y).sum(-1, keepdim=True)
    num = (1 + 2 * c * xy + c * y2) * mx + (1 - c * x2) * y
    den = 1 + 2 * c * xy + c**2 * x2 * y2
    return 2 / math.sqrt(c) * torch.atanh(math.sqrt(c) * (num / den).norm(dim=-1))


# --------------------------------------------------------------------------- Lorentz: exp / log maps
@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_exp_map0_lands_on_the_hyperboloid_at_distance_norm_v(seed, d, c):
    v = _tangents(seed, 64, d, 14.0, c)  # past the sinh cap too
    x = G.exp_map0(v, c)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    full = G.hyperboloid_coords(x, c).double()
    constraint = (full[:, 1:] ** 2).sum(-1) - full[:, 0] ** 2
    scale = float(full[:, 0].max()) ** 2  # float32 time components: relative rounding of x_time^2
    assert torch.allclose(constraint, torch.full_like(constraint, -1.0 / c), rtol=0, atol=1e-6 * scale)
    assert (full[:, 0] > 0).all()  # upper sheet
    # closed form: the exp map travels |v| from the origin (capped at asinh(2^15)/sqrt(c)) along v
    expected = (v.double().norm(dim=-1)).clamp(max=G.SINH_INPUT_MAX / math.sqrt(c))
    from_origin = ref_lorentz_dist(torch.zeros_like(x), x, c)
    assert torch.allclose(from_origin, expected, rtol=1e-5, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(x[1:].double(), v[1:].double(), dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
    assert torch.equal(x[0], torch.zeros(d))


@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_log_map0_and_exp_map0_invert_each_other(seed, d, c):
    v = _tangents(seed, 64, d, 11.0, c)  # below the cap asinh(2^15) ~ 11.09
    assert torch.allclose(G.log_map0(G.exp_map0(v, c), c), v, rtol=1e-4, atol=1e-6)
    # the other way round, for points with space norms from 0 to 1e4
    g = torch.Generator().manual_seed(seed)
    x = _directions(seed, 64, d) * torch.logspace(-8, 4, 64).unsqueeze(-1)
    x = x[torch.randperm(64, generator=g)]
    assert torch.allclose(G.exp_map0(G.log_map0(x, c), c), x, rtol=1e-4, atol=1e-12)


# --------------------------------------------------------------------------- Lorentz: distances
@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_dist_is_symmetric_non_negative_and_zero_on_the_diagonal(seed, d, c):
    x = G.exp_map0(_tangents(seed, 48, d, 12.0, c), c)
    y = G.exp_map0(_tangents(seed + 7, 48, d, 12.0, c), c)
    z = G.exp_map0(_tangents(seed + 9, 48, d, 12.0, c), c)
    dxy, dyx = G.dist(x, y, c), G.dist(y, x, c)
    assert torch.isfinite(dxy).all() and (dxy >= 0).all()
    assert torch.equal(dxy, dyx)  # bit for bit
    assert torch.equal(G.dist(x, x, c), torch.zeros(48))  # exactly, at every norm
    # triangle inequality (up to float32 rounding of distances of size ~ 2 * 11 / sqrt(c))
    slack = 1e-4 * (1 + dxy)
    assert (G.dist(x, z, c) <= dxy + G.dist(y, z, c) + slack).all()


@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_dist_matches_the_acosh_closed_form(seed, d, c):
    x = G.exp_map0(_tangents(seed, 64, d, 10.0, c), c)
    y = G.exp_map0(_tangents(seed + 3, 64, d, 10.0, c), c)
    assert torch.allclose(G.dist(x, y, c).double(), ref_lorentz_dist(x, y, c), rtol=1e-5, atol=2e-5)
    # nearly parallel pairs: the branch of the cross term that uses unit-vector differences
    near = G.exp_map0(G.log_map0(x, c) * 1.3 + 1e-3 / math.sqrt(c), c)
    ref = ref_lorentz_dist(x, near, c)
    assert torch.allclose(G.dist(x.double(), near.double(), c), ref, rtol=1e-7, atol=1e-6)
    moderate = x.norm(dim=-1) < 30 / math.sqrt(c)  # depth sqrt(c)|v| up to ~4
    assert torch.allclose(G.dist(x, near, c).double()[moderate], ref[moderate], rtol=1e-5, atol=2e-5)
    # far out, nearly parallel pairs are ill-conditioned in float32 itself: moving the float32 inputs
    # by half an ulp changes the exact distance by up to ~1.5e-3 (the acosh form in float32 is off
    # by up to ~10 there)
    assert torch.allclose(G.dist(x, near, c).double(), ref, rtol=1e-5, atol=3e-3)


@FAST
@given(seed=seeds, d=dims, c=curvatures, n=st.integers(1, 9), m=st.integers(1, 9))
def test_pairwise_dist_agrees_with_dist(seed, d, c, n, m):
    x = G.exp_map0(_tangents(seed, 2 * n, d, 11.0, c), c).reshape(2, n, d)  # a leading batch dim
    y = G.exp_map0(_tangents(seed + 5, 2 * m, d, 11.0, c), c).reshape(2, m, d)
    pw = G.pairwise_dist(x, y, c)
    assert pw.shape == (2, n, m)
    assert torch.allclose(pw, G.dist(x.unsqueeze(-2), y.unsqueeze(-3), c), rtol=1e-5, atol=1e-4 / math.sqrt(c))
    self_pw = G.pairwise_dist(x, x, c)
    # not exactly 0 (unlike dist): |x|^2 - <x, x> is accumulated in float64, leaving ~ 1e-8 |x|
    assert (self_pw.diagonal(dim1=-2, dim2=-1) <= 1e-7 * x.norm(dim=-1) + 1e-6).all()
    assert torch.allclose(self_pw, self_pw.transpose(-1, -2), atol=1e-5)


@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_lorentz_inner_product_values(seed, d, c):
    x = G.exp_map0(_tangents(seed, 32, d, 3.0, c), c)
    y = G.exp_map0(_tangents(seed + 1, 32, d, 3.0, c), c)

    def bound(a, b):
        # the raw float32 product's two terms nearly cancel far from the origin: its rounding error is
        # a few units of float32 roundoff of the terms' magnitude |a_s||b_s| + a_time b_time
        terms = a.double().norm(dim=-1) * b.double().norm(dim=-1) + ref_time(a, c) * ref_time(b, c)
        return 1e-5 + 4 * 2.0 ** -24 * terms

    assert ((G.lorentz_inner(x, x, c).double() + 1.0 / c).abs() <= bound(x, x)).all()
    # -c <x, y>_L = cosh(sqrt(c) d(x, y)) <= -1/c * c: never above -1/c
    expected = -torch.cosh(math.sqrt(c) * ref_lorentz_dist(x, y, c)) / c
    assert ((G.lorentz_inner(x, y, c).double() - expected).abs() <= 1e-5 * expected.abs() + bound(x, y)).all()


def test_distances_in_one_dimension_are_differences_of_depths():
    # closed form in 1-D (c = 1): the point sinh(a) lies at signed distance a from the origin
    a = torch.tensor([-3.0, -0.5, 0.0, 1e-4, 2.0, 7.5])
    x = torch.sinh(a).unsqueeze(-1)
    d = G.pairwise_dist(x, x)
    assert torch.allclose(d, (a.unsqueeze(1) - a.unsqueeze(0)).abs(), atol=2e-5)
    assert torch.allclose(G.dist(x.unsqueeze(1), x.unsqueeze(0)), d, atol=2e-5)


# --------------------------------------------------------------------------- entailment cones
@settings(max_examples=40, deadline=None)
@given(norm=st.floats(0.0, 1e30), c=curvatures, k=st.floats(0.01, 1.0), d=dims, seed=seeds)
def test_half_aperture_lies_in_the_open_interval(norm, c, k, d, seed):
    x = _directions(seed, 1, d) * norm
    for dtype in (torch.float32, torch.bfloat16):
        aper = G.half_aperture(x.to(dtype), c, min_radius=k)
        assert aper.dtype == torch.float32
        assert (aper > 0).all() and (aper < math.pi / 2).all()


def test_half_aperture_closed_form_and_monotonicity():
    c, k = 2.0, 0.1
    phi = torch.tensor([1e-3, 0.1, 0.5, 1.0, 1.5])
    norms = 2 * k / (math.sqrt(c) * torch.sin(phi))  # |x| at which asin(2K / (sqrt(c)|x|)) = phi
    x = torch.zeros(5, 3)
    x[:, 1] = norms
    assert torch.allclose(G.half_aperture(x, c, k), phi, rtol=1e-5)
    deeper = G.half_aperture(G.exp_map0(torch.linspace(0, 11, 50).unsqueeze(-1) / math.sqrt(c), c), c, k)
    assert (deeper[1:] <= deeper[:-1]).all()


@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_oxy_angle_matches_the_angle_between_tangent_vectors(seed, d, c):
    x = G.exp_map0(_tangents(seed, 64, d, 4.0, c), c)[1:]  # not the origin: no radial direction there
    y = G.exp_map0(_tangents(seed + 11, 63, d, 4.0, c), c)
    ang = G.oxy_angle(x, y, c)
    assert ang.dtype == torch.float32 and (ang >= 0).all() and (ang <= math.pi).all()
    apart = ref_lorentz_dist(x, y, c) > 1e-2 / math.sqrt(c)  # the direction to y is defined
    assert torch.allclose(ang.double()[apart], ref_oxy_angle(x, y, c)[apart], atol=1e-4)


def test_oxy_angle_closed_form_in_a_right_triangle():
    # x at depth r on e1, y at depth s on e2: right angle at the origin; interior angle A at x with
    # tan A = tanh(s) / sinh(r) (hyperbolic right triangle), exterior angle = pi - A.
    for c in (0.3, 1.0, 4.0):
        r = torch.tensor([0.05, 0.5, 1.0, 2.0, 4.0])
        s = torch.tensor([0.1, 1.0, 0.3, 3.0, 1.0])
        x = torch.zeros(5, 2)
        y = torch.zeros(5, 2)
        x[:, 0] = torch.sinh(r) / math.sqrt(c)
        y[:, 1] = torch.sinh(s) / math.sqrt(c)
        expected = math.pi - torch.atan(torch.tanh(s) / torch.sinh(r))
        assert torch.allclose(G.oxy_angle(x, y, c), expected, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, d=dims, c=curvatures, depth=st.just(0.0) | st.floats(1e-12, 5.0), ratio=st.floats(1.05, 20.0))
def test_a_child_further_out_on_the_parent_ray_has_zero_entailment_loss(seed, d, c, depth, ratio):
    # depth = sqrt(c)|v| <= 5 (|x| <= ~74 / sqrt(c)): much deeper, float32 cannot place a child on
    # the parent's ray within the (ever narrower) cone. Parents with |x| < MIN_NORM count as the
    # origin (angle pi/2), hence no depths in (0, 1e-12).
    v = _directions(seed, 8, d) * depth / math.sqrt(c)
    parent = G.exp_map0(v, c)
    for child in (parent * ratio, G.exp_map0(v * ratio, c)):
        assert (G.oxy_angle(parent, child, c) <= 1e-4).all()
        assert torch.equal(G.entailment_loss(parent, child, c), torch.zeros(8))
    assert torch.equal(G.oxy_angle(parent, parent, c), torch.zeros(8))  # the apex belongs to its cone
    if depth > 0.05:
        # between the origin and the parent: the geodesic turns back, exterior angle pi, outside the cone
        inner = parent / ratio
        assert (G.oxy_angle(parent, inner, c) > math.pi - 1e-3).all()
        assert (G.entailment_loss(parent, inner, c) > math.pi / 2 - 1e-3).all()


def test_entailment_conventions_at_degenerate_inputs():
    c = 1.0
    x = G.exp_map0(torch.tensor([[0.0, 0.0], [0.3, -0.2], [5.0, 1.0], [-0.7, -0.1]]), c)
    assert torch.equal(G.oxy_angle(x, x, c), torch.zeros(4))  # a point lies in its own cone
    assert torch.equal(G.entailment_loss(x, x, c), torch.zeros(4))
    line = torch.tensor([[-0.5], [0.0], [2.0]])  # 1-D: every offset component is a signed zero
    assert torch.equal(G.oxy_angle(line, line, c), torch.zeros(3))
    # the origin, and anything closer to it than MIN_NORM, has no radial direction: pi/2 by convention
    for origin in (torch.zeros(1, 2), torch.full((1, 2), 1e-16), torch.full((1, 2), 1e-20)):
        assert torch.allclose(G.oxy_angle(origin, x[1:], c), torch.full((3,), math.pi / 2), rtol=0, atol=1e-6)
    # sideways at the same depth, far from the origin: outside the narrow cone
    side = G.exp_map0(torch.tensor([[-1.0, 5.0]]), c)
    assert (G.entailment_loss(x[2:], side, c) > 0.5).all()


# --------------------------------------------------------------------------- robustness
EXTREME_NORMS = [0.0, 1e-8, 1e-3, 1.0, 1e4]
HYPERBOLIC_FUNCTIONS = {
    "exp_map0": lambda x, y, c: G.exp_map0(x, c),
    "log_map0": lambda x, y, c: G.log_map0(x, c),
    "dist": G.dist,
    "dist(exp)": lambda x, y, c: G.dist(G.exp_map0(x, c), G.exp_map0(y, c), c),
    "pairwise_dist": G.pairwise_dist,
    "lorentz_inner": G.lorentz_inner,
    "half_aperture": lambda x, y, c: G.half_aperture(x, c),
    "oxy_angle": G.oxy_angle,
    "entailment_loss": G.entailment_loss,
    "entailment_loss(exp)": lambda x, y, c: G.entailment_loss(G.exp_map0(x, c), G.exp_map0(y, c), c),
    "poincare_exp_map0": lambda x, y, c: G.poincare_exp_map0(x, c),
    "poincare_log_map0": lambda x, y, c: G.poincare_log_map0(x, c),
    "poincare_dist": G.poincare_dist,
    "poincare_dist(exp)": lambda x, y, c: G.poincare_dist(G.poincare_exp_map0(x, c), G.poincare_exp_map0(y, c), c),
    "poincare_pairwise_dist": G.poincare_pairwise_dist,
    "lorentz_to_poincare": lambda x, y, c: G.lorentz_to_poincare(x, c),
    "poincare_to_lorentz": lambda x, y, c: G.poincare_to_lorentz(x, c),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_x", EXTREME_NORMS)
def test_no_nan_or_inf_at_extreme_norms(dtype, norm_x):
    dirs = _directions(0, 2 * len(EXTREME_NORMS), 5)
    x_base = (dirs[: len(EXTREME_NORMS)] * norm_x).to(dtype)  # same norm, several directions
    y_base = (dirs[len(EXTREME_NORMS):] * torch.tensor(EXTREME_NORMS).unsqueeze(-1)).to(dtype)  # every norm
    y_base = torch.cat([y_base, x_base[:1]])  # and x itself
    x_base = torch.cat([x_base, x_base[:1]])
    for c_value in (0.1, 10.0):
        for name, fn in HYPERBOLIC_FUNCTIONS.items():
            x = x_base.clone().requires_grad_(True)
            y = y_base.clone().requires_grad_(True)
            c = torch.tensor(c_value, requires_grad=True)
            out = fn(x, y, c)
            assert out.dtype == torch.float32, name
            assert torch.isfinite(out).all(), (name, c_value, out)
            out.sum().backward()
            for t in (x, y, c):
                assert t.grad is None or torch.isfinite(t.grad).all(), (name, c_value, t.grad)
    for kind in ("lorentz", "poincare", "euclidean"):
        m = G.Manifold(kind)
        x = x_base.clone().requires_grad_(True)
        y = y_base.clone().requires_grad_(True)
        px, py = m.project(x), m.project(y)
        out = m.dist(px, py).sum() + m.pairwise_dist(px, py).sum() + m.entailment_loss(px, py).sum()
        assert torch.isfinite(out), kind
        out.backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all(), kind


def test_float32_under_autocast_and_for_low_precision_inputs():
    x = G.exp_map0(_tangents(3, 16, 8, 3.0, 1.0)).to(torch.bfloat16)
    y = G.exp_map0(_tangents(4, 16, 8, 3.0, 1.0)).to(torch.bfloat16)
    plain = {"dist": G.dist(x, y), "pairwise": G.pairwise_dist(x, y), "angle": G.oxy_angle(x, y),
             "exp": G.exp_map0(x), "poincare": G.poincare_dist(x / 20, y / 20)}
    # same numbers as computing on the float32 copies
    assert torch.equal(plain["dist"], G.dist(x.float(), y.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = {"dist": G.dist(x, y), "pairwise": G.pairwise_dist(x, y), "angle": G.oxy_angle(x, y),
                  "exp": G.exp_map0(x), "poincare": G.poincare_dist(x / 20, y / 20)}
    for key, value in inside.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, plain[key]), key
    # the functions run with autocast off (on CPU none of their ops is autocast-eligible in float32
    # or float64, so check the switch itself with a probe run through the same wrapper)
    probe = G._float_math(lambda x: torch.tensor(float(torch.is_autocast_enabled("cpu"))) + (x @ x.T).sum() * 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and float(probe(x)) == 0.0
    # a bfloat16 curvature is upcast too; float64 inputs stay float64
    assert G.dist(x, y, torch.tensor(1.0, dtype=torch.bfloat16)).dtype == torch.float32
    assert G.dist(x.double(), y.double()).dtype == torch.float64


def test_gradients_at_the_origin_are_finite_and_correct():
    zero = torch.zeros(4, requires_grad=True)
    for fn in (G.exp_map0, G.log_map0, G.poincare_log_map0):
        jac = torch.autograd.functional.jacobian(lambda v: fn(v, 2.0), torch.zeros(4))
        assert torch.allclose(jac, torch.eye(4)), fn.__name__
    jac = torch.autograd.functional.jacobian(lambda v: G.poincare_exp_map0(v, 2.0), torch.zeros(4))
    assert torch.allclose(jac, torch.eye(4))
    y = G.exp_map0(torch.tensor([0.5, -1.0, 0.0, 2.0]), 2.0)
    unit = y / y.norm()
    # moving the origin towards y shortens the distance at unit rate (metric = identity at the origin) ...
    (g,) = torch.autograd.grad(G.dist(zero, y, 2.0), zero)
    assert torch.allclose(g, -unit, atol=1e-6)
    (g,) = torch.autograd.grad(G.pairwise_dist(zero.unsqueeze(0), y.unsqueeze(0), 2.0).sum(), zero)
    assert torch.allclose(g, -unit, atol=1e-6)
    # ... and at rate 2 in the Poincaré ball (metric 4 x Euclidean at the origin)
    p = G.lorentz_to_poincare(y, 2.0)
    (g,) = torch.autograd.grad(G.poincare_dist(zero, p, 2.0), zero)
    assert torch.allclose(g, -2 * unit, atol=1e-5)
    (g,) = torch.autograd.grad(G.entailment_loss(zero, y, 2.0), zero)
    assert torch.isfinite(g).all()
    # coincident points: a kink of the distance; the subgradient 0 is used, not sqrt'(0) = inf
    for fn in (G.dist, G.poincare_dist):
        a = (y / 4).clone().requires_grad_(True)
        b = (y / 4).clone().requires_grad_(True)
        ga, gb = torch.autograd.grad(fn(a, b, 2.0), (a, b))
        assert torch.equal(ga, torch.zeros(4)) and torch.equal(gb, torch.zeros(4))


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_analytic_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)

    c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x, y = leaf(3, 4), leaf(3, 4, scale=2.0)
    near = (x.detach() * 1.3 + 1e-2).requires_grad_(True)  # nearly parallel: the other distance branch
    _gradcheck(G.exp_map0, x, c)
    _gradcheck(G.log_map0, y, c)
    _gradcheck(G.dist, x, y, c)
    _gradcheck(G.dist, x, near, c)
    _gradcheck(G.pairwise_dist, x, y, c)
    _gradcheck(G.oxy_angle, x, y, c)  # mixed ahead / behind
    _gradcheck(G.oxy_angle, x, near, c)  # ahead
    _gradcheck(G.oxy_angle, x, -y, c)
    _gradcheck(lambda a, cc: G.half_aperture(a, cc), y * 3, c)
    p, q = leaf(3, 4, scale=0.2), leaf(3, 4, scale=0.2)
    _gradcheck(G.poincare_dist, p, q, c)
    _gradcheck(G.poincare_pairwise_dist, p, q, c)
    _gradcheck(G.poincare_exp_map0, x, c)
    _gradcheck(G.poincare_log_map0, p, c)
    _gradcheck(G.lorentz_to_poincare, x, c)
    _gradcheck(G.poincare_to_lorentz, p, c)


# --------------------------------------------------------------------------- Poincaré ball
@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_poincare_exp_log_invert_and_points_stay_in_the_ball(seed, d, c):
    v = _tangents(seed, 64, d, 3.0, c)
    p = G.poincare_exp_map0(v, c)
    assert torch.allclose(G.poincare_log_map0(p, c), v, rtol=1e-4, atol=1e-6)
    huge = _directions(seed, 8, d) * torch.logspace(0, 4, 8).unsqueeze(-1)
    for points in (G.poincare_exp_map0(huge, c), G.lorentz_to_poincare(G.exp_map0(huge, c), c)):
        assert (points.norm(dim=-1) * math.sqrt(c) < 1).all()
    # the standard exp map moves 2|v| from the origin
    assert torch.allclose(G.poincare_dist(torch.zeros_like(p), p, c), 2 * v.norm(dim=-1), rtol=1e-4, atol=1e-6)


@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_poincare_dist_metric_properties_and_mobius_closed_form(seed, d, c):
    p = G.poincare_exp_map0(_tangents(seed, 48, d, 3.0, c), c)
    q = G.poincare_exp_map0(_tangents(seed + 2, 48, d, 3.0, c), c)
    dpq = G.poincare_dist(p, q, c)
    assert (dpq >= 0).all() and torch.equal(dpq, G.poincare_dist(q, p, c))
    assert torch.equal(G.poincare_dist(p, p, c), torch.zeros(48))
    assert torch.allclose(dpq.double(), ref_mobius_dist(p, q, c), rtol=1e-4, atol=1e-4 / math.sqrt(c))
    pw = G.poincare_pairwise_dist(p[:6], q[:5], c)
    assert torch.allclose(pw, G.poincare_dist(p[:6].unsqueeze(1), q[:5].unsqueeze(0), c), rtol=1e-5, atol=1e-4)


@FAST
@given(seed=seeds, d=dims, c=curvatures)
def test_lorentz_and_poincare_are_isometric(seed, d, c):
    v, w = _tangents(seed, 48, d, 6.0, c), _tangents(seed + 4, 48, d, 6.0, c)
    x, y = G.exp_map0(v, c), G.exp_map0(w, c)
    px, py = G.lorentz_to_poincare(x, c), G.lorentz_to_poincare(y, c)
    assert torch.allclose(G.poincare_dist(px, py, c), G.dist(x, y, c), rtol=1e-3, atol=1e-3 / math.sqrt(c))
    assert torch.allclose(G.poincare_pairwise_dist(px[:5], py[:7], c), G.pairwise_dist(x[:5], y[:7], c),
                          rtol=1e-3, atol=1e-3 / math.sqrt(c))
    assert torch.allclose(G.poincare_to_lorentz(px, c), x, rtol=1e-3, atol=1e-6)
    # the two exp maps correspond through the isometry, up to the factor 2 of the ball's metric
    assert torch.allclose(G.lorentz_to_poincare(G.exp_map0(2 * v, c), c), G.poincare_exp_map0(v, c),
                          rtol=1e-4, atol=1e-6)
    # the cones are the same cones: angles and depths are preserved
    assert torch.allclose(G.entailment_loss(G.poincare_to_lorentz(px, c), G.poincare_to_lorentz(py, c), c),
                          G.entailment_loss(x, y, c), atol=1e-3)


# --------------------------------------------------------------------------- learnable scalars
def test_curvature_initialisation_bounds_and_projection():
    curv = G.Curvature()
    assert math.isclose(curv().item(), 1.0)
    assert curv.min_value == pytest.approx(0.1) and curv.max_value == pytest.approx(10.0)
    (-curv()).backward()
    with torch.no_grad():  # a plain gradient step that overshoots the upper bound
        curv.log_value -= 100.0 * curv.log_value.grad
    curv.log_value.grad = None
    assert curv.log_value.item() > math.log(10.0)
    assert curv().item() == pytest.approx(10.0) and curv.log_value.item() == pytest.approx(math.log(10.0))
    c = curv()
    c.backward()
    assert curv.log_value.grad is not None and curv.log_value.grad.item() > 0  # still learnable at the bound
    custom = G.Curvature(init=2.0, min_value=0.5, max_value=4.0, learnable=False)
    assert not custom.log_value.requires_grad and custom().item() == pytest.approx(2.0)
    with torch.no_grad():
        custom.log_value.fill_(-5.0)
    assert custom().item() == pytest.approx(0.5)
    for bad in ({"init": 0.0}, {"init": 1.0, "min_value": 2.0}, {"init": 1.0, "max_value": -1.0}):
        with pytest.raises(ConfigError):
            G.Curvature(**bad)
    with pytest.raises(ConfigError):
        G.exp_map0(torch.ones(2), -1.0)


def test_using_a_scalar_twice_in_one_step_keeps_the_graph_valid():
    curv, scale = G.Curvature(), G.FeatureScale(dim=4)
    v = torch.randn(3, 4)
    penalty = curv.log_value**2  # a graph that saved the raw parameter itself
    loss = G.dist(G.exp_map0(scale(v), curv()), G.exp_map0(scale(-v), curv()), curv()).sum() + penalty
    loss.backward()  # the in-place projections must not invalidate saved tensors
    assert torch.isfinite(curv.log_value.grad) and torch.isfinite(scale.log_value.grad)


def test_feature_scale_initialisation_and_upper_bound():
    scale = G.FeatureScale(dim=512)
    x = torch.randn(2, 512)
    assert torch.allclose(scale(x), x / math.sqrt(512))
    with torch.no_grad():
        scale.log_value.fill_(2.0)  # alpha = e^2 > 1: projected back to 1
    assert torch.allclose(scale(x), x)
    assert scale.value().item() == 1.0
    assert G.FeatureScale(init=0.3, max_value=None).value().item() == pytest.approx(0.3)
    with pytest.raises(ConfigError):
        G.FeatureScale()
    with pytest.raises(ConfigError):
        G.FeatureScale(init=2.0)  # above the default bound 1


def test_scalar_parameters_lists_every_log_scalar_once():
    shared = G.Curvature()
    model = nn.ModuleDict({
        "proj": nn.Linear(4, 4),
        "geo": G.Manifold("lorentz", curvature=shared),
        "geo2": G.Manifold("poincare", curvature=shared),
        "image_scale": G.FeatureScale(dim=4),
        "text_scale": G.FeatureScale(dim=4),
        "flat": G.Manifold("euclidean"),
    })
    found = G.scalar_parameters(model)
    assert {id(p) for p in found} == {id(shared.log_value), id(model["image_scale"].log_value),
                                      id(model["text_scale"].log_value)}
    assert len(found) == 3
    assert all(p.ndim == 0 for p in found)
    assert list(G.Manifold("euclidean").parameters()) == []


# --------------------------------------------------------------------------- the switch
@pytest.mark.parametrize("kind", ["lorentz", "poincare", "euclidean"])
def test_manifold_dispatches_to_its_geometry(kind):
    m = G.Manifold(kind)
    v, w = _tangents(1, 6, 3, 2.0, 1.0), _tangents(2, 6, 3, 2.0, 1.0)
    px, py = m.project(v), m.project(w)
    if kind == "lorentz":
        assert torch.equal(px, G.exp_map0(v, 1.0))
        assert torch.equal(m.dist(px, py), G.dist(px, py, 1.0))
        assert torch.equal(m.entailment_loss(px, py), G.entailment_loss(px, py, 1.0))
    elif kind == "poincare":
        assert torch.equal(px, G.poincare_exp_map0(v, 1.0))
        assert torch.equal(m.dist(px, py), G.poincare_dist(px, py, 1.0))
        # same cones as the Lorentz model on the corresponding points (the isometry keeps angles and depths)
        lx, ly = G.poincare_to_lorentz(px, 1.0), G.poincare_to_lorentz(py, 1.0)
        assert torch.allclose(m.entailment_loss(px, py), G.Manifold("lorentz").entailment_loss(lx, ly), atol=1e-5)
        assert (m.entailment_loss(px, py) > 0).any()
    else:
        assert torch.equal(px, v) and m.c() is None
        assert torch.allclose(m.dist(px, py), (v - w).norm(dim=-1))
    assert torch.allclose(m.pairwise_dist(px, py), m.dist(px.unsqueeze(1), py.unsqueeze(0)), atol=1e-5)
    assert torch.equal(m.dist(px, px), torch.zeros(6))
    # a child further out on the parent's ray is inside the cone in every geometry
    assert torch.equal(m.entailment_loss(m.project(v), m.project(2.5 * v)), torch.zeros(6))
    assert (m.entailment_loss(m.project(v[1:]), m.project(0.3 * v[1:])) > 0).all()
    clipped = G.Manifold(kind, clip_radius=0.5)
    big = torch.tensor([[30.0, 40.0, 0.0]])
    assert torch.allclose(clipped.project(big), m.project(big * 0.5 / 50))


def test_manifold_rejects_bad_configuration():
    with pytest.raises(ConfigError):
        G.Manifold("spherical")
    with pytest.raises(ConfigError):
        G.Manifold("euclidean", curvature=G.Curvature())
    with pytest.raises(ConfigError):
        G.Manifold("lorentz", clip_radius=0.0)
