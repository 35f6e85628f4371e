"""CuPL-style description banks for the synthetic datasets: ``{classname: [sentence, ...]}``.

Descriptions are composed from facts that hold for *every* image of the class in its dataset, whatever
the style: nothing says "filled" (outline styles), and nothing pins an attribute the class leaves
random (count in ``synth_shapes``, colour in ``synth_counts``, objects in ``synth_textures``).
"""

from __future__ import annotations

import re

from vladapt.synth.captions import BACKGROUND_PHRASES, NUMBER_WORDS, PLURALS, with_article

# "{c}" marks where an optional colour adjective goes; a leading "a " is fixed up to "an" as needed.
SHAPE_FACTS: dict[str, tuple[str, ...]] = {
    "circle": (
        "a round {c}shape with no corners",
        "a {c}shape whose edge is the same distance from its center all the way around",
        "a perfectly round {c}shape",
    ),
    "square": (
        "a {c}shape with four equal sides and four right angles",
        "an upright {c}shape with two horizontal and two vertical edges",
        "a {c}box shape with straight edges",
    ),
    "triangle": (
        "a {c}shape with three straight sides and three corners",
        "a {c}shape with a flat base and one corner pointing up",
    ),
    "star": (
        "a {c}shape with five sharp points",
        "a five-pointed {c}shape with one point facing up",
        "a {c}shape with five spikes around its center",
    ),
    "cross": (
        "a {c}plus sign made of two crossing bars",
        "a {c}shape with four equal arms meeting in the middle",
    ),
    "heart": (
        "a {c}shape with two rounded lobes on top and a point at the bottom",
        "a {c}love-heart symbol",
    ),
    "diamond": (
        "a {c}rhombus standing on one of its corners",
        "a {c}shape with corners pointing up, down, left and right",
        "a {c}four-sided shape that is taller than it is wide",
    ),
    "hexagon": (
        "a {c}shape with six equal sides and six corners",
        "a six-sided {c}shape like a honeycomb cell",
    ),
    "ring": (
        "a round {c}band with a hole in the middle",
        "a {c}donut shape",
        "a hollow round {c}band with an empty center",
    ),
    "arrow": (
        "a {c}shape with a straight shaft and a triangular head",
        "a {c}shape pointing to the right",
    ),
}

PATTERN_FACTS: dict[str, tuple[str, ...]] = {
    "plain": (
        "a background of one flat color",
        "an even background with no pattern at all",
        "a smooth, featureless backdrop",
    ),
    "horizontal stripes": (
        "light and dark bands running from left to right",
        "parallel stripes lying flat across the image",
        "a striped backdrop with level bands",
    ),
    "vertical stripes": (
        "light and dark bands running from top to bottom",
        "parallel stripes standing upright across the image",
        "a striped backdrop with upright bands",
    ),
    "diagonal stripes": (
        "light and dark bands running at a slant",
        "parallel stripes tilted at forty-five degrees",
        "a striped backdrop with slanted bands",
    ),
    "checkerboard": (
        "alternating light and dark tiles like a chessboard",
        "a checkered pattern of tiles",
        "tiles of two shades in alternating rows",
    ),
    "polka dots": (
        "round dots spaced evenly across the background",
        "a dotted pattern of round discs",
        "rows of dots on a flat backdrop",
    ),
    "grid": (
        "thin lines crossing at right angles",
        "a lattice of thin lines like graph paper",
        "a backdrop divided into cells by thin lines",
    ),
    "crosshatch": (
        "two sets of slanted lines crossing each other",
        "a crosshatched lattice of thin lines",
        "thin lines criss-crossing at an angle",
    ),
    "speckles": (
        "random light and dark specks like static",
        "a grainy, speckled texture",
        "tiny blotches scattered at random",
    ),
    "gradient": (
        "a smooth fade from one shade to another",
        "a background that changes slowly from light to dark",
        "a soft gradient with no sharp edges",
    ),
    "zigzag": (
        "stripes that bend back and forth in sharp zigzags",
        "a chevron pattern of zigzag bands",
        "jagged bands with pointed turns",
    ),
    "waves": (
        "stripes that curve up and down like waves",
        "gently wavy bands",
        "smooth rolling bands like ripples on water",
    ),
}

# Upper bound per class; the CuPL files the field uses hold 20.
MAX_DESCRIPTIONS = 20


def _fact(template: str, adjective: str = "") -> str:
    text = template.format(c=f"{adjective} " if adjective else "")
    return with_article(text[2:]) if text.startswith("a ") else text


def _unique(sentences: list[str]) -> list[str]:
    return list(dict.fromkeys(sentences))[:MAX_DESCRIPTIONS]


def describe_shape_color(color: str, shape: str) -> list[str]:
    """Descriptions of the class "``color`` ``shape``" (any count, size and background)."""
    name = f"{color} {shape}"
    sentences = [
        f"{with_article(name)}.",
        f"a photo of {with_article(name)}.",
        f"{with_article(shape)} drawn in {color}.",
        f"{with_article(shape)} whose color is {color}.",
        f"the {color} shape is {with_article(shape)}.",
        f"{with_article(name)}, small or large.",
        f"{with_article(name)} on a patterned or plain background.",
    ]
    for template in SHAPE_FACTS[shape]:
        sentences.append(f"{with_article(name)} is {_fact(template)}.")
        sentences.append(f"{_fact(template, color)}.")
    return _unique(sentences)


def describe_count(count: int, shape: str) -> list[str]:
    """Descriptions of the class "``count`` ``shape(s)``" (any colour, size and background)."""
    word = NUMBER_WORDS[count]
    noun = shape if count == 1 else PLURALS[shape]
    name = f"{word} {noun}"
    sentences = [
        f"{name}.",
        f"exactly {name}.",
        f"{count} {noun}.",
        f"the image contains {name}.",
        f"the number of {PLURALS[shape]} is {word}.",
        f"a picture with {name} in it.",
        f"{name}, no more and no fewer.",
    ]
    if count == 1:
        sentences += [
            f"a single {shape}.",
            f"one {shape} on its own.",
            f"a lone {shape} and no other shapes.",
        ]
    else:
        sentences += [
            f"a group of {name}.",
            f"{word} identical {noun}.",
            f"{name} of the same color and size.",
            f"{name} placed apart from each other.",
            f"a set of {name}.",
        ]
    # Facts that contain number words would read as competing counts.
    number_words = set(NUMBER_WORDS.values())
    numberless = [t for t in SHAPE_FACTS[shape] if not set(re.findall("[a-z]+", t)) & number_words]
    each = "" if count == 1 else "each "
    sentences += [f"{name}, {each}{_fact(t)}." for t in numberless]
    return _unique(sentences)


def describe_pattern(background: str) -> list[str]:
    """Descriptions of the background-pattern class ``background`` (any objects on top)."""
    sentences = []
    for phrase in BACKGROUND_PHRASES[background]:
        sentences.append(f"a picture of {phrase}.")
        sentences.append(f"one or more shapes in front of {phrase}.")
    for fact in PATTERN_FACTS[background]:
        sentences.append(f"{fact}.")
        sentences.append(f"an image of {fact} behind one or more shapes.")
    return _unique(sentences)
