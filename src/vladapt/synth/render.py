"""Drawing a :class:`~vladapt.synth.scene.Scene` into an RGB array, in a chosen :class:`Style`.

Everything is vectorised numpy on float32 canvases. Shape masks are anti-aliased by supersampling
once per (shape, diameter, outline width) and cached, so the per-image cost is a background pattern,
a few slice blends and the optional style effects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from vladapt.errors import ConfigError
from vladapt.synth.scene import COLORS, POSITIONS, Scene

DEFAULT_SIZE = 64
MILD = 0.3
STRONG = 1.0


@dataclass(frozen=True)
class Style:
    """How a scene is drawn. Every field is an effect strength in [0, 1]; 0 switches it off.

    outline:      objects drawn as outlines; stronger = thinner line (mild ~ thick rim, strong ~ 1 px).
    clutter:      thin distractor strokes and specks drawn behind the objects.
    shade:        the object colour is shifted to a lighter/darker/tinted shade of itself.
    noise:        additive Gaussian pixel noise.
    blur:         Gaussian blur.
    low_contrast: the image is pulled towards its mean grey.

    The clean pretraining look is ``Style()``. Effects never change what a caption or class label
    says: shades stay nearest to their nominal colour, clutter stays behind the objects and is made
    of strokes and specks rather than shapes of the vocabulary.
    """

    outline: float = 0.0
    clutter: float = 0.0
    shade: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    low_contrast: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"Style.{f.name}={value!r} is outside [0, 1]")

    @property
    def name(self) -> str:
        """A short stable label such as ``clean`` or ``outline0.3+clutter1``."""
        active = [f"{f.name}{getattr(self, f.name):g}" for f in fields(self) if getattr(self, f.name)]
        return "+".join(active) or "clean"


CLEAN = Style()
SHIFTS: tuple[str, ...] = tuple(f.name for f in fields(Style))


def shifted(kind: str, strength: float = STRONG) -> Style:
    """The style with the single domain shift ``kind`` (one of :data:`SHIFTS`) at ``strength``."""
    if kind not in SHIFTS:
        raise ConfigError(f"unknown style shift {kind!r}; choose one of {list(SHIFTS)}")
    return Style(**{kind: strength})


# ----------------------------------------------------------------------------------------------
# Shape masks

_SUPERSAMPLE = 4


def _regular_polygon(n: int, radius: float, phase: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular n-gon (or an n-pointed star when ``inner`` is given), y pointing up."""
    if inner is None:
        angles = phase + 2 * np.pi * np.arange(n) / n
        radii = np.full(n, radius)
    else:
        angles = phase + np.pi * np.arange(2 * n) / n
        radii = np.where(np.arange(2 * n) % 2 == 0, radius, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over the grid; works for the non-convex star and arrow."""
    inside = np.zeros(x.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_y = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at_y)
        x0, y0 = x1, y1
    return inside


_ARROW = np.array(
    [(-0.88, 0.22), (0.1, 0.22), (0.1, 0.62), (0.9, 0.0), (0.1, -0.62), (0.1, -0.22), (-0.88, -0.22)]
)


def _shape_region(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean inside-test in unit coordinates (x right, y up, the shape fits in [-0.95, 0.95]^2)."""
    r2 = x * x + y * y
    if shape == "circle":
        return r2 <= 0.92**2
    if shape == "ring":
        return (r2 <= 0.92**2) & (r2 >= 0.5**2)
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.78
    if shape == "diamond":
        return np.abs(x) / 0.68 + np.abs(y) / 0.95 <= 1.0
    if shape == "triangle":
        # Shifted so the bounding box, not the circumcentre, is centred.
        return _inside_polygon(x, y + 0.27, _regular_polygon(3, 1.08, np.pi / 2))
    if shape == "star":
        return _inside_polygon(x, y + 0.05, _regular_polygon(5, 0.97, np.pi / 2, inner=0.4))
    if shape == "hexagon":
        return _inside_polygon(x, y, _regular_polygon(6, 0.93, 0.0))
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 0.28) & (ay <= 0.88)) | ((ay <= 0.28) & (ax <= 0.88))
    if shape == "heart":
        # Classic implicit heart curve (x in +-1.14, y in [-1, 1.24]), scaled and centred to +-0.88.
        hx, hy = x * 1.3, y * 1.3 + 0.12
        return (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy**3 <= 0
    if shape == "arrow":
        return _inside_polygon(x, y, _ARROW)
    raise ConfigError(f"no mask for shape {shape!r}")


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion; alternating 4- and 8-neighbourhoods approximates a disc of radius ``steps``."""
    out = mask.copy()
    for step in range(steps):
        src = out.copy()
        out[1:] &= src[:-1]
        out[:-1] &= src[1:]
        out[:, 1:] &= src[:, :-1]
        out[:, :-1] &= src[:, 1:]
        if step % 2:
            out[1:, 1:] &= src[:-1, :-1]
            out[:-1, :-1] &= src[1:, 1:]
            out[1:, :-1] &= src[:-1, 1:]
            out[:-1, 1:] &= src[1:, :-1]
    return out


@lru_cache(maxsize=None)
def shape_mask(shape: str, diameter: int, outline_steps: int = 0) -> np.ndarray:
    """Anti-aliased alpha mask ``[diameter, diameter]`` (float32 in [0, 1]), cached.

    ``outline_steps`` > 0 keeps only a rim of that many supersampled pixels
    (``outline_steps / 4`` output pixels) inside the shape's edge.
    """
    n = diameter * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
    x = coords[None, :]
    y = -coords[:, None]
    region = _shape_region(shape, np.broadcast_to(x, (n, n)), np.broadcast_to(y, (n, n)))
    if outline_steps:
        region = region & ~_erode(region, outline_steps)
    alpha = region.reshape(diameter, _SUPERSAMPLE, diameter, _SUPERSAMPLE).mean(axis=(1, 3))
    alpha = alpha.astype(np.float32)
    alpha.flags.writeable = False  # shared through the cache
    return alpha


def _outline_steps(strength: float) -> int:
    if strength <= 0:
        return 0
    width_px = 1.25 + 2.75 * (1.0 - strength)
    return max(1, round(width_px * _SUPERSAMPLE))


# ----------------------------------------------------------------------------------------------
# Backgrounds

# Which background brightness each object colour may sit on, so that it always stands out;
# most colours allow both, the light ones (white, yellow, pink) and the dark ones (black, brown)
# only the contrasting brightness.
BACKGROUND_TONES: dict[str, tuple[str, ...]] = {
    "red": ("light", "dark"),
    "orange": ("light", "dark"),
    "yellow": ("dark",),
    "green": ("light", "dark"),
    "blue": ("light", "dark"),
    "purple": ("light", "dark"),
    "pink": ("dark",),
    "brown": ("light",),
    "white": ("dark",),
    "black": ("light",),
}
# Grey level of the base tone and the (signed) step to the pattern tone, per brightness.
TONE_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "light": ((200.0, 235.0), (-70.0, -50.0)),
    "dark": ((25.0, 50.0), (50.0, 70.0)),
}
_TINT = 10.0  # max per-channel tint of the background greys; keeps them unnamed-colour neutral


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _stripes(u: np.ndarray, period: float, phase: float) -> np.ndarray:
    return ((u + phase) % period) < (period / 2)


def _pattern(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Blend weight in [0, 1] between the base tone (0) and the pattern tone (1), ``[size, size]``."""
    yy, xx = _grid(size)
    k = size / DEFAULT_SIZE
    u = rng.random(4)  # shared draws keep the per-pattern code short
    period = (6.0 + 4.0 * u[0]) * k
    ox, oy = u[1] * 16.0 * k, u[2] * 16.0 * k
    if name == "plain":
        return np.zeros((size, size), np.float32)
    if name == "horizontal stripes":
        return _stripes(yy, period, oy)
    if name == "vertical stripes":
        return _stripes(xx, period, ox)
    if name == "diagonal stripes":
        along = xx + yy if u[3] < 0.5 else xx - yy
        return _stripes(along * np.float32(0.7071), period, ox)
    if name == "checkerboard":
        return ((np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2).astype(bool)
    if name == "polka dots":
        pitch = period + 2.0 * k
        dx = (xx + ox) % pitch - pitch / 2
        dy = (yy + oy) % pitch - pitch / 2
        return dx * dx + dy * dy <= (pitch * (0.22 + 0.08 * u[3])) ** 2
    if name == "grid":
        pitch, width = period + 2.0 * k, max(1.0, k)
        return (((xx + ox) % pitch) < width) | (((yy + oy) % pitch) < width)
    if name == "crosshatch":
        pitch, width = period + 2.0 * k, 1.4 * max(1.0, k)
        return (((xx + yy + ox) % pitch) < width) | (((xx - yy + oy) % pitch) < width)
    if name == "speckles":
        block = max(1, round(2 * k))
        cells = -(-size // block)
        coarse = rng.random((cells, cells)) < 0.5
        return np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:size, :size]
    if name == "gradient":
        theta = 2 * np.pi * u[3]
        ramp = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
        lo, hi = ramp.min(), ramp.max()
        return (ramp - lo) / (hi - lo)
    if name in ("zigzag", "waves"):
        across, along = (yy, xx) if u[3] < 0.5 else (xx, yy)
        wavelength = (12.0 + 8.0 * u[1]) * k
        if name == "zigzag":
            offset = np.abs((along / (wavelength / 2)) % 2 - 1) * (wavelength * 0.45)
        else:
            offset = np.sin(along * np.float32(2 * np.pi / wavelength)) * (wavelength * 0.18)
        return _stripes(across + offset, period + 2.0 * k, oy)
    raise ConfigError(f"no renderer for background {name!r}")


def _background(scene: Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    tones = BACKGROUND_TONES[scene.color]
    (base_lo, base_hi), (step_lo, step_hi) = TONE_RANGES[tones[int(rng.integers(len(tones)))]]
    draws = rng.random(2)
    base_grey = base_lo + (base_hi - base_lo) * draws[0]
    step = step_lo + (step_hi - step_lo) * draws[1]
    tint = rng.uniform(-_TINT, _TINT, 3)
    base = (base_grey + tint).astype(np.float32)
    delta = np.full(3, step, np.float32)
    weight = _pattern(scene.background, rng, size).astype(np.float32, copy=False)
    return base + weight[:, :, None] * delta


# ----------------------------------------------------------------------------------------------
# Layout, effects and the render entry point

_DIAMETER = {"small": 0.19, "large": 0.375}
_POSITION_CENTRE = (0.22, 0.5, 0.78)


def _position_cell(position: str) -> tuple[int, int]:
    words = position.split()
    row = 0 if "top" in words else 2 if "bottom" in words else 1
    col = 0 if "left" in words else 2 if "right" in words else 1
    return row, col


_POSITION_CELLS = {p: _position_cell(p) for p in POSITIONS}


def _layout(scene: Scene, rng: np.random.Generator, size: int) -> tuple[int, list[tuple[int, int]]]:
    """Object diameter and top-left corners; objects never overlap or touch."""
    diameter = max(5, round(_DIAMETER[scene.size] * size * rng.uniform(0.9, 1.1)))
    if scene.count == 1:
        row, col = _POSITION_CELLS[scene.position]
        jitter = rng.uniform(-0.04, 0.04, 2) * size
        centre = np.array([_POSITION_CENTRE[row], _POSITION_CENTRE[col]]) * size + jitter
        corner = np.clip(np.round(centre - diameter / 2), 0, size - diameter).astype(int)
        return diameter, [(int(corner[0]), int(corner[1]))]
    # One object per cell of a coarse grid (2x2 for large, 3x3 for small, so four always fit); a
    # margin inside each cell keeps neighbours at least two margins apart.
    per_side = 2 if scene.size == "large" else 3
    cell = size / per_side
    margin = 0.03 * size
    slack = max(0.0, cell - diameter - 2 * margin)
    cells = rng.permutation(per_side * per_side)[: scene.count]
    offsets = margin + rng.random((scene.count, 2)) * slack
    corners = [
        (round((index // per_side) * cell + dy), round((index % per_side) * cell + dx))
        for index, (dy, dx) in zip(cells, offsets)
    ]
    return diameter, corners


def _palette_radius() -> dict[str, float]:
    rgb = {name: np.array(value, np.float64) for name, value in COLORS.items()}
    return {
        name: 0.45 * min(float(np.linalg.norm(v - w)) for other, w in rgb.items() if other != name)
        for name, v in rgb.items()
    }


# How far a shade may move from its nominal colour while staying nearest to it (< half the gap).
SHADE_RADIUS = _palette_radius()


def _object_color(scene: Scene, style: Style, rng: np.random.Generator) -> np.ndarray:
    color = np.array(COLORS[scene.color], np.float32)
    if style.shade:
        # Mostly lighter/darker, a little hue; clipping to the RGB cube only moves it closer.
        direction = rng.standard_normal(3) + rng.standard_normal() * 1.5
        direction /= np.linalg.norm(direction) + 1e-9
        step = style.shade * SHADE_RADIUS[scene.color] * rng.uniform(0.5, 1.0)
        color = np.clip(color + direction * step, 0, 255).astype(np.float32)
    return color


_SPECK_OFFSETS = np.stack(np.meshgrid([-0.75, 0.0, 0.75], [-0.75, 0.0, 0.75]), axis=-1).reshape(-1, 2)


def _draw_clutter(canvas: np.ndarray, strength: float, rng: np.random.Generator) -> None:
    """Thin grey strokes and small specks, blended in place behind where the objects go.

    Strokes are rasterised by splatting points spaced <= 0.5 px apart with bilinear weights into a
    coverage map; for a few dozen primitives on a small canvas this is far cheaper than computing
    every primitive's distance field over the whole canvas.
    """
    size = canvas.shape[0]
    scale = size / DEFAULT_SIZE
    n_strokes, n_specks = round(12 * strength), round(20 * strength)
    n = n_strokes + n_specks
    if n == 0:
        return
    samples = int(np.ceil(0.6 * size * 2)) + 1
    start = rng.random((n_strokes, 1, 2)) * size
    angle = rng.random((n_strokes, 1)) * 2 * np.pi
    length = rng.uniform(0.2, 0.6, (n_strokes, 1)) * size
    along = np.linspace(0.0, 1.0, samples)[None, :] * length
    stroke_pts = start + along[:, :, None] * np.stack([np.sin(angle), np.cos(angle)], axis=-1)
    # Each sample stands for its share of the stroke's length, so a stroke is ~1.3 px wide.
    stroke_w = np.broadcast_to(1.3 * length / (samples - 1) * scale, (n_strokes, samples))
    speck_pts = rng.random((n_specks, 1, 2)) * size + _SPECK_OFFSETS[None] * scale
    speck_w = np.full(speck_pts.shape[:2], 0.45 * scale * scale)
    greys = rng.uniform(50, 210, (n, 1)) + rng.uniform(-_TINT, _TINT, (n, 3))
    points = np.concatenate([stroke_pts.reshape(-1, 2), speck_pts.reshape(-1, 2)])
    weights = np.concatenate([stroke_w.reshape(-1), speck_w.reshape(-1)])
    point_greys = np.repeat(greys, [samples] * n_strokes + [len(_SPECK_OFFSETS)] * n_specks, axis=0)
    # Per point: [coverage, coverage * R, coverage * G, coverage * B], summed per pixel below.
    payload = weights[:, None] * np.concatenate([np.ones((len(points), 1)), point_greys], axis=1)

    base = np.floor(points).astype(np.int64)
    frac = points - base
    sums = np.zeros((size * size, 4))
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = base[:, 0] + dy, base[:, 1] + dx
        inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
        bilinear = np.abs(1 - dy - frac[:, 0]) * np.abs(1 - dx - frac[:, 1])
        pixel = (y * size + x)[inside]
        for c in range(4):
            sums[:, c] += np.bincount(pixel, bilinear[inside] * payload[inside, c], size * size)
    coverage = np.minimum(sums[:, :1], 1.0)
    mixed = sums[:, 1:] / np.maximum(sums[:, :1], 1e-9)
    canvas += (coverage * (mixed - canvas.reshape(-1, 3))).reshape(canvas.shape).astype(np.float32)


def _blur(canvas: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(2 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    size = canvas.shape[0]
    for axis in (0, 1):
        padded = np.pad(canvas, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        out = np.zeros_like(canvas)
        for i, w in enumerate(taps):
            out += w * (padded[i : i + size] if axis == 0 else padded[:, i : i + size])
        canvas = out
    return canvas


def render(scene: Scene, style: Style, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Draw ``scene`` in ``style`` as a uint8 RGB array ``[size, size, 3]``.

    ``rng`` decides everything the scene leaves open (exact layout and object size, background tones
    and phase, the style's random parts), so a seeded generator gives reproducible pixels.
    """
    canvas = _background(scene, rng, size)
    if style.clutter:
        _draw_clutter(canvas, style.clutter, rng)
    color = _object_color(scene, style, rng)
    diameter, corners = _layout(scene, rng, size)
    alpha = shape_mask(scene.shape, diameter, _outline_steps(style.outline))[:, :, None]
    for top, left in corners:
        region = canvas[top : top + diameter, left : left + diameter]
        region += alpha * (color - region)
    if style.low_contrast:
        canvas = canvas.mean() + (canvas - canvas.mean()) * (1.0 - 0.6 * style.low_contrast)
    if style.blur:
        canvas = _blur(canvas, 1.3 * style.blur)
    if style.noise:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * (22.0 * style.noise)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
