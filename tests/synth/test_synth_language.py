"""Captions and description banks never state something false about the image or class.

The checks parse text with keyword tables written here, independently of the generator's own phrase
tables, so a wrong phrase in the generator cannot pass by construction.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from vladapt.synth.captions import caption
from vladapt.synth.datasets import DATASETS
from vladapt.synth.scene import BACKGROUNDS, COLORS, SHAPES, Scene, sample_scene

SINGULAR = {shape: shape for shape in SHAPES} | {"five-pointed": "star", "six-sided": "hexagon"}
PLURAL = {"crosses": "cross"} | {shape + "s": shape for shape in SHAPES if shape != "cross"}
GENERIC = {"shape": 1, "object": 1, "shapes": 2, "objects": 2}
COUNT_WORDS = {"one": 1, "single": 1, "lone": 1, "two": 2, "pair": 2, "three": 3, "four": 4}
COUNT_WORDS |= {str(n): n for n in (1, 2, 3, 4)}
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
DIRECTIONS = {"left", "right", "top", "bottom", "center", "middle"}
STRIPED = {"horizontal stripes", "vertical stripes", "diagonal stripes", "zigzag", "waves"}
PATTERN_WORDS: dict[str, set[str]] = {
    "plain": {"plain"},
    "uniform": {"plain"},
    "solid": {"plain"},
    "striped": STRIPED,
    "stripes": STRIPED,
    "horizontal": {"horizontal stripes"},
    "horizontally": {"horizontal stripes"},
    "vertical": {"vertical stripes"},
    "vertically": {"vertical stripes"},
    "diagonal": {"diagonal stripes", "crosshatch"},
    "diagonally": {"diagonal stripes"},
    "checkerboard": {"checkerboard"},
    "checkered": {"checkerboard"},
    "dots": {"polka dots"},
    "dotted": {"polka dots"},
    "polka": {"polka dots"},
    "polka-dot": {"polka dots"},
    "grid": {"grid", "crosshatch"},
    "lines": {"grid", "crosshatch"},
    "crosshatch": {"crosshatch"},
    "crosshatched": {"crosshatch"},
    "crosshatching": {"crosshatch"},
    "speckled": {"speckles"},
    "speckles": {"speckles"},
    "noisy": {"speckles"},
    "gradient": {"gradient"},
    "shaded": {"gradient"},
    "zigzag": {"zigzag"},
    "wavy": {"waves"},
    "wave": {"waves"},
    "waves": {"waves"},
}


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[a-z]+)*", text.lower())


def check_objects(words: list[str], scene: Scene) -> None:
    """Colour, shape, count, size and grammatical number all match the scene."""
    for word in words:
        if word in COLORS:
            assert word == scene.color
        if word in SINGULAR:
            assert SINGULAR[word] == scene.shape
        if word in PLURAL:
            assert PLURAL[word] == scene.shape and scene.count > 1
        if word in SHAPES:
            assert scene.count == 1
        if word in GENERIC:
            assert (GENERIC[word] > 1) == (scene.count > 1)
        if word in COUNT_WORDS:
            assert COUNT_WORDS[word] == scene.count
        if word in SIZE_WORDS:
            assert SIZE_WORDS[word] == scene.size
        if word in ("is", "are"):
            assert (word == "are") == (scene.count > 1)


def check_background(words: list[str], background: str) -> None:
    for word in words:
        if word in PATTERN_WORDS:
            assert background in PATTERN_WORDS[word], (word, background)


def check_position(words: list[str], scene: Scene) -> None:
    said = {("center" if w == "middle" else w) for w in words if w in DIRECTIONS}
    if said:
        assert scene.position is not None and said == set(scene.position.split())


def _captions(n: int, seed: int = 0) -> list[tuple[Scene, str]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        scene = sample_scene(rng)
        pairs.append((scene, caption(scene, rng)))
    return pairs


def test_captions_never_contradict_their_scene() -> None:
    for scene, text in _captions(3000):
        words = tokens(text)
        try:
            check_objects(words, scene)
            check_background(words, scene.background)
            check_position(words, scene)
        except AssertionError as error:
            raise AssertionError(f"{text!r} is false for {scene}") from error


def test_captions_are_grammatical() -> None:
    for scene, text in _captions(1000, seed=1):
        lower = text.lower()
        assert text == text.strip() and "  " not in text
        assert not re.search(r"\ba (?!uni)[aeiou]", lower), text  # "a uniform" is right
        assert not re.search(r"\ban [^aeiou]", lower), text
        assert not re.search(r"\b(\w+) \1\b", lower), text


def test_captions_are_varied_and_cover_every_attribute() -> None:
    pairs = _captions(2000, seed=2)
    texts = [t for _, t in pairs]
    assert len(set(texts)) > 0.8 * len(texts)
    mentions = dict.fromkeys(("color", "shape", "count", "size", "background", "position", "all", "one",
                              "background only"), 0)
    for scene, text in pairs:
        words = set(tokens(text))
        said = {
            "color": scene.color in words,
            "shape": bool(words & (set(SINGULAR) | set(PLURAL))),
            "count": bool(words & set(COUNT_WORDS)),
            "size": bool(words & set(SIZE_WORDS)),
            "background": bool(words & set(PATTERN_WORDS)),
            "position": bool(words & DIRECTIONS),
        }
        for key, value in said.items():
            mentions[key] += value
        mentions["all"] += all(v for k, v in said.items() if k != "position")
        mentions["one"] += sum(said.values()) == 1
        mentions["background only"] += said["background"] and sum(said.values()) == 1
    for key in ("color", "shape", "count", "size", "background"):
        assert mentions[key] > 0.25 * len(pairs), key
    assert mentions["position"] > 0.05 * len(pairs)
    # Backgrounds are low-contrast and easy to ignore: most captions name them, some name nothing else.
    assert mentions["background"] > 0.75 * len(pairs)  # named in 80%
    assert mentions["background only"] > 0.07 * len(pairs)  # 80% x 12% alone, plus chance
    assert mentions["all"] > 0.02 * len(pairs) and mentions["one"] > 0.02 * len(pairs)


def test_caption_is_a_function_of_the_generator_state() -> None:
    scene = Scene("star", "red", "small", 2, "grid")
    assert caption(scene, np.random.default_rng(4)) == caption(scene, np.random.default_rng(4))
    assert len({caption(scene, np.random.default_rng(s)) for s in range(40)}) > 20


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_description_banks_are_true_and_varied(name: str) -> None:
    spec = DATASETS[name]
    bank = spec.descriptions()
    assert list(bank) == spec.classnames
    for classname, sentences in bank.items():
        assert 8 <= len(sentences) <= 20 and len(set(sentences)) == len(sentences), classname
        attributes = spec.classes[classname]
        own_words = set(tokens(classname))
        mentions_class = 0
        for sentence in sentences:
            words = tokens(sentence)
            assert "filled" not in words  # outline styles draw hollow shapes
            mentions_class += own_words <= set(words)
            if "background" in attributes:
                check_background(words, attributes["background"])
                continue
            for word in words:
                if word in COLORS:
                    assert word == attributes.get("color"), (classname, sentence)
                if word in SINGULAR or word in PLURAL:
                    assert {**SINGULAR, **PLURAL}[word] == attributes["shape"], (classname, sentence)
                if word in SIZE_WORDS:
                    assert sentence.count(" or ") and {"small", "large"} <= set(words), (classname, sentence)
                if "count" in attributes and word in COUNT_WORDS:
                    assert COUNT_WORDS[word] == attributes["count"], (classname, sentence)
        assert mentions_class >= 2, classname


def test_description_banks_cover_every_background_and_shape() -> None:
    assert set(DATASETS["synth_textures"].classnames) == set(BACKGROUNDS)
    named = {a["shape"] for spec in DATASETS.values() for a in spec.classes.values() if "shape" in a}
    assert named == set(SHAPES)


def test_every_downstream_class_name_occurs_in_pretraining_captions() -> None:
    # Zero-shot transfer needs the class names' words to have been seen together in captions.
    seen = [set(tokens(text)) for _, text in _captions(4000, seed=3)]
    for spec in DATASETS.values():
        for classname in spec.classnames:
            assert any(set(tokens(classname)) <= words for words in seen), (spec.name, classname)
