"""Rendering: masks, colours, layout, backgrounds and styles produce what scenes and captions claim."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest

from vladapt.errors import ConfigError
from vladapt.synth.render import (
    BACKGROUND_TONES,
    CLEAN,
    MILD,
    SHADE_RADIUS,
    SHIFTS,
    STRONG,
    TONE_RANGES,
    Style,
    render,
    shape_mask,
    shifted,
)
from vladapt.synth.scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, Scene

PALETTE = {name: np.array(rgb, dtype=float) for name, rgb in COLORS.items()}


def _scene(**overrides: object) -> Scene:
    values: dict[str, object] = dict(
        shape="square", color="red", size="large", count=1, background="plain", position="center"
    )
    values.update(overrides)
    if values["count"] != 1 and "position" not in overrides:
        values["position"] = None
    return Scene(**values)  # type: ignore[arg-type]


def _nearest_color(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: np.linalg.norm(PALETTE[name] - rgb))


def _object_pixels(image: np.ndarray, color: str, tolerance: float = 60.0) -> np.ndarray:
    return np.linalg.norm(image.astype(float) - PALETTE[color], axis=-1) < tolerance


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask (small images only)."""
    seen = np.zeros_like(mask)
    found = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        found += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return found


@pytest.mark.parametrize("diameter", [12, 24])
def test_every_shape_has_a_distinct_mask(diameter: int) -> None:
    masks = {shape: shape_mask(shape, diameter) for shape in SHAPES}
    for mask in masks.values():
        assert mask.shape == (diameter, diameter) and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() == 1.0
        # Anti-aliased edges, and a transparent border so neighbouring objects never merge.
        assert ((mask > 0) & (mask < 1)).any()
        assert max(mask[0].max(), mask[-1].max(), mask[:, 0].max(), mask[:, -1].max()) <= 0.5
    for a, b in itertools.combinations(SHAPES, 2):
        difference = np.abs(masks[a] - masks[b]).sum() / max(masks[a].sum(), masks[b].sum())
        assert difference > 0.15, f"{a} and {b} masks are too alike at {diameter}px"


def test_outline_masks_are_rims_that_thin_with_strength() -> None:
    filled = shape_mask("star", 24)
    mild = shape_mask("star", 24, outline_steps=13)
    strong = shape_mask("star", 24, outline_steps=5)
    assert (mild <= filled + 1e-6).all() and (strong <= mild + 1e-6).all()
    assert filled.sum() > mild.sum() > strong.sum() > 0.15 * filled.sum()


@pytest.mark.parametrize("color", list(COLORS))
def test_clean_objects_have_their_nominal_colour(color: str) -> None:
    rng = np.random.default_rng(0)
    for background in BACKGROUNDS:
        image = render(_scene(color=color, background=background), CLEAN, rng)
        exact = (image == np.array(COLORS[color], np.uint8)).all(axis=-1)
        # A large square's opaque core (>= 15x15 px even at its smallest) is exactly the nominal colour.
        assert exact.sum() >= 15 * 15, (color, background)


def test_backgrounds_always_contrast_with_the_object_colour() -> None:
    for color, tones in BACKGROUND_TONES.items():
        assert tones
        for tone in tones:
            (lo, hi), (step_lo, step_hi) = TONE_RANGES[tone]
            greys = [lo, hi, lo + step_lo, lo + step_hi, hi + step_lo, hi + step_hi]
            distance = min(np.linalg.norm(PALETTE[color] - g) for g in greys)
            assert distance > 80, (color, tone, distance)


def test_shaded_colours_stay_nearest_to_their_name() -> None:
    for color in COLORS:
        centres = []
        for seed in range(12):
            image = render(_scene(color=color), Style(shade=1.0), np.random.default_rng(seed))
            centres.append(image[32, 32].astype(float))
            assert _nearest_color(centres[-1]) == color
        assert max(np.linalg.norm(c - PALETTE[color]) for c in centres) > 0.3 * SHADE_RADIUS[color]


@pytest.mark.parametrize("position", POSITIONS)
def test_single_objects_sit_where_their_position_says(position: str) -> None:
    for seed, size in itertools.product(range(4), ("small", "large")):
        image = render(_scene(size=size, position=position), CLEAN, np.random.default_rng(seed))
        ys, xs = np.nonzero(_object_pixels(image, "red"))
        cy, cx = ys.mean() / 64, xs.mean() / 64
        expect_y = 0 if "top" in position else 2 if "bottom" in position else 1
        expect_x = 0 if "left" in position else 2 if "right" in position else 1
        assert int(cy * 3) == expect_y and int(cx * 3) == expect_x, (position, size, cy, cx)


@pytest.mark.parametrize("style", [CLEAN, shifted("clutter", STRONG)], ids=["clean", "clutter"])
def test_object_count_and_size_are_visible(style: Style) -> None:
    areas = {}
    for count, size, shape in itertools.product((1, 2, 3, 4), ("small", "large"), ("circle", "square")):
        for seed in range(3):
            scene = _scene(count=count, size=size, shape=shape, color="blue", background="grid")
            mask = _object_pixels(render(scene, style, np.random.default_rng(seed)), "blue")
            assert _components(mask) == count, (count, size, shape, seed)
            areas.setdefault(size, []).append(mask.sum() / count)
    assert min(areas["large"]) > 2.5 * max(areas["small"])


def _background_patch(background: str, seed: int) -> np.ndarray:
    """The top-left 28x28 px, which a small object in the bottom-right corner never reaches."""
    scene = _scene(size="small", position="bottom right", background=background, color="red")
    return render(scene, CLEAN, np.random.default_rng(seed))[:28, :28].astype(int)


def test_backgrounds_have_their_pattern() -> None:
    for seed in range(5):
        plain = _background_patch("plain", seed)
        assert (plain == plain[0, 0]).all()
        rows = _background_patch("horizontal stripes", seed)
        assert (rows == rows[:, :1]).all() and not (rows == rows[:1]).all()
        cols = _background_patch("vertical stripes", seed)
        assert (cols == cols[:1]).all() and not (cols == cols[:, :1]).all()
        checks = _background_patch("checkerboard", seed)
        assert len(np.unique(checks.reshape(-1, 3), axis=0)) == 2
        assert len(np.unique(_background_patch("gradient", seed).reshape(-1, 3), axis=0)) > 10
        for background in BACKGROUNDS[1:]:
            assert len(np.unique(_background_patch(background, seed).reshape(-1, 3), axis=0)) >= 2


def _roughness(image: np.ndarray) -> float:
    return float(np.abs(np.diff(image.astype(float), axis=1)).mean())


def test_style_effects_do_what_they_say() -> None:
    # These styles draw nothing from the generator before the layout, so the seed fixes the same
    # background and object placement as the clean render.
    scene = _scene(count=3, size="small", shape="star", background="checkerboard", color="green")
    clean = render(scene, CLEAN, np.random.default_rng(7))
    assert render(scene, shifted("low_contrast"), np.random.default_rng(7)).std() < 0.6 * clean.std()
    assert _roughness(render(scene, shifted("blur"), np.random.default_rng(7))) < 0.7 * _roughness(clean)
    assert _roughness(render(scene, shifted("noise"), np.random.default_rng(7))) > 1.5 * _roughness(clean)
    large = _scene(count=2, shape="circle", background="checkerboard", color="green")
    filled = _object_pixels(render(large, CLEAN, np.random.default_rng(7)), "green").sum()
    outlined = _object_pixels(render(large, shifted("outline"), np.random.default_rng(7)), "green").sum()
    assert 0 < outlined < 0.5 * filled
    cluttered = render(scene, shifted("clutter"), np.random.default_rng(7))
    assert (cluttered != clean).any()


def test_mild_shifts_are_milder_than_strong_ones() -> None:
    scene = _scene(count=2, background="plain", shape="circle")
    clean = render(scene, CLEAN, np.random.default_rng(3)).astype(float)
    for kind in ("noise", "blur", "low_contrast", "outline"):
        mild = render(scene, shifted(kind, MILD), np.random.default_rng(3)).astype(float)
        strong = render(scene, shifted(kind, STRONG), np.random.default_rng(3)).astype(float)
        assert 0 < np.abs(mild - clean).mean() < np.abs(strong - clean).mean(), kind


def test_render_is_deterministic_given_the_generator_and_supports_other_sizes() -> None:
    scene = _scene(count=2, shape="heart", background="waves")
    for kind in SHIFTS:
        a = render(scene, shifted(kind), np.random.default_rng(5))
        b = render(scene, shifted(kind), np.random.default_rng(5))
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3) and (a == b).all()
    assert render(scene, CLEAN, np.random.default_rng(0), size=96).shape == (96, 96, 3)


def test_invalid_styles_and_scenes_are_rejected() -> None:
    with pytest.raises(ConfigError, match="outline"):
        Style(outline=1.5)
    with pytest.raises(ConfigError, match="sparkle"):
        shifted("sparkle")
    with pytest.raises(ConfigError, match="shape"):
        _scene(shape="blob")
    with pytest.raises(ConfigError, match="position"):
        _scene(count=2, position="left")
    with pytest.raises(ConfigError, match="position"):
        _scene(count=1, position=None)
    assert Style(outline=0.3, noise=1.0).name == "outline0.3+noise1"
    assert CLEAN.name == "clean"
