"""The attribute space of the synthetic world and the :class:`Scene` that holds one point of it.

A scene is a few *identical* objects (same shape, colour and size) on a patterned background. Keeping
the objects identical is what lets a caption such as "two small red stars" be exactly true; richness
comes from the product of the attributes instead. Position is an attribute only of single-object
scenes, because "two stars on the left" would constrain the layout more than the canvas allows for
large objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from vladapt.errors import ConfigError

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "diamond",
    "hexagon",
    "ring",
    "arrow",
)

# Nominal sRGB of each colour. The palette is spread out so that every pair is > 90 apart in RGB,
# which leaves room for the "shade" style to vary a colour without it turning into a neighbour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (245, 215, 35),
    "green": (40, 160, 60),
    "blue": (35, 80, 215),
    "purple": (135, 55, 185),
    "pink": (245, 140, 195),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}

SIZES: tuple[str, ...] = ("small", "large")

COUNTS: tuple[int, ...] = (1, 2, 3, 4)

BACKGROUNDS: tuple[str, ...] = (
    "plain",
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "polka dots",
    "grid",
    "crosshatch",
    "speckles",
    "gradient",
    "zigzag",
    "waves",
)

POSITIONS: tuple[str, ...] = (
    "center",
    "left",
    "right",
    "top",
    "bottom",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)


@dataclass(frozen=True)
class Scene:
    """What an image shows: ``count`` identical objects on a ``background``.

    ``position`` is set exactly when ``count == 1`` (one of :data:`POSITIONS`).
    """

    shape: str
    color: str
    size: str
    count: int
    background: str
    position: str | None = None

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, tuple(COLORS))
        _check("size", self.size, SIZES)
        _check("count", self.count, COUNTS)
        _check("background", self.background, BACKGROUNDS)
        if self.count == 1:
            _check("position", self.position, POSITIONS)
        elif self.position is not None:
            raise ConfigError(
                f"Scene position {self.position!r} given for count={self.count}; "
                "position is only defined for single-object scenes (use None)"
            )


def _check(key: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ConfigError(f"Scene {key}={value!r} is not allowed; choose one of {list(allowed)}")


T = TypeVar("T")


def _pick(rng: np.random.Generator, key: str, fixed: T | Sequence[T] | None, options: Sequence[T]) -> T:
    """Draw uniformly from ``options``, or from ``fixed`` when it is a sequence, or return ``fixed``."""
    if fixed is None:
        choices = options
    elif isinstance(fixed, (list, tuple)):
        choices = fixed
        for value in choices:
            _check(key, value, options)
    else:
        return fixed  # validated by Scene.__post_init__
    if not choices:
        raise ConfigError(f"empty list of choices for Scene {key}")
    return choices[int(rng.integers(len(choices)))]


def sample_scene(
    rng: np.random.Generator,
    *,
    shape: str | Sequence[str] | None = None,
    color: str | Sequence[str] | None = None,
    size: str | Sequence[str] | None = None,
    count: int | Sequence[int] | None = None,
    background: str | Sequence[str] | None = None,
) -> Scene:
    """Sample a scene uniformly over the attribute space.

    Each keyword either fixes the attribute (a single value), restricts it (a list/tuple of allowed
    values, drawn uniformly) or leaves it free (``None``). Downstream datasets use this to pin the
    attributes that define a class and randomise the rest.
    """
    chosen_count = _pick(rng, "count", count, COUNTS)
    return Scene(
        shape=_pick(rng, "shape", shape, SHAPES),
        color=_pick(rng, "color", color, tuple(COLORS)),
        size=_pick(rng, "size", size, SIZES),
        count=chosen_count,
        background=_pick(rng, "background", background, BACKGROUNDS),
        position=_pick(rng, "position", None, POSITIONS) if chosen_count == 1 else None,
    )
