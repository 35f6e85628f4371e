"""The gradient-scale operator GS and the scaled residual R_s (METHODS §0.1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vladapt.backbones import ScaledResidual, forward_scale, grad_scale, scaled_add, split_prefix


def test_grad_scale_is_identity_forward_and_scales_backward():
    x = torch.randn(4, 5, requires_grad=True)
    y = grad_scale(x, 0.3)
    assert torch.equal(y, x)
    g = torch.randn(4, 5)
    y.backward(g)
    assert torch.allclose(x.grad, 0.3 * g)


def _branch(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 3), nn.GELU(), nn.Linear(3, 6))


def _grads(s, seed=0):
    branch = _branch(seed)
    r = ScaledResidual(branch, scale=s)
    torch.manual_seed(1)
    h = torch.randn(5, 6, requires_grad=True)
    g = torch.randn(5, 6)
    out = r(h)
    out.backward(g)
    with torch.no_grad():
        expected = h + s * branch(h)
    return out.detach(), expected, [p.grad.clone() for p in branch.parameters()], h.grad.clone(), g


@pytest.mark.parametrize("s", [0.5, 2.0, 0.25, 0.025, 0.3, 7.1])
def test_branch_parameter_gradients_do_not_depend_on_scale_exactly(s):
    # the branch output receives the upstream gradient itself (not g * (1/s) * s, inexact for most s)
    _, _, ref, _, _ = _grads(1.0)
    _, _, got, _, _ = _grads(s)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(s=st.floats(min_value=1e-3, max_value=20.0))
def test_scaled_residual_identities(s):
    out, expected, grads, h_grad, g = _grads(s)
    _, _, ref_grads, ref_h_grad, _ = _grads(1.0)
    assert torch.allclose(out, expected, atol=1e-6)  # forward: h + s * B(h)
    for a, b in zip(grads, ref_grads):  # branch parameter gradients independent of s
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # gradient into h through the branch is s * J^T g: (h_grad - g) scales linearly with s
    assert torch.allclose(h_grad - g, s * (ref_h_grad - g), rtol=1e-4, atol=1e-6)


def test_zero_scale_returns_input_and_skips_branch():
    branch = _branch()
    r = ScaledResidual(branch, scale=0.0)
    h = torch.randn(2, 6, requires_grad=True)
    out = r(h)
    assert torch.equal(out, h)
    out.sum().backward()
    assert all(p.grad is None for p in branch.parameters())
    assert r(h, scale=0.5).sub(h).abs().sum() > 0  # a per-call scale overrides the default


@pytest.mark.parametrize("s", [0.025, 0.3, 3.0])
def test_forward_scale_and_scaled_add_pass_the_upstream_gradient_exactly(s):
    h = torch.randn(3, 4, requires_grad=True)
    y = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    out = scaled_add(h, y, s)
    assert torch.equal(out, torch.add(h, y, alpha=s))
    out.backward(g)
    assert torch.equal(h.grad, g) and torch.equal(y.grad, g)
    y.grad = None
    scaled = forward_scale(y, s)
    assert torch.equal(scaled, y * s)
    scaled.backward(g)
    assert torch.equal(y.grad, g)
    # against the two-operator composition it replaces: equal up to the rounding of g * (1/s) * s
    y2 = y.detach().clone().requires_grad_()
    grad_scale(y2 * s, 1.0 / s).backward(g)
    torch.testing.assert_close(y2.grad, g, rtol=1e-6, atol=0)


def test_split_prefix_equals_slicing_forward_and_backward():
    x = torch.randn(2, 7, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = split_prefix(x, 1)
    assert torch.equal(a, x[:, :1]) and torch.equal(b, x[:, 1:])
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    (a * ga).sum().add((b * gb).sum()).backward()
    (x2[:, :1] * ga).sum().add((x2[:, 1:] * gb).sum()).backward()
    assert torch.equal(x.grad, x2.grad)
    # one part unused: its gradient is zero
    x.grad = None
    _, b = split_prefix(x, 2)
    b.sum().backward()
    assert torch.equal(x.grad[:, :2], torch.zeros(2, 2, 5)) and torch.equal(x.grad[:, 2:], torch.ones(2, 5, 5))
