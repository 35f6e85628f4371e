"""The frozen-feature cache: hits, misses, invalidation, torn files; feature-level methods trained and
evaluated on cached features give the numbers of the image path."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from test_heba_engine import color_folder, quick_cfg
from vladapt.backbones import train_transform
from vladapt.data import load_custom
from vladapt.engine.feature_cache import ENV_VAR, FeatureCache, default_cache_dir
from vladapt.engine.features import FrozenFeatures
from vladapt.engine.train import fit
from vladapt.methods import create_method
from vladapt.protocols.runner import RunSettings, evaluate_items, run_protocol


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("colors") / "data", per_class=6)


def counting(tiny):
    """The tiny backbone's image encoder wrapped to count how many images it encodes."""
    calls = {"images": 0}
    original = tiny.model.encode_image

    def encode_image(images, *args, **kwargs):
        calls["images"] += len(images)
        return original(images, *args, **kwargs)

    return calls, original, encode_image


def test_hit_miss_and_a_second_process_reads_the_disk(colors, tiny, tmp_path, monkeypatch):
    splits = load_custom(colors, save_split=False)
    calls, _, wrapped = counting(tiny)
    monkeypatch.setattr(tiny.model, "encode_image", wrapped)
    cache = FeatureCache(tmp_path / "cache")
    first = FrozenFeatures(tiny, splits, cache=cache).image_features("val")[0]
    assert (cache.misses, cache.hits) == (1, 0) and calls["images"] == len(splits.val)
    again = FrozenFeatures(tiny, splits, cache=FeatureCache(tmp_path / "cache")).image_features("val")[0]
    assert calls["images"] == len(splits.val)  # read back from disk: no image was encoded
    assert torch.equal(first, again)
    passes = FrozenFeatures(tiny, splits, seed=2, cache=cache).image_features("val", augment_passes=2)[0]
    assert calls["images"] == 3 * len(splits.val) and cache.misses == 3
    FrozenFeatures(tiny, splits, seed=2, cache=cache).image_features("val", augment_passes=3)
    assert calls["images"] == 4 * len(splits.val)  # passes 1 and 2 are reused, only pass 3 is new
    assert not torch.allclose(passes, first)
    # another crop range (Tip-Adapter's cache keys: 50-100% of the area) is another entry ...
    half = FrozenFeatures(tiny, splits, seed=2, cache=cache).image_features("val", augment_passes=1,
                                                                            crop_scale=(0.5, 1.0))[0]
    assert calls["images"] == 5 * len(splits.val)
    # ... the pass of that transform, seeded as the engine seeds epoch 0 (read back: no new encoding)
    transform = train_transform(tiny.image_size, tiny.mean, tiny.std, scale=(0.5, 1.0))
    assert "scale=(0.5, 1.0)" in repr(transform)
    expected = FrozenFeatures(tiny, splits, cache=cache).encode(splits.val, splits.image_root, transform, "val", (2, 0))
    assert calls["images"] == 5 * len(splits.val)
    assert torch.equal(half, torch.nn.functional.normalize(expected, dim=-1))


def test_changed_backbone_transform_seed_or_file_is_a_miss(colors, tiny, tmp_path, monkeypatch):
    splits = load_custom(colors, save_split=False)
    cache = FeatureCache(tmp_path / "cache")
    f = FrozenFeatures(tiny, splits, cache=cache)
    base = f.encode(splits.val, splits.image_root, tiny.test_transform, "val")
    f.encode(splits.val, splits.image_root, tiny.train_transform, "val", (1, 0))
    f.encode(splits.val, splits.image_root, tiny.train_transform, "val", (2, 0))
    f.encode(splits.val, splits.image_root, tiny.train_transform, "val", (1, 1))
    assert cache.misses == 4
    monkeypatch.setattr(tiny, "_fingerprint", "another-weights")
    f.encode(splits.val, splits.image_root, tiny.test_transform, "val")
    assert cache.misses == 5
    monkeypatch.undo()
    import vladapt.engine.features as features

    monkeypatch.setattr(features, "ENCODER_VERSION", features.ENCODER_VERSION + 1)  # the encoder's arithmetic changed
    f.encode(splits.val, splits.image_root, tiny.test_transform, "val")
    assert cache.misses == 6
    monkeypatch.undo()
    image = splits.image_root / splits.val[0].path
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed
    try:
        fresh = FeatureCache(tmp_path / "cache")
        FrozenFeatures(tiny, splits, cache=fresh).encode(splits.val, splits.image_root, tiny.test_transform, "val")
        assert fresh.misses == 1
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh = FeatureCache(tmp_path / "cache")
    again = FrozenFeatures(tiny, splits, cache=fresh).encode(splits.val, splits.image_root, tiny.test_transform, "val")
    assert fresh.hits == 1 and torch.equal(again, base)


def test_a_torn_entry_is_detected_and_rebuilt(colors, tiny, tmp_path):
    splits = load_custom(colors, save_split=False)
    cache = FeatureCache(tmp_path / "cache")
    good = FrozenFeatures(tiny, splits, cache=cache).image_features("val")[0]
    (entry,) = (tmp_path / "cache").rglob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a write cut off halfway
    fresh = FeatureCache(tmp_path / "cache")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = FrozenFeatures(tiny, splits, cache=fresh).image_features("val")[0]
    assert fresh.misses == 1 and torch.equal(rebuilt, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry is whole again
        assert torch.equal(FrozenFeatures(tiny, splits, cache=FeatureCache(tmp_path / "cache")).image_features("val")[0], good)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no temporary file left behind


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.setenv(ENV_VAR, "none")
    assert default_cache_dir() is None
    assert FeatureCache(None).get({"a": 1}, lambda: torch.ones(2)).tolist() == [1.0, 1.0]


def test_feature_level_training_and_evaluation_on_cached_features_equal_the_image_path(colors, tiny, tmp_path):
    """LatHAdapter trained through the engine's feature path (epoch passes from the cache) ends with the
    weights of the image path (the frozen encoder run inside each step), and evaluates the same."""
    splits = load_custom(colors, save_split=False)
    cfg = quick_cfg(epochs=2, batch_size=4, optimizer="adamw", lr=0.01, crop_scale=[0.5, 1.0])

    def trained(source):
        torch.manual_seed(0)
        m = create_method("lathadapter", tiny, splits.classnames, {"num_attributes": 2})
        m.feature_source = source
        logs = fit(m, splits, cfg, seed=5, progress=False)
        return m, logs

    cache = FeatureCache(tmp_path / "cache")
    online, logs_online = trained(None)
    cached, logs_cached = trained(FrozenFeatures(tiny, splits, cache=cache))
    assert cache.misses == 2  # one augmentation pass per epoch
    for a, b in zip(logs_online, logs_cached):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["accuracy"] == b["accuracy"]
    for (name, p), q in zip(online.checkpoint_state().items(), cached.checkpoint_state().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    settings = RunSettings(backbone=tiny, root=colors, method="lathadapter", progress=False)
    res_images = evaluate_items(settings, online, splits, "folder", "eval")  # no feature source: images
    online.feature_source = FrozenFeatures(tiny, splits, cache=cache)
    res_features = evaluate_items(settings, online, splits, "folder", "eval")
    assert res_images["correct"] == res_features["correct"] and res_images["total"] == len(splits.test)


def test_protocol_runs_reuse_the_cache_across_seeds(colors, tiny, tmp_path, monkeypatch):
    calls, _, wrapped = counting(tiny)
    monkeypatch.setattr(tiny.model, "encode_image", wrapped)
    cache = FeatureCache(tmp_path / "cache")
    settings = RunSettings(backbone=tiny, root=colors, method="lathadapter", progress=False, feature_cache=cache,
                           method_config={"num_attributes": 2},
                           train_fn=lambda m, s, seed, run_dir: fit(m, s, quick_cfg(epochs=1, batch_size=4), seed,
                                                                   progress=False))
    run_protocol("base2new", settings, "folder", shots=2, seed=1)
    first = calls["images"]
    run_protocol("base2new", settings, "folder", shots=2, seed=1)
    assert calls["images"] == first  # the same run again: no image encoded at all
    run_protocol("base2new", settings, "folder", shots=2, seed=2)
    n_train = 2 * 3  # 2 shots x 3 base classes: the new seed's training pass; the test sets are reused
    assert calls["images"] == first + n_train


def test_feature_passes_cycle_a_fixed_number_of_augmentations(colors, tiny, tmp_path):
    splits = load_custom(colors, save_split=False)
    cache = FeatureCache(tmp_path / "cache")
    m = create_method("clip_adapter", tiny, splits.classnames)
    m.feature_source = FrozenFeatures(tiny, splits, cache=cache)
    fit(m, splits, quick_cfg(epochs=5, batch_size=4, warmup_epochs=0, feature_passes=2), seed=1, progress=False)
    assert cache.misses == 2 and cache.hits == 3  # epochs 1..5 use passes 0, 1, 0, 1, 0
