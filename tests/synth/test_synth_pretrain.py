"""Pretraining the tiny CLIP on the synthetic world, and the bundled ``vladapt-tiny`` weights it produced."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vladapt.backbones import load_clip, weights_fingerprint
from vladapt.backbones.loader import TINY_CONFIGS, Tokenizer, bundled_weights_path
from vladapt.backbones.model import CLIPModel
from vladapt.errors import ConfigError
from vladapt.synth.pretrain import (
    CLEAN_PROBE_CLASSES,
    PretrainConfig,
    build_probes,
    clip_loss,
    images_to_tensor,
    lr_at,
    pretrain,
    reproduce_command,
    stream_batch,
)
from vladapt.synth.render import CLEAN, render
from vladapt.synth.scene import sample_scene
from vladapt.synth.world import pretrain_style_mix, sample_batch

WEIGHTS = bundled_weights_path("vladapt-tiny")
SIDECAR = WEIGHTS.with_suffix(".json")

# Colour-shape classes, none of them in the pretraining probe, drawn clean with seeds of this test only.
FRESH_CLASSES = ("red star", "blue circle", "green square", "yellow heart", "purple cross", "orange triangle",
                 "pink hexagon", "black triangle", "white arrow", "brown ring", "red ring", "blue triangle")
ZERO_SHOT_FLOOR = 50.0  # % on 12 classes (chance 8.3%)


@pytest.fixture(scope="module")
def bundled():
    return load_clip("vladapt-tiny")


@pytest.fixture(scope="module")
def sidecar():
    return json.loads(SIDECAR.read_text())


def test_bundled_weights_load_and_match_their_fingerprint(bundled, sidecar) -> None:
    assert WEIGHTS.stat().st_size <= 20 * 2**20
    assert sidecar["name"] == "vladapt-tiny"
    assert sidecar["architecture"] == TINY_CONFIGS["vladapt-tiny"].to_dict()
    assert bundled.fingerprint == sidecar["fingerprint"] == weights_fingerprint(bundled.model.state_dict())
    assert bundled.pretrained == "bundled" and bundled.image_size == 64
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in bundled.model.parameters())
    # Not the random initialisation the training started from.
    start = CLIPModel(TINY_CONFIGS["vladapt-tiny"]).init_random(sidecar["pretrain_config"]["seed"])
    assert weights_fingerprint(start.state_dict()) != sidecar["fingerprint"]


def test_sidecar_records_how_the_weights_were_made(sidecar) -> None:
    cfg = PretrainConfig(**sidecar["pretrain_config"])
    assert sidecar["steps"] == cfg.steps > 0
    assert sidecar["command"] == reproduce_command(cfg, WEIGHTS.name)
    assert sidecar["command"].startswith(f"vladapt synth pretrain --steps {cfg.steps} --batch-size {cfg.batch_size} ")
    assert f"--seed {cfg.seed}" in sidecar["command"]
    final = sidecar["final_eval"]
    datasets = ["synth_shapes", "synth_textures", "synth_counts"]
    assert set(final) == {"clean", *datasets, *(f"{d}@clean" for d in datasets)}
    assert all(set(v) == {"all", "base", "new"} for v in final.values())


def test_bundled_model_classifies_fresh_clean_images_zero_shot(bundled) -> None:
    """Through the user's path: PIL images -> backbone.test_transform -> zero-shot with one template."""
    images, labels = [], []
    for label, cname in enumerate(FRESH_CLASSES):
        color, shape = cname.split()
        for i in range(6):
            rng = np.random.default_rng([20240611, label, i])
            pixels = render(sample_scene(rng, color=color, shape=shape), CLEAN, rng)
            images.append(bundled.test_transform(Image.fromarray(pixels)))
            labels.append(label)
    model = bundled.model
    with torch.no_grad():
        tokens = bundled.tokenizer([f"a photo of a {c}." for c in FRESH_CLASSES])
        text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        feats = torch.nn.functional.normalize(model.encode_image(torch.stack(images)), dim=-1)
    accuracy = 100.0 * (feats @ text.t()).argmax(1).eq(torch.tensor(labels)).float().mean().item()
    assert accuracy >= ZERO_SHOT_FLOOR, f"zero-shot accuracy {accuracy:.1f}% on fresh clean images"


def test_images_to_tensor_equals_the_test_transform(bundled) -> None:
    images, _, _ = sample_batch(3, 4)
    expected = torch.stack([bundled.test_transform(Image.fromarray(im)) for im in images])
    assert torch.allclose(images_to_tensor(images), expected, atol=1e-6)


def test_probes_are_fixed_and_balanced() -> None:
    probes = build_probes(per_class=2)
    assert list(probes) == ["clean", "synth_shapes", "synth_shapes@clean", "synth_textures",
                            "synth_textures@clean", "synth_counts", "synth_counts@clean"]
    # The clean variants draw the same scenes without the dataset's shift.
    assert (probes["synth_shapes"].images != probes["synth_shapes@clean"].images).any()
    assert probes["clean"].classnames == list(CLEAN_PROBE_CLASSES) == sorted(CLEAN_PROBE_CLASSES)
    assert len(CLEAN_PROBE_CLASSES) == 20
    assert not set(FRESH_CLASSES) & set(CLEAN_PROBE_CLASSES)
    again = build_probes(per_class=2)
    for name, probe in probes.items():
        assert len(probe.images) == 2 * len(probe.classnames)
        assert np.bincount(probe.labels).tolist() == [2] * len(probe.classnames)
        assert (again[name].images == probe.images).all()
        assert probe.num_base == math.ceil(len(probe.classnames) / 2)


def test_learning_rate_schedule() -> None:
    cfg = PretrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 55) == pytest.approx(0.55e-3)
    assert lr_at(cfg, 100) == pytest.approx(1e-4)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 100))


@pytest.mark.parametrize("bad", [{"precision": "fp16"}, {"batch_size": 1}, {"shifted_fraction": 1.5},
                                 {"steps": -1}, {"threads": 0}])
def test_invalid_configs_are_rejected(bad, tmp_path) -> None:
    with pytest.raises(ConfigError):
        pretrain(PretrainConfig(**bad), tmp_path / "w.safetensors", progress=False)
    with pytest.raises(ConfigError, match="safetensors"):
        pretrain(PretrainConfig(steps=0), tmp_path / "w.pt", progress=False)


def _mean_loss(model: CLIPModel, batches) -> float:
    with torch.no_grad():
        return float(np.mean([clip_loss(model, x, t).item() for x, t in batches]))


def test_a_few_steps_are_deterministic_and_lower_the_loss(tmp_path) -> None:
    cfg = PretrainConfig(steps=6, batch_size=24, lr=2e-3, warmup_steps=0, eval_every=0, probe_per_class=0, seed=3)
    runs = [pretrain(cfg, tmp_path / name / "w.safetensors", tmp_path / name / "log.jsonl", progress=False)
            for name in ("a", "b")]
    a, b = runs
    assert len(a["losses"]) == 6 and a["losses"] == b["losses"]
    assert a["fingerprint"] == b["fingerprint"]
    assert a["out_path"].read_bytes() == b["out_path"].read_bytes()
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == 3  # start, end, final

    side = json.loads(a["sidecar_path"].read_text())
    assert side["command"] == a["command"] == (
        "vladapt synth pretrain --steps 6 --batch-size 24 --seed 3 --lr 0.002 --warmup-steps 0 --out w.safetensors")
    assert side["fingerprint"] == a["fingerprint"]

    # The saved file loads like any checkpoint and has the recorded fingerprint.
    loaded = load_clip("vladapt-tiny", pretrained=str(a["out_path"]))
    assert loaded.fingerprint == a["fingerprint"]

    # Training lowered the contrastive loss on the batches it saw.
    tokenizer = Tokenizer(32)
    mix = pretrain_style_mix(cfg.shifted_fraction, cfg.shift_strength)
    batches = [stream_batch(cfg.seed, k, cfg.batch_size, mix, tokenizer) for k in range(cfg.steps)]
    start = CLIPModel(TINY_CONFIGS["vladapt-tiny"]).init_random(cfg.seed)
    assert _mean_loss(loaded.model, batches) < _mean_loss(start, batches) - 0.05


def test_pretraining_leaves_global_state_alone(tmp_path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    pretrain(PretrainConfig(steps=1, batch_size=4, eval_every=0, probe_per_class=0, threads=1),
             tmp_path / "w.safetensors", progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
