"""The synthetic image-text world: a deterministic stream of (image, caption, scene) samples.

Sample ``index`` of stream ``seed`` is drawn from its own generator ``default_rng([seed, index])``,
so it is the same whether it is produced alone, in any batch, or in any data-loader worker.

    >>> images, captions, scenes = sample_batch(0, 8)
    >>> images.shape, images.dtype
    ((8, 64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from vladapt.errors import ConfigError
from vladapt.synth.captions import caption
from vladapt.synth.render import CLEAN, DEFAULT_SIZE, MILD, SHIFTS, Style, render, shifted
from vladapt.synth.scene import Scene, sample_scene

__all__ = [
    "DEFAULT_STYLE_MIX",
    "GENERATOR_VERSION",
    "Scene",
    "Style",
    "StyleMix",
    "benchmark",
    "caption",
    "pretrain_style_mix",
    "render",
    "sample",
    "sample_batch",
    "sample_scene",
]

# Bump whenever the same (seed, index) would produce different pixels or text; dataset manifests
# record it so stale generated datasets are rebuilt.
GENERATOR_VERSION = "3"

StyleMix = Sequence[tuple[Style, float]]


def pretrain_style_mix(
    shifted_fraction: float = 0.2, strength: float = MILD
) -> tuple[tuple[Style, float], ...]:
    """Mostly clean images, plus ``shifted_fraction`` split evenly over every single-shift style.

    Seeing *mild* versions of the downstream shifts in pretraining keeps them in-distribution
    enough to adapt to, while downstream sets use the strong versions.
    """
    if not 0.0 <= shifted_fraction <= 1.0:
        raise ConfigError(f"shifted_fraction={shifted_fraction!r} is outside [0, 1]")
    share = shifted_fraction / len(SHIFTS)
    return ((CLEAN, 1.0 - shifted_fraction), *((shifted(kind, strength), share) for kind in SHIFTS))


DEFAULT_STYLE_MIX = pretrain_style_mix()


def _cumulative(style_mix: StyleMix) -> tuple[list[Style], np.ndarray]:
    styles = [style for style, _ in style_mix]
    weights = np.array([weight for _, weight in style_mix], dtype=np.float64)
    if not styles or (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError("style_mix must be a non-empty list of (Style, weight >= 0) with a positive total")
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0
    return styles, cumulative


def _draw(
    seed: int, index: int, styles: list[Style], cumulative: np.ndarray, size: int
) -> tuple[np.ndarray, str, Scene]:
    rng = np.random.default_rng([seed, index])
    style = styles[int(np.searchsorted(cumulative, rng.random(), side="right"))]
    scene = sample_scene(rng)
    image = render(scene, style, rng, size)
    return image, caption(scene, rng), scene


def sample(
    seed: int, index: int, style_mix: StyleMix = DEFAULT_STYLE_MIX, size: int = DEFAULT_SIZE
) -> tuple[np.ndarray, str, Scene]:
    """Sample ``index`` of stream ``seed``: (uint8 image ``[size, size, 3]``, caption, scene)."""
    styles, cumulative = _cumulative(style_mix)
    return _draw(seed, index, styles, cumulative, size)


def sample_batch(
    seed: int | np.random.Generator,
    n: int,
    style_mix: StyleMix = DEFAULT_STYLE_MIX,
    start: int = 0,
    size: int = DEFAULT_SIZE,
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Samples ``start .. start + n - 1`` of a stream: images ``[n, size, size, 3]`` uint8, captions, scenes.

    An int ``seed`` names the stream, so batches can be cut anywhere and still concatenate to the
    same stream. A ``Generator`` draws a fresh stream seed from it (for callers that already own one).
    """
    if n < 0:
        raise ConfigError(f"n={n} must be >= 0")
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(2**63))
    styles, cumulative = _cumulative(style_mix)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    scenes: list[Scene] = []
    for i in range(n):
        images[i], text, scene = _draw(seed, start + i, styles, cumulative, size)
        captions.append(text)
        scenes.append(scene)
    return images, captions, scenes


def benchmark(n: int = 2000, style_mix: StyleMix = DEFAULT_STYLE_MIX, size: int = DEFAULT_SIZE) -> float:
    """Images (with captions) generated per second on one core, after warming the mask cache."""
    sample_batch(0, min(n, 200), style_mix, size=size)
    begin = time.perf_counter()
    sample_batch(1, n, style_mix, size=size)
    return n / (time.perf_counter() - begin)
