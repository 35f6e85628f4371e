"""The pretraining stream: determinism per (seed, index), batch independence, style mixing."""

from __future__ import annotations

import numpy as np
import pytest

from vladapt.errors import ConfigError
from vladapt.synth.render import CLEAN, MILD, SHIFTS, Style, shifted
from vladapt.synth.scene import BACKGROUNDS, COLORS, COUNTS, SHAPES, sample_scene
from vladapt.synth.world import DEFAULT_STYLE_MIX, benchmark, pretrain_style_mix, sample, sample_batch


def test_batch_shapes_and_types() -> None:
    images, captions, scenes = sample_batch(0, 6)
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    assert len(captions) == len(scenes) == 6
    assert all(isinstance(c, str) and c for c in captions)
    assert sample_batch(0, 2, size=32)[0].shape == (2, 32, 32, 3)
    assert sample_batch(0, 0)[0].shape == (0, 64, 64, 3)


def test_same_seed_and_index_give_the_same_sample_regardless_of_batching() -> None:
    images, captions, scenes = sample_batch(11, 10)
    head = sample_batch(11, 4)
    tail = sample_batch(11, 6, start=4)
    assert (np.concatenate([head[0], tail[0]]) == images).all()
    assert head[1] + tail[1] == captions and head[2] + tail[2] == scenes
    image, text, scene = sample(11, 7)
    assert (image == images[7]).all() and text == captions[7] and scene == scenes[7]


def test_different_seeds_and_indices_differ() -> None:
    a, captions_a, _ = sample_batch(1, 8)
    b, captions_b, _ = sample_batch(2, 8)
    assert all((x != y).any() for x, y in zip(a, b))
    assert captions_a != captions_b
    assert len({img.tobytes() for img in a}) == 8


def test_a_generator_seed_is_reproducible_from_its_state() -> None:
    first = sample_batch(np.random.default_rng(5), 3)
    second = sample_batch(np.random.default_rng(5), 3)
    assert (first[0] == second[0]).all() and first[1] == second[1]


def test_scene_sampling_covers_the_attribute_space_and_respects_constraints() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(600)]
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.color for s in scenes} == set(COLORS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.count for s in scenes} == set(COUNTS)
    assert all((s.position is None) == (s.count > 1) for s in scenes)
    pinned = [sample_scene(rng, shape="star", count=(2, 3)) for _ in range(50)]
    assert {s.shape for s in pinned} == {"star"} and {s.count for s in pinned} == {2, 3}
    with pytest.raises(ConfigError, match="count"):
        sample_scene(rng, count=(2, 9))


def test_style_mix_controls_the_share_of_shifted_images() -> None:
    mix = pretrain_style_mix(0.2, MILD)
    assert mix[0] == (CLEAN, pytest.approx(0.8))
    assert sum(w for _, w in mix) == pytest.approx(1.0)
    assert {s for s, _ in mix[1:]} == {shifted(k, MILD) for k in SHIFTS}
    assert DEFAULT_STYLE_MIX == mix

    # Pixel noise is easy to detect (clean images are mostly flat between neighbours), so count
    # how much of a 50/50 stream received it.
    def roughness(images: np.ndarray) -> np.ndarray:
        return np.median(np.abs(np.diff(images.astype(float), axis=2)), axis=(1, 2, 3))

    assert roughness(sample_batch(3, 40, style_mix=[(CLEAN, 1.0)])[0]).max() < 5
    assert roughness(sample_batch(3, 40, style_mix=[(Style(noise=1.0), 1.0)])[0]).min() > 10
    mixed, _, _ = sample_batch(3, 200, style_mix=[(CLEAN, 1.0), (Style(noise=1.0), 1.0)])
    assert 70 < (roughness(mixed) > 7.5).sum() < 130
    with pytest.raises(ConfigError):
        sample_batch(0, 1, style_mix=[])
    with pytest.raises(ConfigError):
        pretrain_style_mix(1.5)


def test_benchmark_reports_a_plausible_rate() -> None:
    # Loose floor (measured ~3,000/s on one core); catches an accidental per-pixel loop.
    assert benchmark(200) > 200
