"""Zero-shot CLIP through every protocol from the CLI, on generated miniatures of all 15 datasets."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import yaml

from datafixtures import build_benchmark_root
from vladapt.backbones import load_clip
from vladapt.bench.report import base2new_table, load_records
from vladapt.cli import main
from vladapt.data import load_dataset
from vladapt.errors import ConfigError
from vladapt.methods.base import Method, StepOutput
from vladapt.methods.registry import _METHODS, MethodInfo
from vladapt.protocols import CROSS_DATASET_TARGETS, DG_TARGETS, harmonic_mean
from vladapt.protocols.runner import RunSettings, run_protocol


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_benchmark_root(tmp_path_factory.mktemp("data"))


def read(path):
    return json.loads(path.read_text())


def test_base2new_from_cli(bench, tmp_path, capsys):
    root, expected = bench
    out = tmp_path / "runs"
    argv = ["eval", "--method", "zeroshot", "--protocol", "base2new", "--dataset", "eurosat", "--root", str(root),
            "--shots", "2", "--seeds", "1", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    recs = [read(out / "base2new" / "zeroshot" / "eurosat" / f"shots_2-seed_{s}.json") for s in (1, 2)]
    full = load_dataset("eurosat", root)
    n = full.num_classes
    m = -(-n // 2)  # ceil
    for rec in recs:
        res = rec["results"]
        assert res["base"]["num_classes"] == m and res["new"]["num_classes"] == n - m
        # the test split is complete: every base-class / new-class test image is evaluated
        assert res["base"]["total"] == sum(d.label < m for d in full.test)
        assert res["new"]["total"] == sum(d.label >= m for d in full.test)
        assert res["hm"] == pytest.approx(harmonic_mean(res["base"]["accuracy"], res["new"]["accuracy"]))
        assert rec["trained"] is False and rec["backbone"] == {"name": "vladapt-tiny", "pretrained": "bundled", "fingerprint": load_clip("vladapt-tiny").fingerprint}
        assert rec["method_config"]["templates"] == "dataset"
    report = (out / "report.md").read_text()
    assert "| eurosat | 2 |" in report
    assert "base-to-new: zeroshot, 2 shots" in capsys.readouterr().out
    # few-shot subsets are cached per (K, seed) inside the dataset folder
    assert (root / "eurosat" / "split_fewshot" / "shot_2-seed_1.json").is_file()


@pytest.mark.parametrize("protocol,targets", [("cross_dataset", CROSS_DATASET_TARGETS), ("dg", DG_TARGETS)])
def test_transfer_protocols_average_targets_only(bench, tmp_path, protocol, targets):
    root, _ = bench
    out = tmp_path / "runs"
    assert main(["eval", "--protocol", protocol, "--dataset", "imagenet", "--root", str(root), "--shots", "1",
                 "--out", str(out), "--quiet"]) == 0
    rec = read(out / protocol / "zeroshot" / "imagenet" / "shots_1-seed_1.json")
    res = rec["results"]
    assert list(res["targets"]) == list(targets)
    accs = [res["targets"][t]["accuracy"] for t in targets]
    assert res["average"] == pytest.approx(sum(accs) / len(accs))
    assert "imagenet" in res["source"] and "imagenet" not in res["targets"]
    for t in targets:
        assert res["targets"][t]["total"] == len(load_dataset(t, root).test)
    if protocol == "dg":  # the 200-class variants are evaluated with their own classifier
        assert res["targets"]["imagenet_a"]["num_classes"] == load_dataset("imagenet_a", root).num_classes
    assert f"### {protocol}: zeroshot, trained on imagenet" in (out / "report.md").read_text()


def test_fewshot_protocol_table(bench, tmp_path):
    root, _ = bench
    out = tmp_path / "runs"
    assert main(["eval", "--protocol", "fewshot", "--dataset", "dtd", "--root", str(root), "--shots", "1", "2",
                 "--out", str(out), "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "| dataset | 1 shots | 2 shots |" in report and "| dtd |" in report
    assert len(load_records(out)) == 2


def test_every_reader_runs_through_zero_shot(bench, tmp_path):
    root, expected = bench
    settings = RunSettings(backbone=load_clip("vladapt-test-tiny"), root=root, method="zeroshot", progress=False)
    for name in expected:
        rec = run_protocol("fewshot", settings, name, shots=1, seed=1)
        assert rec["results"]["test"]["total"] == len(expected[name].paths["test"]), name


@dataclass
class _RecConfig:
    pass


class _Recorder(Method):
    """A trainable stand-in that records what the protocol trained it on."""

    Config = _RecConfig
    trainable = True

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        self.trained_on = None

    def forward(self, images):
        return torch.zeros(len(images), len(self.classnames))

    def training_step(self, images, labels):
        return StepOutput(loss=torch.zeros(()))


def test_base2new_trains_on_base_classes_only(bench, monkeypatch):
    root, _ = bench
    monkeypatch.setitem(_METHODS, "recorder", MethodInfo("recorder", _Recorder))
    seen = {}

    def train_fn(method, splits, seed, run_dir):
        seen.update(classes=list(splits.classnames), labels={d.label for d in splits.train}, seed=seed,
                    method_classes=list(method.classnames))

    settings = RunSettings(backbone=load_clip("vladapt-test-tiny"), root=root, method="recorder",
                           train_fn=train_fn, progress=False)
    rec = run_protocol("base2new", settings, "oxford_pets", shots=2, seed=3)
    full = load_dataset("oxford_pets", root)
    m = -(-full.num_classes // 2)
    assert seen["classes"] == full.classnames[:m] == seen["method_classes"]
    assert seen["labels"] == set(range(m)) and seen["seed"] == 3
    assert rec["trained"] is True
    with pytest.raises(ConfigError, match="no trainer"):
        run_protocol("base2new", RunSettings(backbone=settings.backbone, root=root, method="recorder",
                                             progress=False), "oxford_pets", shots=2, seed=3)
    with pytest.raises(ConfigError, match="unknown protocol"):
        run_protocol("b2n", settings, "oxford_pets", shots=2, seed=3)


def test_average_rows_use_hm_of_means_and_label_mean_of_hms():
    recs = [
        {"protocol": "base2new", "method": "m", "shots": 16, "dataset": d, "seed": 1,
         "results": {"base": {"accuracy": b}, "new": {"accuracy": n}}}
        for d, b, n in (("a", 80.0, 60.0), ("b", 90.0, 40.0))
    ]
    table = base2new_table(recs)
    assert f"| {harmonic_mean(85.0, 50.0):.2f} |" in table  # HM of mean Base and mean New
    mean_of_hms = (harmonic_mean(80, 60) + harmonic_mean(90, 40)) / 2
    assert f"average (mean of per-dataset HMs) | | | | {mean_of_hms:.2f}" in table


def test_data_check_cli(bench, tmp_path, capsys):
    root, _ = bench
    assert main(["data", "check", "--dataset", "dtd", "--root", str(root), "--quiet"]) == 0
    assert "dtd" in capsys.readouterr().out
    assert main(["data", "check", "--dataset", "dtd", "--root", str(tmp_path), "--quiet"]) == 1
    assert "split_zhou_DescribableTextures.json" in capsys.readouterr().out


def test_eval_rejects_unknown_override_sections(bench, tmp_path, capsys):
    root, _ = bench
    rc = main(["eval", "--protocol", "base2new", "--dataset", "dtd", "--root", str(root), "--out", str(tmp_path),
               "trainer.lr=1"])
    assert rc == 2 and "trainer" in capsys.readouterr().err
    rc = main(["eval", "--protocol", "base2new", "--dataset", "dtd", "--root", str(root), "--out", str(tmp_path),
               "method.templatez=x"])
    err = capsys.readouterr().err
    assert rc == 2 and "templatez" in err and "allowed keys" in err


def test_custom_folder_runs_through_base2new(tmp_path):
    from PIL import Image

    folder = tmp_path / "my_images"
    for c, rgb in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]):
        for i in range(6):
            (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 10), rgb).save(folder / f"class_{c}" / f"{i}.png")
    out = tmp_path / "runs"
    assert main(["eval", "--protocol", "base2new", "--dataset", "folder", "--root", str(folder), "--shots", "2",
                 "--out", str(out), "--quiet"]) == 0
    rec = read(out / "base2new" / "zeroshot" / "folder" / "shots_2-seed_1.json")
    assert rec["results"]["base"]["num_classes"] == 3 and rec["results"]["new"]["num_classes"] == 2
    assert (folder / "split.json").is_file()  # the seeded split is saved and reused by later runs


def test_transforms_are_the_protocols():
    from torchvision import transforms as T

    from vladapt.backbones import CLIP_MEAN, CLIP_STD

    bb = load_clip("vladapt-test-tiny")
    train = {type(t): t for t in bb.train_transform.transforms}
    crop = train[T.RandomResizedCrop]
    assert crop.size == (32, 32) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert T.RandomHorizontalFlip in train and train[T.Normalize].mean == CLIP_MEAN and train[T.Normalize].std == CLIP_STD
    test = {type(t): t for t in bb.test_transform.transforms}
    assert test[T.Resize].size == 32 and test[T.Resize].interpolation == T.InterpolationMode.BICUBIC
    assert test[T.CenterCrop].size == (32, 32)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)


MMA_QUICK = ["method.adapter_start=1"]
LATH_QUICK = ["method.num_attributes=2"]
NO_WARMUP = ["train.warmup_epochs=0"]  # the published warm-up epoch needs more than the one epoch run here


@pytest.mark.parametrize("method,protocol,dataset,overrides", [
    ("mma", "base2new", "eurosat", MMA_QUICK), ("mma", "fewshot", "dtd", MMA_QUICK),
    ("mma", "cross_dataset", "imagenet", MMA_QUICK), ("rmadapter", "base2new", "eurosat", MMA_QUICK),
    ("rmadapter", "dg", "imagenet", MMA_QUICK), ("lathadapter", "base2new", "eurosat", LATH_QUICK),
    ("lathadapter", "fewshot", "dtd", LATH_QUICK), ("lathadapter", "cross_dataset", "imagenet", LATH_QUICK),
    ("lathadapter", "dg", "imagenet", LATH_QUICK), ("clip_adapter", "fewshot", "dtd", NO_WARMUP),
    ("clip_adapter", "base2new", "eurosat", NO_WARMUP), ("clip_lora", "base2new", "eurosat", ["train.iterations=2"]),
    ("lathadapter", "dg", "imagenet", LATH_QUICK), ("coop", "base2new", "eurosat", NO_WARMUP),
    ("coop", "cross_dataset", "imagenet", [*NO_WARMUP, "method.class_token_position=middle"]),
    ("coop", "fewshot", "dtd", [*NO_WARMUP, "method.csc=true"]), ("cocoop", "base2new", "eurosat", [*NO_WARMUP, "method.text_batch_size=3"]),
    ("cocoop", "dg", "imagenet", NO_WARMUP), ("lweib", "base2new", "eurosat", ["method.text_conv=causal"]),
    ("lweib", "cross_dataset", "imagenet", []),
])
def test_adapters_train_through_every_protocol_from_cli(bench, tmp_path, method, protocol, dataset, overrides):
    root, _ = bench
    out = tmp_path / "runs"
    argv = ["train", "--method", method, "--protocol", protocol, "--dataset", dataset, "--root", str(root),
            "--model", "vladapt-test-tiny", "--shots", "1", "--out", str(out), "--quiet",
            *overrides, "train.epochs=1", "train.batch_size=4"]
    assert main(argv) == 0
    rec = read(out / protocol / method / dataset / "shots_1-seed_1.json")
    assert rec["trained"] and rec["method"] == method and rec["trainable_parameters"] > 0
    for override in (o for o in overrides if o.startswith("method.")):
        key, value = override.removeprefix("method.").split("=")
        assert rec["method_config"][key] == yaml.safe_load(value)
    run_dir = out / protocol / method / dataset / "shots_1-seed_1"
    assert (run_dir / "checkpoint" / "weights.safetensors").is_file()
    logs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 1 or "train.iterations=2" in overrides  # an iteration budget may span epochs
    log = logs[-1]
    if method == "lathadapter":  # the epoch log keeps the mean of every term the steps reported
        assert {"ce", "contrast", "entail_category_attribute", "depth_image"} <= set(log["terms"])
    if method == "rmadapter":
        assert {"ce", "rec_visual", "rec_text"} <= set(log["terms"])


def test_linear_probe_runs_fewshot_and_refuses_unseen_classes(bench, tmp_path, capsys):
    root, _ = bench
    out = tmp_path / "runs"
    common = ["--root", str(root), "--model", "vladapt-test-tiny", "--shots", "2", "--out", str(out), "--quiet",
              "method.search_steps=1", "method.max_iter=50"]
    assert main(["eval", "--method", "linear_probe", "--protocol", "fewshot", "--dataset", "dtd", *common]) == 0
    rec = read(out / "fewshot" / "linear_probe" / "dtd" / "shots_2-seed_1.json")
    assert rec["results"]["test"]["total"] > 0 and rec["results"]["test"]["C"] > 0
    capsys.readouterr()
    assert main(["eval", "--method", "linear_probe", "--protocol", "base2new", "--dataset", "eurosat", *common]) == 2
    assert "unseen classes" in capsys.readouterr().err
