"""Faults end in one clear line, never in a bad result: divergence, damaged checkpoints, read-only
folders, worker errors; records keep the train config, checkpoint evaluations and resumes are told apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_heba_engine import color_folder, quick_cfg
from vladapt.cli import main
from vladapt.data import load_custom
from vladapt.engine.checkpoint import load_checkpoint
from vladapt.engine.train import fit
from vladapt.errors import VladaptError
from vladapt.methods import create_method

MODEL = ["--model", "vladapt-test-tiny"]


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("colors") / "data", per_class=6)


def train_args(colors, out, *extra):
    return ["train", "--method", "heba", "--protocol", "fewshot", "--dataset", "folder", "--root", str(colors),
            "--shots", "4", "--quiet", *MODEL, "--out", str(out), "train.batch_size=4", "train.precision=fp32",
            *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- 1. divergence
def nan_from_epoch(method, epoch: int):
    real = method.training_step

    def step(images, labels, info):
        out = real(images, labels, info)
        if info.epoch >= epoch:
            out.loss = out.loss * float("nan")
        return out

    method.training_step = step
    return method


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(colors, tiny, tmp_path):
    splits = load_custom(colors, save_split=False)
    torch.manual_seed(0)
    heba = nan_from_epoch(create_method("heba", tiny, splits.classnames), epoch=1)
    run = tmp_path / "run"
    with pytest.raises(VladaptError, match=r"epoch 2, step 1/.*train\.lr") as e:
        fit(heba, splits, quick_cfg(epochs=3), seed=0, run_dir=run, progress=False)
    assert type(e.value).__name__ == "DivergedError"
    assert "\n" not in str(e.value) and str(run / "checkpoint") in str(e.value)
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["epoch"] == 1  # the good epoch-1 checkpoint, not a NaN one
    again = create_method("heba", tiny, splits.classnames)
    load_checkpoint(run, again, tiny.fingerprint)
    assert all(torch.isfinite(v).all() for v in again.trainable_state_dict().values())
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def nan_gradient_at(method, epoch: int, step: int):
    """Every gradient of one step is NaN (the loss itself stays finite)."""
    real = method.training_step

    def training_step(images, labels, info):
        out = real(images, labels, info)
        if (info.epoch, info.step) == (epoch, step):
            out.loss.register_hook(lambda g: g * float("nan"))
        return out

    method.training_step = training_step
    return method


@pytest.mark.parametrize("grad_clip, step, found, where", [
    (1.0, 0, "a gradient is not finite", "epoch 2, step 1/"),  # the clipping norm finds it at once
    (None, 0, "the loss is nan", "epoch 2, step 2/"),  # the NaN weights make the next loss NaN
    (None, -1, "a trained weight is not finite", "epoch 2, step {n}/{n}"),  # the epoch's last step
])
def test_a_nan_gradient_stops_the_run_before_a_checkpoint_of_its_epoch(colors, tiny, tmp_path, grad_clip, step,
                                                                       found, where):
    splits = load_custom(colors, save_split=False)
    steps = len(splits.train) // 4
    assert steps >= 2
    torch.manual_seed(0)
    heba = nan_gradient_at(create_method("heba", tiny, splits.classnames), epoch=1, step=step % steps)
    run = tmp_path / "run"
    with pytest.raises(VladaptError, match="training diverged") as e:
        fit(heba, splits, quick_cfg(epochs=3, grad_clip=grad_clip), seed=0, run_dir=run, progress=False)
    assert found in str(e.value) and where.format(n=steps) in str(e.value)
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["epoch"] == 1


def test_a_huge_learning_rate_exits_non_zero_without_a_record(colors, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(colors, out, "train.epochs=3", "train.lr=1000000.0")) == 2
    err = one_line_error(capsys)
    assert "training diverged" in err and "lower the learning rate" in err and "epoch" in err
    assert not list(out.rglob("shots_4-seed_1.json"))  # no record of a diverged run
    log = out / "fewshot/heba/folder/shots_4-seed_1/log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in log.jsonl"))


def test_json_files_are_strict(tmp_path):
    from vladapt.io import atomic_write_json

    path = atomic_write_json(tmp_path / "r.json", {"loss": float("nan"), "x": [1.0, float("inf")], "ok": 2.5})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "x": [1.0, None], "ok": 2.5}


# ---------------------------------------------------------------- 5. damaged checkpoints, unwritable folders
@pytest.fixture(scope="module")
def trained_run(colors, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "runs"
    assert main(train_args(colors, out, "train.epochs=1")) == 0
    return out / "fewshot/heba/folder/shots_4-seed_1"


def damaged_copy(run: Path, tmp_path: Path, name: str, keep: int) -> Path:
    import shutil

    shutil.copytree(run.parents[3], tmp_path / "runs")
    copy = tmp_path / "runs" / run.relative_to(run.parents[3])
    path = copy / "checkpoint" / name
    path.write_bytes(path.read_bytes()[:keep])
    return copy


@pytest.mark.parametrize("name, keep", [("weights.safetensors", 5), ("weights.safetensors", 200),
                                        ("meta.json", 40), ("optimizer.pt", 100)])
def test_a_truncated_checkpoint_file_is_named_in_one_line(colors, trained_run, tmp_path, capsys, name, keep):
    run = damaged_copy(trained_run, tmp_path, name, keep)
    if name == "optimizer.pt":  # only --resume reads the optimizer state
        out = run.parents[3]
        assert main(train_args(colors, out, "train.epochs=2", "--resume")) == 2
    else:
        assert main(["eval", "--checkpoint", str(run), "--root", str(colors), "--out", str(tmp_path / "ev"),
                     "--quiet"]) == 2
    err = one_line_error(capsys)
    assert str(run / "checkpoint" / name) in err and "delete the run folder" in err, err


def test_an_unwritable_output_folder_fails_before_training(colors, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    import vladapt.engine.train as train

    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("training started"))
    assert main(train_args(colors, blocker / "runs", "train.epochs=1")) == 2
    err = one_line_error(capsys)
    assert str(blocker / "runs") in err and "writable" in err


def test_fit_checks_its_run_folder_before_the_first_epoch(colors, tiny, tmp_path):
    splits = load_custom(colors, save_split=False)
    heba = create_method("heba", tiny, splits.classnames)
    calls = []
    real = heba.training_step
    heba.training_step = lambda *a: calls.append(1) or real(*a)
    (tmp_path / "file").write_text("")
    with pytest.raises(VladaptError, match="cannot write to the run folder"):
        fit(heba, splits, quick_cfg(epochs=1), seed=0, run_dir=tmp_path / "file" / "run", progress=False)
    assert not calls


def test_an_unwritable_feature_cache_warns_once_and_continues_in_memory(colors, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = tmp_path / "runs"
    assert main(["eval", "--method", "tip_adapter", "--protocol", "fewshot", "--dataset", "folder", "--root",
                 str(colors), "--shots", "2", *MODEL, "--out", str(out), "--quiet", "--feature-cache",
                 str(blocker / "cache")]) == 0
    warnings_ = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings_) == 1 and warnings_[0].startswith("vladapt: warning: cannot write the feature cache")
    assert str(blocker / "cache") in warnings_[0]
    assert (out / "fewshot/tip_adapter/folder/shots_2-seed_1.json").is_file()


def test_a_data_error_in_a_worker_process_is_one_line(colors, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(colors, data)
    for png in sorted(data.rglob("*.png")):
        png.write_bytes(b"not an image")
    assert main(["eval", "--method", "zeroshot", "--protocol", "fewshot", "--dataset", "folder", "--root", str(data),
                 "--shots", "2", *MODEL, "--out", str(tmp_path / "runs"), "--quiet", "--workers", "2"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("vladapt: error: cannot read image ") and str(data) in err


# ---------------------------------------------------------------- 8, 9, 10: records and reports
def test_checkpoint_evaluation_keeps_the_training_record(colors, trained_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(trained_run.parent.parent.parent.parent, out)
    train_path = out / "fewshot/heba/folder/shots_4-seed_1.json"
    before = train_path.read_text()
    run = out / "fewshot/heba/folder/shots_4-seed_1"
    assert main(["eval", "--checkpoint", str(run), "--root", str(colors), "--out", str(out), "--quiet"]) == 0
    assert train_path.read_text() == before  # the training record (run_dir, seconds) is untouched
    ev = json.loads((out / "fewshot/heba/folder/shots_4-seed_1.eval.json").read_text())
    tr = json.loads(before)
    assert ev["checkpoint"] == str(run) and "run_dir" not in ev and tr["run_dir"] == str(trained_run)
    assert ev["results"]["test"]["correct"] == tr["results"]["test"]["correct"]
    report = (out / "report.md").read_text()
    assert "### few-shot: heba\n" in report and "### few-shot: heba (checkpoint eval)\n" in report


def test_records_hold_the_train_config_and_the_report_shows_non_default_settings(colors, trained_run):
    rec = json.loads((trained_run.parent / "shots_4-seed_1.json").read_text())
    assert rec["train_config"]["epochs"] == 1 and rec["train_config"]["batch_size"] == 4
    assert rec["train_config"]["lr"] == json.loads((trained_run / "checkpoint/meta.json").read_text())[
        "train_config"]["lr"]
    report = (trained_run.parents[3] / "report.md").read_text()
    row = "| fewshot | heba | folder | 4 | 1 | `train.batch_size=4`, `train.epochs=1`, `train.precision=fp32` |"
    assert row in report


def test_a_failed_seed_leaves_the_report_of_the_finished_ones(colors, tiny, tmp_path):
    from vladapt.bench.grid import run_grid
    from vladapt.protocols.runner import RunSettings

    def train_fn(method, splits, seed, run_dir):
        if seed == 2:
            raise VladaptError("seed 2 fails")
        fit(method, splits, quick_cfg(epochs=1), seed, progress=False)

    settings = RunSettings(backbone=tiny, root=colors, method="heba", train_fn=train_fn, progress=False)
    with pytest.raises(VladaptError, match="seed 2 fails"):
        run_grid(settings, "fewshot", "folder", shots=[2], seeds=[1, 2], out=tmp_path / "runs")
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "### few-shot: heba" in report and "| folder |" in report


def test_a_resumed_run_says_so_in_the_progress_and_the_record(colors, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(colors, out, "train.epochs=2")) == 0
    run = out / "fewshot/heba/folder/shots_4-seed_1"
    # rewind the finished run to its state after epoch 1 (as if it had been interrupted in epoch 2)
    meta = json.loads((run / "checkpoint/meta.json").read_text())
    (run / "checkpoint/meta.json").write_text(json.dumps({**meta, "epoch": 1}))
    capsys.readouterr()
    assert main([a for a in train_args(colors, out, "train.epochs=2", "--resume") if a != "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "resumed from epoch 1" in captured.err  # the progress output
    assert "(resumed from epoch 1)" in captured.out  # the summary line
    rec = json.loads((out / "fewshot/heba/folder/shots_4-seed_1.json").read_text())
    assert rec["resumed_from_epoch"] == 1
    assert "resumed from epoch 1" in (out / "report.md").read_text()
