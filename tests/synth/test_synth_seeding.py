"""Seeding of the synthetic data: streams of neighbouring seeds do not overlap, and dataset splits
never share an image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vladapt.backbones.loader import Tokenizer
from vladapt.synth.datasets import DATASETS, write_dataset
from vladapt.synth.pretrain import images_to_tensor, stream_batch
from vladapt.synth.render import CLEAN
from vladapt.synth.world import sample, sample_batch

CLEAN_MIX = ((CLEAN, 1.0),)


def test_streams_of_neighbouring_seeds_do_not_overlap() -> None:
    # Every (seed, index) of a small grid gives its own image: a seed derived as seed + index (or
    # any other mix where a shift of one is undone by a shift of the other) repeats images here.
    seen: dict[bytes, tuple[int, int]] = {}
    for seed in range(4):
        images, _, _ = sample_batch(seed, 6, CLEAN_MIX, size=32)
        for index, image in enumerate(images):
            key = image.tobytes()
            assert key not in seen, f"stream {seed} item {index} repeats stream {seen[key][0]} item {seen[key][1]}"
            seen[key] = (seed, index)
    for seed, index in [(0, 1), (5, 9), (100, 3)]:
        shifted, _, _ = sample(seed, index, CLEAN_MIX, size=32)
        neighbour, _, _ = sample(seed + 1, index - 1, CLEAN_MIX, size=32)
        assert not np.array_equal(shifted, neighbour)


def test_pretraining_batches_of_neighbouring_seeds_and_steps_differ() -> None:
    tokenizer = Tokenizer(32)
    b = 4
    x01, t01 = stream_batch(0, 1, b, CLEAN_MIX, tokenizer)
    x10, _ = stream_batch(1, 0, b, CLEAN_MIX, tokenizer)
    x00, _ = stream_batch(0, 0, b, CLEAN_MIX, tokenizer)
    assert not any(np.array_equal(p, q) for p in x01.numpy() for q in x10.numpy())
    assert not any(np.array_equal(p, q) for p in x01.numpy() for q in x00.numpy())
    # step k of stream s is items [k * b, (k + 1) * b) of that stream
    images, captions, _ = sample_batch(0, b, CLEAN_MIX, start=b)
    again, tokens = stream_batch(0, 1, b, CLEAN_MIX, tokenizer)
    assert np.array_equal(again.numpy(), x01.numpy()) and np.array_equal(tokens.numpy(), t01.numpy())
    assert np.array_equal(x01.numpy(), images_to_tensor(images).numpy())
    assert np.array_equal(t01.numpy(), tokenizer(captions).numpy())


def _pixels(folder: Path, split: dict) -> dict[str, list[bytes]]:
    out = {}
    for name, items in split.items():
        out[name] = [np.asarray(Image.open(folder / "images" / path).convert("RGB")).tobytes()
                     for path, _, _ in items]
    return out


@pytest.mark.parametrize("name", ["synth_shapes", "synth_textures"])
def test_dataset_splits_are_disjoint_and_never_share_an_image(tmp_path: Path, name: str) -> None:
    spec = DATASETS[name]
    folder = write_dataset(name, tmp_path, seed=0, per_class=(2, 1, 2))
    split = json.loads((folder / spec.split_file).read_text())
    paths = {s: {p for p, _, _ in items} for s, items in split.items()}
    assert not paths["train"] & paths["val"] and not paths["train"] & paths["test"]
    assert not paths["val"] & paths["test"]
    pixels = _pixels(folder, split)
    train, val, test = set(pixels["train"]), set(pixels["val"]), set(pixels["test"])
    assert len(train) == len(pixels["train"]) and len(test) == len(pixels["test"])  # no repeats within a split
    assert not test & train, "a test image equals a train image"
    assert not test & val, "a test image equals a val image"
    assert not train & val, "a val image equals a train image"
