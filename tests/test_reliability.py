"""Faults end in one clear line, never in a bad result: divergence, damaged checkpoints, read-only
folders, worker errors; records keep the train config, checkpoint evaluations and resumes are told apart."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_heba_engine import color_folder, quick_cfg
from vladapt.cli import main
from vladapt.data import load_custom
from vladapt.engine.checkpoint import load_checkpoint
from vladapt.engine.train import DivergedError, fit
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
    with pytest.raises(DivergedError, match=r"epoch 2, step 1/.*train\.lr") as e:
        fit(heba, splits, quick_cfg(epochs=3), seed=0, run_dir=run, progress=False)
    assert "\n" not in str(e.value) and str(run / "checkpoint") in str(e.value)
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["epoch"] == 1  # the good epoch-1 checkpoint, not a NaN one
    again = create_method("heba", tiny, splits.classnames)
    load_checkpoint(run, again, tiny.fingerprint)
    assert all(torch.isfinite(v).all() for v in again.trainable_state_dict().values())
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def test_a_huge_learning_rate_exits_non_zero_without_a_record(colors, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(colors, out, "train.epochs=3", "train.lr=1000000.0")) == 2
    err = one_line_error(capsys)
    assert "training diverged" in err and "lower the learning rate" in err and "epoch" in err
    assert not list(out.rglob("shots_4-seed_1.json"))  # no record of a diverged run
    for line in (out / "fewshot/heba/folder/shots_4-seed_1/log.jsonl").read_text().splitlines() \
            if (out / "fewshot/heba/folder/shots_4-seed_1/log.jsonl").is_file() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in log.jsonl"))


def test_json_files_are_strict(tmp_path):
    from vladapt.io import atomic_write_json

    path = atomic_write_json(tmp_path / "r.json", {"loss": float("nan"), "x": [1.0, float("inf")], "ok": 2.5})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "x": [1.0, None], "ok": 2.5}
