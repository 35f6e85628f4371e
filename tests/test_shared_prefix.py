"""Shared frozen prefix: several methods on one backbone evaluated with the frozen image-tower blocks
in front of each method's first adapted block computed once (engine.evaluate.evaluate_many)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vladapt.backbones import Backbone, CLIPConfig, CLIPModel, TextConfig, Tokenizer, VisionConfig
from vladapt.backbones import transforms
from vladapt.engine.evaluate import evaluate, evaluate_many, predict_many, prefix_plan
from vladapt.errors import BackboneError
from vladapt.methods import create_method
from test_heba_engine import color_folder

NAMES = ["cat", "dog", "red star", "blue ring", "green cross"]
VISUAL_LAYERS = 8


@pytest.fixture(scope="module")
def deep_tiny() -> Backbone:
    """A tiny random-weight CLIP deep enough for MMA's and RMAdapter's default blocks 5..L."""
    cfg = CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=VISUAL_LAYERS, head_width=32),
        text=TextConfig(context_length=77, width=64, heads=2, layers=5),
        quick_gelu=True,
    )
    model = CLIPModel(cfg).init_random(0).freeze().eval()
    return Backbone(model=model, tokenizer=Tokenizer(77), train_transform=transforms.train_transform(32),
                    test_transform=transforms.test_transform(32), name="deep-tiny", pretrained=None)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def randomized(method, seed: int):
    """``method`` with every trainable weight redrawn (zero-initialized up projections included), so
    that its adapters change the logits visibly and every method of a test differs from the others."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return method.eval()


def build(backbone: Backbone, name: str, config: dict, seed: int):
    return randomized(create_method(name, backbone, NAMES, config), seed)


@pytest.fixture(scope="module")
def methods(deep_tiny):
    """Methods of every kind of start block, all on the same backbone; 0-based start block -> method."""
    return {
        "mma": (4, build(deep_tiny, "mma", {"scale": 0.5}, 1)),                   # blocks 5..8: start 4
        "rmadapter": (4, build(deep_tiny, "rmadapter", {"scale": 0.5}, 2)),       # blocks 5..8: start 4
        "mma_from_7": (6, build(deep_tiny, "mma", {"scale": 0.5, "adapter_start": 7, "towers": ["visual"]}, 3)),
        "heba_from_3": (2, build(deep_tiny, "heba", {"adapter_start": 3, "scale": 0.5}, 4)),
        "heba": (0, build(deep_tiny, "heba", {"scale": 0.5}, 5)),                 # block 1: no prefix
        "clip_lora": (0, build(deep_tiny, "clip_lora", {}, 6)),                   # block 1: no prefix
        "zeroshot": (VISUAL_LAYERS - 1, create_method("zeroshot", deep_tiny, NAMES).eval()),  # nothing adapted: all but the last block (its CLS-only tail)
    }


class Ensemble(nn.Module):
    """Two methods' logits summed: two image-tower forwards per call, adapted from different blocks."""

    def __init__(self, *members) -> None:
        super().__init__()
        self.members = list(members)
        self.clip = members[0].clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return sum(m(images) for m in self.members)


def test_the_detected_start_block_is_each_methods_first_adapted_block(methods, images):
    callables = {name: m for name, (_, m) in methods.items()}
    assert prefix_plan(callables, images) == {name: block for name, (block, _) in methods.items()}
    # over several forwards of one call: the lowest first adapted block of all of them
    ensemble = Ensemble(methods["zeroshot"][1], methods["mma_from_7"][1], methods["mma"][1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the plain path
        assert prefix_plan({"ensemble": ensemble}, images) == {"ensemble": 4}
    shared = predict_many({"ensemble": ensemble}, images, {"ensemble": 4})["ensemble"]
    with torch.no_grad():
        assert torch.allclose(shared, ensemble(images), rtol=1e-5, atol=1e-5)


def test_shared_prefix_logits_equal_the_plain_path_for_every_method_in_one_call(methods, images, deep_tiny):
    callables = {name: m for name, (_, m) in methods.items()}
    with torch.no_grad():
        plain = {name: m(images) for name, m in callables.items()}
    shared = predict_many(callables, images, prefix_plan(callables, images))
    assert list(shared) == list(callables)
    for name in callables:
        assert torch.allclose(shared[name], plain[name], rtol=1e-5, atol=1e-5), name
        assert torch.equal(shared[name].argmax(-1), plain[name].argmax(-1)), name
    # the adapters matter: a shared prefix that skipped them could not pass the comparison above
    assert not torch.allclose(plain["mma"], plain["zeroshot"], atol=1e-2)
    assert not torch.allclose(plain["mma"], plain["rmadapter"], atol=1e-2)
    assert deep_tiny.model.attached_modules() == {}


def test_evaluate_many_equals_evaluate_per_method(methods, images):
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    callables = {name: m for name, (_, m) in methods.items()}
    many = evaluate_many(callables, loader, len(NAMES), progress=False)
    for name, m in callables.items():
        assert many[name] == evaluate(m, loader, len(NAMES), progress=False), name


def test_a_module_attached_below_the_start_block_is_an_error(deep_tiny, images):
    clip = deep_tiny.model
    visual = clip.visual
    states = visual.prefix_states(images, 3)
    point = clip.insertion_points("visual", "block_out", [1])[0]
    clip.attach(point, lambda y, ctx: y)
    try:
        with visual.start_at(3, states), pytest.raises(BackboneError, match="block 2 has modules attached"):
            clip.encode_image(states)
        # the frozen prefix refuses them too: it would not be the frozen CLIP's states
        with pytest.raises(BackboneError, match="block 2 has modules attached"):
            visual.prefix_states(images, 3)
    finally:
        clip.detach(point)
    assert clip.attached_modules() == {}


def test_the_suffix_from_prefix_states_is_the_tower_and_needs_those_very_states(deep_tiny, images):
    clip = deep_tiny.model
    visual = clip.visual
    with torch.no_grad():
        plain = clip.encode_image(images)
        for block in (0, 1, 5, VISUAL_LAYERS):
            states = visual.prefix_states(images, block)
            with visual.start_at(block, states):
                assert torch.allclose(clip.encode_image(states), plain, rtol=1e-5, atol=1e-6), block
        # in steps: states entering block 5 from those entering block 2
        staged = visual.prefix_states(images, 5, visual.prefix_states(images, 2), 2)
        assert torch.equal(staged, visual.prefix_states(images, 5))
        with visual.start_at(5, staged), pytest.raises(BackboneError, match="changes its input"):
            clip.encode_image(staged.clone())  # a copy may be a transformed input: refused


class Flipping(nn.Module):
    """A method that changes its input before the image tower (test-time flip)."""

    def __init__(self, method) -> None:
        super().__init__()
        self.inner = method
        self.clip = method.clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images.flip(-1))


def test_methods_without_a_prefix_use_the_plain_path(methods, images):
    """Start block 0 (HeBA's default blocks 1..L, CLIP-LoRA) and methods the shared prefix cannot
    reproduce (a flip before the tower) are evaluated on images, with the plain path's results."""
    flipping = Flipping(methods["mma"][1])
    callables = {"heba": methods["heba"][1], "clip_lora": methods["clip_lora"][1], "flip": flipping,
                 "mma": methods["mma"][1]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = prefix_plan(callables, images)
    assert plan == {"heba": 0, "clip_lora": 0, "flip": 0, "mma": 4}
    assert any("'flip' is evaluated without a shared prefix" in str(w.message) for w in caught)
    shared = predict_many(callables, images, plan)
    with torch.no_grad():
        for name, m in callables.items():
            assert torch.allclose(shared[name], m(images), rtol=1e-5, atol=1e-5), name


def test_eval_of_several_checkpoints_from_the_cli_gives_each_its_own_record(tmp_path, capsys, monkeypatch):
    """Three checkpoints (MMA and HeBA adapting the image tower from blocks 3 and 2, CoOp classifying
    frozen features) evaluated together: each record equals the training run's own evaluation."""
    import importlib

    from vladapt.cli import main

    engine_evaluate = importlib.import_module("vladapt.engine.evaluate")  # the module (the package exports the function)

    plans = []
    probe = engine_evaluate.prefix_plan
    monkeypatch.setattr(engine_evaluate, "prefix_plan", lambda methods, images: plans.append(probe(methods, images))
                        or plans[-1])

    colors = color_folder(tmp_path / "colors")
    out = tmp_path / "runs"
    common = ["--protocol", "base2new", "--dataset", "folder", "--root", str(colors), "--quiet", "--out", str(out),
              "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=4", "train.precision=fp32"]
    runs = []
    for method, config in (("mma", ["method.adapter_start=3", "method.scale=3"]),
                           ("heba", ["method.adapter_start=2"]), ("coop", [])):
        assert main(["train", "--method", method, "--shots", "2", *common, *config]) == 0
        runs.append(json.loads((out / f"base2new/{method}/folder/shots_2-seed_1.json").read_text()))
    again = tmp_path / "again"
    assert main(["eval", "--checkpoint", *(r["run_dir"] for r in runs), "--root", str(colors), "--out", str(again),
                 "--quiet"]) == 0
    # base and new: MMA and HeBA through the shared prefix (0-based start blocks), CoOp on its cached features
    assert plans == [{"0": 2, "1": 1}] * 2
    for trained in runs:
        rec = json.loads((again / f"base2new/{trained['method']}/folder/shots_2-seed_1.eval.json").read_text())
        assert rec["checkpoint"] == trained["run_dir"]
        for half in ("base", "new"):
            assert rec["results"][half] == trained["results"][half], (trained["method"], half)
    # checkpoints of different runs are not evaluated together
    assert main(["train", "--method", "mma", "--shots", "3", *common, "method.adapter_start=3"]) == 0
    other = json.loads((out / "base2new/mma/folder/shots_3-seed_1.json").read_text())["run_dir"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", runs[0]["run_dir"], other, "--root", str(colors), "--out",
                 str(tmp_path / "mixed"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has shots 3" in err and "separate `vladapt eval` call" in err
    # two checkpoints that would write one record
    assert main(["eval", "--checkpoint", runs[0]["run_dir"], runs[0]["run_dir"], "--root", str(colors), "--out",
                 str(tmp_path / "twice"), "--quiet"]) == 2
    assert "would both write" in capsys.readouterr().err
    assert not Path(tmp_path / "twice" / "base2new").exists()


def test_run_protocol_many_gives_the_records_of_run_protocol_per_method(tmp_path):
    """A transfer protocol (dg, two targets) for three methods at once: the results of each equal
    run_protocol's for it alone."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from datafixtures import build_benchmark_root

    from vladapt.backbones import load_clip
    from vladapt.protocols.runner import RunSettings, run_protocol, run_protocol_many

    root, _ = build_benchmark_root(tmp_path / "data")
    bb = load_clip("vladapt-tiny")

    def weights(method, splits, seed, run_dir) -> None:  # "training": seeded random adapter weights
        randomized(method, seed + 7)

    settings = [
        RunSettings(bb, root, "mma", {"adapter_start": 3, "scale": 0.5}, train_fn=weights, progress=False),
        RunSettings(bb, root, "zeroshot", progress=False),
        RunSettings(bb, root, "heba", {"adapter_start": 2, "scale": 0.5}, train_fn=weights, progress=False),
    ]
    targets = ("imagenet_sketch", "imagenet_a")
    many = run_protocol_many("dg", settings, "imagenet", 1, 1, targets=targets)
    assert [r["method"] for r in many] == ["mma", "zeroshot", "heba"]
    for s, record in zip(settings, many):
        alone = run_protocol("dg", s, "imagenet", 1, 1, targets=targets)
        assert record["results"] == alone["results"], s.method
        assert record["method_config"] == alone["method_config"] and record["trained"] == alone["trained"]
    assert many[0]["results"] != many[2]["results"]
