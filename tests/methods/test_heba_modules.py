"""HeBA's bottleneck, point adapters, adapter building/attaching and the slow-fast scale."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vladapt.backbones import ForwardContext, InsertionPoint, TokenLayout, load_clip
from vladapt.errors import BackboneError, ConfigError
from vladapt.methods.heba_modules import (
    HeBABottleneck,
    HeBAPointAdapter,
    SlowFastScale,
    attach_adapters,
    build_heba_adapters,
    detach_adapters,
)

# (tower, position, width D) of ViT-B/16 -> (trainable parameters per adapter, sqrt(2 / D) as listed in §1.4)
VIT_B16 = {
    ("visual", "attn_in", 768): (298_176, 0.0510),
    ("visual", "mlp_hidden", 3072): (4_731_648, 0.0255),
    ("text", "attn_in", 512): (132_096, 0.0625),
    ("text", "mlp_hidden", 2048): (2_101_248, 0.03125),
}


@pytest.fixture(scope="module")
def vit_b16_adapters(vit_b16) -> nn.ModuleDict:
    # The real ViT-B/16 architecture (random weights); only used to count and inspect adapter parameters.
    model = vit_b16.model
    return build_heba_adapters(model, range(1, 13), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def clean(tiny):
    """The shared tiny backbone, with every attached module removed afterwards."""
    yield tiny
    tiny.model.detach_all()


def visual_point(kind: str = "attn_in", width: int = 128, grid: tuple[int, int] = (4, 4)) -> InsertionPoint:
    return InsertionPoint("visual", kind, 0, width, TokenLayout(num_prefix=1, grid=grid))


def text_point(kind: str = "attn_in", width: int = 128) -> InsertionPoint:
    return InsertionPoint("text", kind, 0, width, TokenLayout(num_prefix=0, grid=None))


def fixed(scale: float) -> ForwardContext:
    return ForwardContext(lambda tower, layer: scale)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- ViT-B/16 parameter counts and init


def test_vit_b16_trainable_parameter_count(vit_b16_adapters):
    assert len(vit_b16_adapters) == 2 * 2 * 12
    assert sum(p.numel() for p in vit_b16_adapters.parameters()) == 87_158_016
    assert all(p.requires_grad and p.dtype == torch.float32 for p in vit_b16_adapters.parameters())
    for (tower, kind, width), (count, _) in VIT_B16.items():
        for layer in range(12):
            adapter = vit_b16_adapters[f"{tower}_blocks_{layer}_{kind}"]
            assert adapter.point.tower == tower and adapter.point.kind == kind and adapter.point.layer == layer
            assert adapter.point.width == width
            assert sum(p.numel() for p in adapter.parameters()) == count


@pytest.mark.parametrize("key", list(VIT_B16), ids=lambda k: f"{k[0]}-{k[1]}")
def test_vit_b16_init_statistics(vit_b16_adapters, key):
    tower, kind, width = key
    listed_std = VIT_B16[key][1]
    std = math.sqrt(2 / width)
    assert std == pytest.approx(listed_std, rel=5e-3)
    adapters = [vit_b16_adapters[f"{tower}_blocks_{layer}_{kind}"] for layer in range(12)]
    blocks = [a.bottleneck for a in adapters]
    up = torch.cat([b.up.weight.flatten() for b in blocks])
    assert up.std().item() == pytest.approx(std, rel=0.03)
    assert abs(up.mean().item()) < 0.05 * std
    # PyTorch's default: U(+-1/sqrt(fan_in)), std = bound / sqrt(3).
    down = torch.cat([b.down.weight.flatten() for b in blocks])
    bound = 1 / math.sqrt(width)
    assert down.abs().max().item() <= bound
    assert down.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    for b in blocks:
        assert torch.equal(b.norm.weight, torch.ones(width)) and torch.equal(b.norm.bias, torch.zeros(width))
        convs = [m for m in b.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(convs) == (3 if tower == "visual" else 2)
        assert all(m.bias is None for m in convs)
    if tower == "visual":
        dw = torch.cat([b.depthwise.weight.flatten() for b in blocks])
        assert dw.abs().max().item() <= 1 / 3
        assert dw.std().item() == pytest.approx(1 / 3 / math.sqrt(3), rel=0.03)
    else:
        assert all(b.depthwise is None for b in blocks)


# ---------------------------------------------------------------- the bottleneck


def test_bottleneck_layers():
    vis = HeBABottleneck(64, spatial=True)
    # the reference's 1x1 convolutions, as the equal per-token linear maps
    assert isinstance(vis.down, nn.Linear) and (vis.down.in_features, vis.down.out_features) == (64, 16)
    assert (vis.depthwise.groups, vis.depthwise.kernel_size, vis.depthwise.padding) == (16, (3, 3), (1, 1))
    assert isinstance(vis.up, nn.Linear) and (vis.up.in_features, vis.up.out_features) == (16, 64)
    txt = HeBABottleneck(64, spatial=False, reduction=8)
    assert isinstance(txt.down, nn.Linear) and (txt.down.in_features, txt.down.out_features) == (64, 8)
    assert isinstance(txt.up, nn.Linear) and (txt.up.in_features, txt.up.out_features) == (8, 64)
    with pytest.raises(ConfigError, match="reduction"):
        HeBABottleneck(64, spatial=False, reduction=3)


def _randomize_norm(b: HeBABottleneck, g: torch.Generator) -> None:
    with torch.no_grad():
        b.norm.weight.copy_(torch.randn(b.width, generator=g))
        b.norm.bias.copy_(torch.randn(b.width, generator=g))


def test_text_bottleneck_formula():
    g = seeded(1)
    b = HeBABottleneck(32, spatial=False, generator=g)
    _randomize_norm(b, g)
    z = torch.randn(2, 5, 32, generator=g)
    y = F.gelu(z @ b.down.weight.T, approximate="none") @ b.up.weight.T
    expected = F.layer_norm(z + y, (32,), b.norm.weight, b.norm.bias)
    torch.testing.assert_close(b(z), expected)


def test_visual_bottleneck_formula():
    g = seeded(2)
    b = HeBABottleneck(32, spatial=True, generator=g)
    _randomize_norm(b, g)
    z = torch.randn(2, 32, 3, 4, generator=g)  # the reference's layout: [B, D, H, W]
    conv1x1 = lambda w: w[:, :, None, None]  # noqa: E731 - a linear map per token as a 1x1 convolution
    y = F.conv2d(F.gelu(F.conv2d(F.conv2d(z, conv1x1(b.down.weight)), b.depthwise.weight, padding=1, groups=8)),
                 conv1x1(b.up.weight))
    expected = F.layer_norm((z + y).permute(0, 2, 3, 1), (32,), b.norm.weight, b.norm.bias)  # [B, H, W, D]
    tokens = z.permute(0, 2, 3, 1).reshape(2, 12, 32)  # row-major patch tokens
    torch.testing.assert_close(b(tokens, grid=(3, 4)), expected.reshape(2, 12, 32))


def test_zero_up_projection_is_not_an_identity():
    # §1.3: B holds its own residual + LayerNorm, so W_up = 0 gives B(z) = LN(z), not 0.
    g = seeded(3)
    adapter = HeBAPointAdapter(text_point(width=32), scale=0.025, generator=g)
    nn.init.zeros_(adapter.bottleneck.up.weight)
    x = torch.randn(2, 7, 32, generator=g) * 3 + 1
    torch.testing.assert_close(adapter.bottleneck(x), F.layer_norm(x, (32,)))
    assert (adapter(x) - x).abs().max() > 0.01


# ---------------------------------------------------------------- the point adapter


@pytest.mark.parametrize("kind,width", [("attn_in", 128), ("mlp_hidden", 512)])
def test_visual_adapter_passes_cls_and_adapts_patches(kind, width):
    g = seeded(4)
    point = visual_point(kind, width)
    adapter = HeBAPointAdapter(point, scale=0.025, generator=g)
    x = torch.randn(3, 17, width, generator=g)
    out = adapter(x, ForwardContext())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[:, 0], x[:, 0])
    assert ((out[:, 1:] - x[:, 1:]).abs().amax(-1) > 0).all()
    patches = x[:, 1:]
    expected = torch.cat([x[:, :1], patches + 0.025 * adapter.bottleneck(patches, grid=point.layout.grid)], dim=1)
    torch.testing.assert_close(out, expected)


def test_text_adapter_adapts_every_token():
    g = seeded(5)
    adapter = HeBAPointAdapter(text_point(), scale=0.025, generator=g)
    x = torch.randn(2, 77, 128, generator=g)
    out = adapter(x, ForwardContext())
    assert ((out - x).abs().amax(-1) > 0).all()
    torch.testing.assert_close(out, x + 0.025 * adapter.bottleneck(x))


def test_scale_zero_returns_the_input_and_context_scale_overrides():
    g = seeded(6)
    adapter = HeBAPointAdapter(visual_point(), scale=0.0, generator=g)
    x = torch.randn(2, 17, 128, generator=g)
    assert adapter(x, ForwardContext()) is x
    assert adapter(x) is x
    out = adapter(x, fixed(0.5))
    patches = x[:, 1:]
    expected = torch.cat([x[:, :1], patches + 0.5 * adapter.bottleneck(patches, grid=(4, 4))], dim=1)
    torch.testing.assert_close(out, expected)
    adapter.scale = 0.5
    assert adapter(x, fixed(0.0)) is x
    assert torch.equal(adapter(x), out)


def test_adapters_of_one_block_share_the_context_scale():
    draws = iter([0.25, 0.5, 1.0])
    calls = []

    def scale_fn(tower, layer):
        calls.append((tower, layer))
        return next(draws)

    g = seeded(7)
    att = HeBAPointAdapter(text_point("attn_in", 32), generator=g)
    mlp = HeBAPointAdapter(text_point("mlp_hidden", 128), generator=g)
    ctx = ForwardContext(scale_fn)
    x, u = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 128, generator=g)
    torch.testing.assert_close(att(x, ctx), x + 0.25 * att.bottleneck(x))
    torch.testing.assert_close(mlp(u, ctx), u + 0.25 * mlp.bottleneck(u))
    assert calls == [("text", 0)]


@pytest.mark.parametrize("point", [visual_point(), text_point()], ids=["visual", "text"])
def test_parameter_gradients_do_not_depend_on_the_scale(point):
    g = seeded(8)
    adapter = HeBAPointAdapter(point, generator=g)
    x = torch.randn(2, 17, 128, generator=g)
    w = torch.randn(2, 17, 128, generator=g)
    grads, input_grads = {}, {}
    for s in (0.25, 0.0625):  # powers of two: s * (1/s) == 1 exactly
        adapter.zero_grad()
        xs = x.clone().requires_grad_(True)
        (adapter(xs, fixed(s)) * w).sum().backward()
        grads[s] = {n: p.grad.clone() for n, p in adapter.named_parameters()}
        input_grads[s] = xs.grad
    for name, grad in grads[0.25].items():
        assert grad.abs().max() > 0, name
        assert torch.equal(grad, grads[0.0625][name]), name
    # The gradient reaching the input through the branch is proportional to s.
    torch.testing.assert_close((input_grads[0.25] - w) / 0.25, (input_grads[0.0625] - w) / 0.0625)


@pytest.mark.parametrize("cell", [(2, 2), (0, 0), (5, 4), (3, 0)])
def test_depthwise_conv_mixes_exactly_the_3x3_neighbourhood(cell):
    # A non-square grid: a transposed split/merge would change the wrong tokens.
    h, w = 6, 5
    g = seeded(9)
    point = visual_point(width=32, grid=(h, w))
    adapter = HeBAPointAdapter(point, scale=0.5, generator=g)
    x = torch.randn(2, 1 + h * w, 32, generator=g)
    i, j = cell
    x2 = x.clone()
    x2[0, 1 + i * w + j] += torch.randn(32, generator=g)
    with torch.no_grad():
        changed = (adapter(x2) - adapter(x)).abs().amax(-1) > 0
    expected = torch.zeros(2, 1 + h * w, dtype=torch.bool)
    for a in range(max(0, i - 1), min(h, i + 2)):
        for b in range(max(0, j - 1), min(w, j + 2)):
            expected[0, 1 + a * w + b] = True
    assert torch.equal(changed, expected)


def test_bf16_input_with_fp32_adapter():
    g = seeded(10)
    adapter = HeBAPointAdapter(visual_point(), scale=0.5, generator=g)
    x = torch.randn(2, 17, 128, generator=g).to(torch.bfloat16)
    out = adapter(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, 0], x[:, 0])
    # Computed in fp32 from the (exactly representable) bf16 input, rounded once at the end.
    assert torch.equal(out, adapter(x.float()).to(torch.bfloat16))


def test_autocast_keeps_the_input_dtype_and_trains():
    g = seeded(11)
    adapter = HeBAPointAdapter(text_point(), scale=0.5, generator=g)
    x = torch.randn(2, 9, 128, generator=g)
    ref = adapter(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * (ref - x).abs().max()
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.parameters())


def test_heba_positions_only():
    with pytest.raises(ConfigError, match="block"):
        HeBAPointAdapter(InsertionPoint("visual", "block", 0, 128, TokenLayout(1, (4, 4))))


# ---------------------------------------------------------------- building and attaching on the tiny model


def test_build_uses_one_based_layers(tiny):
    adapters = build_heba_adapters(tiny.model, [2])
    assert list(adapters) == ["visual_blocks_1_attn_in", "visual_blocks_1_mlp_hidden",
                              "text_blocks_1_attn_in", "text_blocks_1_mlp_hidden"]
    assert [a.point.layer for a in adapters.values()] == [1, 1, 1, 1]
    assert [a.point.width for a in adapters.values()] == [128, 512, 128, 512]
    assert [a.spatial for a in adapters.values()] == [True, True, False, False]
    assert all(a.scale == 0.025 for a in adapters.values())
    only = build_heba_adapters(tiny.model, range(1, 3), towers=("text",), positions=("mlp_hidden",), scale=0.1)
    assert list(only) == ["text_blocks_0_mlp_hidden", "text_blocks_1_mlp_hidden"]
    assert all(a.scale == 0.1 for a in only.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[0]), "1-based"),
    (dict(layers=range(1, 4)), r"1\.\.2"),
    (dict(layers=[]), "at least one"),
    (dict(layers=[1], positions=("block",)), "position"),
    (dict(layers=[1], towers=("audio",)), "tower"),
    (dict(layers=[1], reduction=3), "reduction"),
])
def test_build_rejects_bad_settings(tiny, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_heba_adapters(tiny.model, **kwargs)


def test_build_is_seeded_by_the_generator(tiny):
    a, b, c = (build_heba_adapters(tiny.model, [1], generator=seeded(s)) for s in (1, 1, 2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual_blocks_0_attn_in.residual.branch.up.weight"],
                           sc["visual_blocks_0_attn_in.residual.branch.up.weight"])


def test_features_equal_the_frozen_model_at_scale_zero(clean, images, tokens):
    model = clean.model
    with torch.no_grad():
        frozen_img, frozen_txt = model.encode_image(images), model.encode_text(tokens)
        adapters = build_heba_adapters(model, range(1, 3), scale=0.0, generator=seeded(12))
        attach_adapters(model, adapters)
        assert len(model.attached_modules()) == 8
        assert torch.equal(model.encode_image(images), frozen_img)
        assert torch.equal(model.encode_text(tokens), frozen_txt)
        zero_ctx = lambda: ForwardContext(SlowFastScale(base=0.0, generator=seeded()))  # noqa: E731
        assert torch.equal(model.encode_image(images, zero_ctx()), frozen_img)
        assert torch.equal(model.encode_text(tokens, zero_ctx()), frozen_txt)
        for a in adapters.values():
            a.scale = 0.025
        assert (model.encode_image(images) - frozen_img).abs().max() > 1e-4
        assert (model.encode_text(tokens) - frozen_txt).abs().max() > 1e-4
        detach_adapters(model, adapters)
        assert model.attached_modules() == {}
        assert torch.equal(model.encode_image(images), frozen_img)


def test_visual_adapters_leave_text_features_alone(clean, images, tokens):
    model = clean.model
    with torch.no_grad():
        frozen_img, frozen_txt = model.encode_image(images), model.encode_text(tokens)
        attach_adapters(model, build_heba_adapters(model, [1, 2], towers=("visual",), generator=seeded(13)))
        assert torch.equal(model.encode_text(tokens), frozen_txt)
        assert (model.encode_image(images) - frozen_img).abs().max() > 1e-4


def test_attach_is_all_or_nothing_and_detach_only_removes_own_modules(clean):
    model = clean.model
    first = build_heba_adapters(model, [2], towers=("visual",))
    attach_adapters(model, first)
    second = build_heba_adapters(model, [1, 2])
    with pytest.raises(BackboneError, match="already has a module"):
        attach_adapters(model, second)
    assert model.attached_modules() == {a.point.name: a for a in first.values()}
    detach_adapters(model, second)
    assert model.attached_modules() == {a.point.name: a for a in first.values()}
    detach_adapters(model, first)
    assert model.attached_modules() == {}


def test_adapters_train_on_a_bf16_backbone(images, tokens):
    bf16 = load_clip("vladapt-test-tiny", dtype=torch.bfloat16).model
    with torch.no_grad():
        frozen = bf16.encode_image(images)
    adapters = build_heba_adapters(bf16, [1, 2], generator=seeded(14))
    assert all(p.dtype == torch.float32 for p in adapters.parameters())
    attach_adapters(bf16, adapters)
    feats = bf16.encode_image(images, ForwardContext(SlowFastScale(generator=seeded())))
    assert feats.dtype == torch.bfloat16 and torch.isfinite(feats).all()
    assert not torch.equal(feats, frozen)
    (feats.float().square().sum() + bf16.encode_text(tokens).float().square().sum()).backward()
    grads = [p.grad for p in adapters.parameters()]
    assert all(gr is not None and gr.dtype == torch.float32 and torch.isfinite(gr).all() for gr in grads)


# ---------------------------------------------------------------- slow-fast scale


@pytest.mark.parametrize("make", [lambda: seeded(15), lambda: random.Random(15)], ids=["torch", "python"])
def test_slow_fast_probabilities(make):
    scale = SlowFastScale(generator=make())
    draws = [scale("visual", 0) for _ in range(20_000)]
    assert set(draws) == {0.025, 0.025 * 2.25}
    p_fast = sum(d > 0.025 for d in draws) / len(draws)
    assert p_fast == pytest.approx(0.2, abs=0.01)
    again = SlowFastScale(generator=make())
    assert [again("text", 3) for _ in range(100)] == draws[:100]


def test_slow_fast_eval_returns_the_base_without_drawing():
    g = seeded(16)
    state = g.get_state()
    scale = SlowFastScale(base=0.01, generator=g, training=False)
    assert {scale("visual", i) for i in range(50)} == {0.01}
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("kwargs", [dict(base=-0.1), dict(factor=0.0), dict(ratio=1.5), dict(ratio=-0.1)])
def test_slow_fast_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        SlowFastScale(**kwargs)


def test_one_draw_per_block_and_tower_per_forward(clean, images, tokens):
    model = clean.model
    adapters = build_heba_adapters(model, [1, 2], generator=seeded(17))
    attach_adapters(model, adapters)
    calls = []
    slow_fast = SlowFastScale(generator=seeded(18))

    def recording(tower, layer):
        calls.append((tower, layer))
        return slow_fast(tower, layer)

    ctx = ForwardContext(recording)
    with torch.no_grad():
        model.encode_image(images, ctx)
        model.encode_text(tokens, ctx)
    assert calls == [("visual", 0), ("visual", 1), ("text", 0), ("text", 1)]
    assert set(ctx.scales) == set(calls)

    def features(ctx):
        with torch.no_grad():
            return model.encode_image(images, ctx), model.encode_text(tokens, ctx)

    # ratio 1: never fast; ratio 0: always fast (u > 0) -> the same as fixed adapter scales.
    always_slow = features(ForwardContext(SlowFastScale(ratio=1.0, generator=seeded())))
    always_fast = features(ForwardContext(SlowFastScale(ratio=0.0, generator=seeded())))
    assert all(torch.equal(a, b) for a, b in zip(always_slow, features(ForwardContext())))
    for a in adapters.values():
        a.scale = 0.025 * 2.25
    assert all(torch.equal(a, b) for a, b in zip(always_fast, features(ForwardContext())))
