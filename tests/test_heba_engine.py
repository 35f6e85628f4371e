"""The training engine and HeBA as a method: configs, training, checkpoints, resume, data parallel."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vladapt.config import from_mapping
from vladapt.data import load_custom
from vladapt.engine.checkpoint import load_checkpoint
from vladapt.engine.runconfig import packaged_config, resolve_run_config
from vladapt.engine.train import StepInfo, TrainConfig, fit, lr_at_epoch
from vladapt.errors import ConfigError
from vladapt.methods import create_method
from vladapt.methods.heba import HeBAConfig
from vladapt.protocols.runner import RunSettings, run_protocol

COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (200, 30, 200), (30, 200, 200)]
NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan"]


def color_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    for name, rgb in zip(NAMES, COLORS):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = (torch.rand(24, 24, 3, generator=g) * 60 - 30).numpy()
            arr = (torch.tensor(rgb).float().numpy() + noise).clip(0, 255).astype("uint8")
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("colors") / "data")


def quick_cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, lr=0.05, precision="fp32")
    base.update(kw)
    return from_mapping(TrainConfig, base)


def trainable(method):
    return {k: v.clone() for k, v in method.trainable_state_dict().items()}


def test_vit_b16_heba_has_87_158_016_trainable_parameters(vit_b16):
    bb = vit_b16
    heba = create_method("heba", bb, ["gerenuk", "okapi"])
    assert heba.num_trainable_parameters() == 87_158_016
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert bb.model.attached_modules() == {}  # adapters are attached only while HeBA computes


def test_zero_scale_equals_frozen_clip(tiny, images):
    names = ["cat", "dog", "red star"]
    heba = create_method("heba", tiny, names, {"scale": 0.0})
    zs = create_method("zeroshot", tiny, names, {"templates": "a photo of a {}."})
    with torch.no_grad():
        assert torch.allclose(heba(images), zs(images), atol=1e-5)
        heba.config.eval_scale = 0.025
        assert not torch.allclose(heba(images), zs(images), atol=1e-3)


def test_base2new_config_is_the_default_and_all_packaged_configs_validate():
    method_cfg, train_cfg = resolve_run_config("heba", "base2new")
    assert method_cfg == from_mapping(HeBAConfig, {}).__dict__
    assert (train_cfg.lr, train_cfg.epochs, train_cfg.batch_size, train_cfg.optimizer) == (0.0075, 30, 16, "sgd")
    for protocol in ("cross_dataset", "dg", "fewshot"):
        assert packaged_config("heba", protocol) is not None
        resolve_run_config("heba", protocol)
    xd, xd_train = resolve_run_config("heba", "cross_dataset")
    assert (xd["adapter_start"], xd["adapter_end"], xd["scale"], xd["scale_factor"]) == (9, 12, 0.05, 10.0)
    assert (xd_train.batch_size, xd_train.lr, xd_train.epochs) == (64, 0.0065, 10)


def test_config_errors_name_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'method\.adapter_scale' given on the command line; "
                                          r"allowed method keys: \[.*'scale'"):
        resolve_run_config("heba", "base2new", overrides=["method.adapter_scale=0.05"])
    bad = tmp_path / "run.yaml"
    bad.write_text("extends: " + str(packaged_config("heba", "base2new")) + "\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=f"unknown config key .train.learning_rate. in config file {bad} "
                                          r"\(or a file it extends\); allowed train keys: \[.*'lr'"):
        resolve_run_config("heba", "base2new", bad)
    with pytest.raises(ConfigError, match=r"train\.optimizer: 'adam' is not allowed; choose one of \['sgd', 'adamw'\]"):
        resolve_run_config("heba", "base2new", overrides=["train.optimizer=adam"])
    with pytest.raises(ConfigError, match=r"method\.slow_fast_ratio: 1\.5 is above the maximum 1\.0"):
        resolve_run_config("heba", "base2new", overrides=["method.slow_fast_ratio=1.5"])
    # the reference's x2d.yaml puts HeBA's keys under another namespace; here that is a named error
    bad = tmp_path / "x2d.yaml"
    bad.write_text("TRAINER:\n  LWEIB:\n    ADAPTER_SCALE: 0.05\n")
    with pytest.raises(ConfigError, match=r"unknown section 'TRAINER'.*allowed sections"):
        resolve_run_config("heba", "cross_dataset", path=bad)


def test_crop_scale_option(tiny):
    from vladapt.engine.train import _train_transform

    with pytest.raises(ConfigError, match=r"train\.crop_scale must be two area fractions"):
        resolve_run_config("heba", "base2new", overrides=["train.crop_scale=[0.5, 0.2]"])
    assert _train_transform(tiny, quick_cfg()) is tiny.train_transform  # the field's (0.08, 1)
    # [1, 1] keeps the whole image: the training view is the test view or its mirror image
    arr = (torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    image = Image.fromarray(arr)
    whole = tiny.test_transform(image)
    keep = _train_transform(tiny, quick_cfg(crop_scale=[1.0, 1.0]))
    for _ in range(8):
        view = keep(image)
        assert torch.equal(view, whole) or torch.equal(view, whole.flip(-1))
    crop = _train_transform(tiny, quick_cfg(crop_scale=[0.1, 0.2]))
    assert not any(torch.equal(crop(image), whole) for _ in range(4))


def test_dassl_learning_rate_schedule():
    cfg = quick_cfg(epochs=10, lr=0.1)
    assert lr_at_epoch(cfg, 0) == pytest.approx(0.1)
    assert lr_at_epoch(cfg, 5) == pytest.approx(0.05)
    warm = quick_cfg(epochs=10, lr=0.1, warmup_epochs=1, warmup_lr=1e-5)
    assert lr_at_epoch(warm, 0) == pytest.approx(1e-5)
    assert lr_at_epoch(warm, 1) == pytest.approx(0.1)  # the cosine starts after the warm-up epochs
    assert lr_at_epoch(warm, 6) == pytest.approx(0.05)


def test_negative_sampling_with_exactly_one_negative_class(tiny):
    heba = create_method("heba", tiny, ["a", "b", "c"])
    labels = torch.tensor([0, 1])
    step = StepInfo(0, 0, torch.Generator().manual_seed(0), labels, slice(0, 2), batch_size=2)
    out = heba.training_step(torch.randn(2, 3, 32, 32), labels, step)
    assert out.logits.shape == (2, 3)  # 2 positives + the single negative
    assert out.labels.tolist() == [0, 1]
    out.loss.backward()


def test_description_bank_prompts_and_reference_flag(tiny, tmp_path):
    bank = tmp_path / "descriptions.json"
    bank.write_text(json.dumps({"red star": ["a five-pointed red shape", "a red star"], "blue ring": ["a blue loop"]}))
    heba = create_method("heba", tiny, ["red_star", "blue ring"], {"descriptions": str(bank)})
    assert heba.bank.prompts[0] == ["a photo of a red star, a five-pointed red shape", "a photo of a red star, a red star"]
    assert heba.bank.prompts[1] == ["a photo of a blue ring, a blue loop"] * 2  # padded with its first prompt
    with pytest.raises(ConfigError, match="green cross"):
        create_method("heba", tiny, ["red star", "green cross"], {"descriptions": str(bank)})
    ref = create_method("heba", tiny, ["red star"], {"reference_prompts": True})
    assert ref.bank.prompts == [["a photo of a red star, a photo of a red star."]]
    assert create_method("heba", tiny, ["red star"]).bank.prompts == [["a photo of a red star."]]


def test_training_lowers_loss_and_beats_zero_shot_on_base(colors, tiny):
    settings = RunSettings(backbone=tiny, root=colors, method="zeroshot", progress=False)
    zs = run_protocol("base2new", settings, "folder", shots=8, seed=1)
    logs = {}

    def train_fn(method, splits, seed, run_dir):
        logs["epochs"] = fit(method, splits, quick_cfg(epochs=6, lr=0.1), seed, progress=False)

    settings = RunSettings(backbone=tiny, root=colors, method="heba", train_fn=train_fn, progress=False)
    rec = run_protocol("base2new", settings, "folder", shots=8, seed=1)
    losses = [e["loss"] for e in logs["epochs"]]
    assert losses[-1] < losses[0]
    assert rec["results"]["base"]["accuracy"] >= zs["results"]["base"]["accuracy"] + 20
    assert rec["results"]["base"]["eval_scale"] == 0.025 and rec["trainable_parameters"] > 0


def test_checkpoint_round_trip_gives_identical_logits(colors, tiny, tmp_path, images):
    splits = load_custom(colors, save_split=False)
    torch.manual_seed(0)
    heba = create_method("heba", tiny, splits.classnames)
    fit(heba, splits, quick_cfg(epochs=1), seed=0, run_dir=tmp_path / "run", progress=False)
    torch.manual_seed(123)  # a different initialization, overwritten by the checkpoint
    again = create_method("heba", tiny, splits.classnames)
    meta = load_checkpoint(tmp_path / "run", again, tiny.fingerprint)
    assert meta["epoch"] == 1 and meta["classnames"] == splits.classnames and meta["method"] == "heba"
    assert meta["backbone"]["fingerprint"] == tiny.fingerprint
    with torch.no_grad():
        assert torch.equal(heba(images), again(images))
    with pytest.raises(ConfigError, match="weights"):
        load_checkpoint(tmp_path / "run", again, "0" * 16)
    with pytest.raises(ConfigError, match="of method 'heba', not 'zeroshot'"):
        load_checkpoint(tmp_path / "run", create_method("zeroshot", tiny, splits.classnames))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(colors, tiny, tmp_path):
    splits = load_custom(colors, save_split=False)
    cfg = quick_cfg(epochs=3)
    torch.manual_seed(0)
    straight = create_method("heba", tiny, splits.classnames)
    fit(straight, splits, cfg, seed=5, run_dir=tmp_path / "a", progress=False)

    torch.manual_seed(0)
    killed = create_method("heba", tiny, splits.classnames)
    real_step = killed.training_step

    def dies_in_epoch_3(images, labels, step):
        if step.epoch == 2:
            raise KeyboardInterrupt
        return real_step(images, labels, step)

    killed.training_step = dies_in_epoch_3
    with pytest.raises(KeyboardInterrupt):
        fit(killed, splits, cfg, seed=5, run_dir=tmp_path / "b", progress=False)
    torch.manual_seed(99)
    resumed = create_method("heba", tiny, splits.classnames)
    logs = fit(resumed, splits, cfg, seed=5, run_dir=tmp_path / "b", resume=True, progress=False)
    assert [e["epoch"] for e in logs] == [1, 2, 3]
    a, b = trainable(straight), trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="different train_config"):
        fit(create_method("heba", tiny, splits.classnames), splits, quick_cfg(epochs=4), seed=5,
            run_dir=tmp_path / "b", resume=True, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(colors, tmp_path):
    common = ["train", "--method", "heba", "--protocol", "fewshot", "--dataset", "folder", "--root", str(colors),
              "--shots", "4", "--quiet", "train.epochs=2", "train.batch_size=4", "train.lr=0.05",
              "train.precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "vladapt.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "vladapt.cli", *common, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    rel = Path("fewshot/heba/folder/shots_4-seed_1")
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "one" / rel / "checkpoint" / "weights.safetensors"))
    w2 = load_file(str(tmp_path / "two" / rel / "checkpoint" / "weights.safetensors"))
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    r1 = json.loads((tmp_path / "one" / rel.with_suffix(".json")).read_text())["results"]["test"]
    r2 = json.loads((tmp_path / "two" / rel.with_suffix(".json")).read_text())["results"]["test"]
    assert r1["correct"] == r2["correct"]
    l1 = (tmp_path / "one" / rel / "log.jsonl").read_text().splitlines()
    l2 = (tmp_path / "two" / rel / "log.jsonl").read_text().splitlines()
    for a, b in zip(map(json.loads, l1), map(json.loads, l2)):
        assert a["images"] == b["images"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_train_and_eval_checkpoint_from_the_cli(colors, tmp_path, capsys):
    from vladapt.cli import main

    out = tmp_path / "runs"
    args = ["--protocol", "base2new", "--dataset", "folder", "--root", str(colors), "--shots", "4", "--quiet"]
    assert main(["train", "--method", "heba", *args, "--out", str(out), "train.epochs=1", "train.batch_size=4",
                 "method.new_eval_scale=0.01"]) == 0
    rec = json.loads((out / "base2new/heba/folder/shots_4-seed_1.json").read_text())
    assert rec["trained"] and rec["results"]["base"]["eval_scale"] == 0.025
    assert rec["results"]["new"]["eval_scale"] == 0.01  # the record says which scale produced which number
    run_dir = Path(rec["run_dir"])
    assert json.loads((run_dir / "checkpoint" / "meta.json").read_text())["train_config"]["epochs"] == 1
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 1
    assert main(["eval", "--checkpoint", str(run_dir), "--root", str(colors), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    again = json.loads((tmp_path / "again/base2new/heba/folder/shots_4-seed_1.eval.json").read_text())
    assert again["results"]["base"]["correct"] == rec["results"]["base"]["correct"]
    assert again["results"]["new"]["correct"] == rec["results"]["new"]["correct"]
    assert again["checkpoint"] == str(run_dir)
    capsys.readouterr()
    assert main(["train", "--method", "heba", *args, "--out", str(out), "method.scale=fast"]) == 2
    assert "method.scale" in capsys.readouterr().err
