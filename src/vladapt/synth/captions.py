"""Natural-English captions of a :class:`~vladapt.synth.scene.Scene`.

A caption mentions a random, non-empty subset of the scene's attributes through one of several
sentence frames. Whatever it leaves out it never contradicts: grammatical number always follows the
true count, and every word for a colour, shape, size, count, background or position is the scene's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vladapt.synth.scene import Scene

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "heart": "hearts",
    "diamond": "diamonds",
    "hexagon": "hexagons",
    "ring": "rings",
    "arrow": "arrows",
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}

# Adjectives that are true of every rendering of the shape, so captions can teach them.
SHAPE_EPITHETS: dict[str, str] = {"star": "five-pointed", "hexagon": "six-sided"}

BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("a plain background", "a uniform background", "a solid background"),
    "horizontal stripes": (
        "horizontal stripes",
        "a horizontally striped background",
        "a background with horizontal stripes",
        "a striped background",
    ),
    "vertical stripes": (
        "vertical stripes",
        "a vertically striped background",
        "a background with vertical stripes",
        "a striped background",
    ),
    "diagonal stripes": (
        "diagonal stripes",
        "a diagonally striped background",
        "a background with diagonal stripes",
        "a striped background",
    ),
    "checkerboard": ("a checkerboard", "a checkered background", "a checkerboard pattern"),
    "polka dots": (
        "polka dots",
        "a dotted background",
        "a polka-dot background",
        "a background of evenly spaced dots",
    ),
    "grid": ("a grid", "a grid background", "a background with a grid of thin lines"),
    "crosshatch": ("a crosshatched background", "a crosshatch pattern", "crosshatching", "a diagonal grid"),
    "speckles": ("a speckled background", "a noisy background", "random speckles"),
    "gradient": ("a gradient background", "a smoothly shaded background", "a gradient"),
    "zigzag": ("a zigzag background", "zigzag stripes", "a zigzag pattern"),
    "waves": ("a wavy background", "wavy stripes", "a pattern of waves"),
}

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle"),
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "top left": ("in the top left corner", "in the top left", "at the top left"),
    "top right": ("in the top right corner", "in the top right", "at the top right"),
    "bottom left": ("in the bottom left corner", "in the bottom left", "at the bottom left"),
    "bottom right": ("in the bottom right corner", "in the bottom right", "at the bottom right"),
}

_BG_PREPOSITIONS = ("on", "against", "in front of", "over")
_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "a rendering of ", "a drawing of ")

# Phrases that name the background pattern on its own, for captions about the background only
# (true of every rendering: the objects are drawn over the pattern, never instead of it).
BACKGROUND_ONLY_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("a plain background", "a plain, uniform background", "a plain solid background"),
    "horizontal stripes": ("horizontal stripes", "a pattern of horizontal stripes", "a horizontal stripe pattern"),
    "vertical stripes": ("vertical stripes", "a pattern of vertical stripes", "a vertical stripe pattern"),
    "diagonal stripes": ("diagonal stripes", "a pattern of diagonal stripes", "a diagonal stripe pattern"),
    "checkerboard": ("a checkerboard", "a checkerboard pattern", "a checkerboard texture", "a checkered pattern"),
    "polka dots": ("polka dots", "a polka-dot pattern", "a polka dots texture", "a dotted pattern"),
    "grid": ("a grid", "a grid pattern", "a grid texture", "a grid of thin lines"),
    "crosshatch": ("crosshatching", "a crosshatch pattern", "a crosshatch texture", "a crosshatched pattern"),
    "speckles": ("speckles", "a speckled texture", "a speckles pattern", "random speckles"),
    "gradient": ("a gradient", "a smooth gradient", "a gradient texture", "a shaded gradient"),
    "zigzag": ("a zigzag pattern", "a zigzag texture", "zigzag stripes", "a zigzag"),
    "waves": ("waves", "a wave pattern", "a wavy texture", "a pattern of waves"),
}

# How often each attribute is mentioned; shape and colour most, as in real alt-text.
_MENTION_P = {"shape": 0.85, "color": 0.75, "count": 0.6, "size": 0.45, "background": 0.8, "position": 0.45}
# Of the captions that mention the background, the share that names nothing else.
_BACKGROUND_ONLY_P = 0.12


def with_article(phrase: str) -> str:
    """Prefix ``a`` or ``an`` as the first word of ``phrase`` requires (our vocabulary has no exceptions)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """One element of ``options``, uniformly."""
    return options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class _Mention:
    shape: bool
    color: bool
    count: bool
    size: bool
    background: bool
    position: bool


def _choose_mentions(scene: Scene, rng: np.random.Generator) -> _Mention:
    keys = [k for k in _MENTION_P if k != "position" or scene.position is not None]
    draws = rng.random(len(keys))
    chosen = {k: bool(d < _MENTION_P[k]) for k, d in zip(keys, draws)}
    if not any(chosen.values()):
        chosen[keys[int(rng.integers(len(keys)))]] = True
    chosen.setdefault("position", False)
    return _Mention(**chosen)


def _noun_phrase(scene: Scene, m: _Mention, rng: np.random.Generator, with_color: bool) -> str:
    plural = scene.count > 1
    if m.shape:
        noun = PLURALS[scene.shape] if plural else scene.shape
        if scene.shape in SHAPE_EPITHETS and rng.random() < 0.2:
            noun = f"{SHAPE_EPITHETS[scene.shape]} {noun}"
    else:
        noun = pick(rng, ("shapes", "objects") if plural else ("shape", "object"))
    words = []
    if m.size:
        words.append(pick(rng, SIZE_WORDS[scene.size]))
    if m.color and with_color:
        words.append(scene.color)
    body = " ".join([*words, noun])
    if m.count:
        if scene.count == 1:
            return pick(rng, ("one " + body, "a single " + body, with_article(body)))
        if scene.count == 2 and rng.random() < 0.25:
            return "a pair of " + body
        return f"{NUMBER_WORDS[scene.count]} {body}"
    if plural:
        return body if rng.random() < 0.7 else "some " + body
    return with_article(body)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random true caption of ``scene``.

    For example ``"a photo of two small red stars on a striped background"``, ``"red stars"`` or
    ``"a big blue circle in the top left"``.
    """
    m = _choose_mentions(scene, rng)
    if m.background and rng.random() < _BACKGROUND_ONLY_P:
        text = pick(rng, _PREFIXES) + pick(rng, BACKGROUND_ONLY_PHRASES[scene.background])
        return _finish(text, rng)
    be = "are" if scene.count > 1 else "is"
    pos = " " + pick(rng, POSITION_PHRASES[scene.position]) if m.position else ""
    bg_np = pick(rng, BACKGROUND_PHRASES[scene.background]) if m.background else ""
    bg = f" {pick(rng, _BG_PREPOSITIONS)} {bg_np}" if bg_np else ""

    frames = ["prefix", "there"]
    if pos or bg:
        frames.append("predicate")
    if bg_np:
        frames.append("background_first")
    if m.color:
        frames.append("color_clause")
    frame = frames[int(rng.integers(len(frames)))]

    if frame == "color_clause":
        text = f"{_noun_phrase(scene, m, rng, with_color=False)} that {be} {scene.color}{pos}{bg}"
    else:
        np_ = _noun_phrase(scene, m, rng, with_color=True)
        if frame == "prefix":
            text = f"{pick(rng, _PREFIXES)}{np_}{pos}{bg}"
        elif frame == "there":
            text = f"there {be} {np_}{pos}{bg}"
        elif frame == "predicate":
            text = f"{np_} {be}{pos}{bg}"
        else:
            joiner = "behind" if " with " in bg_np or rng.random() < 0.5 else "with"
            text = f"{bg_np} {joiner} {np_}{pos}"

    return _finish(text, rng)


def _finish(text: str, rng: np.random.Generator) -> str:
    """Random sentence case and full stop."""
    finish = rng.random(2)
    if finish[0] < 0.3:
        text = text[0].upper() + text[1:]
    if finish[1] < 0.3:
        text += "."
    return text
