"""`data check` decodes images and can list every bad file; runs check image existence up front."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from datafixtures import build_dataset
from PIL import Image

from vladapt.cli import main
from vladapt.data import check_dataset, format_report, load_dataset, require_images
from vladapt.errors import DataError


def _truncate_jpeg(path: Path) -> None:
    """Overwrite ``path`` with a noisy 96x96 JPEG cut to its first half: its header stays valid."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_truncated_jpeg_fails_the_default_check_but_not_the_fast_one(tmp_path: Path) -> None:
    expected = build_dataset(tmp_path, "dtd")
    truncated = expected.image_root / expected.paths["test"][1]
    _truncate_jpeg(truncated)
    report = check_dataset("dtd", tmp_path, quiet=True)
    assert [p for p, _ in report.unreadable] == [truncated]
    assert "truncated" in report.unreadable[0][1]
    fast = check_dataset("dtd", tmp_path, decode=False, quiet=True)
    assert fast.ok  # a header check cannot see it: that is what --fast trades away
    assert "headers readable (not decoded)" in format_report(fast)


def test_cli_decodes_by_default_and_fast_reads_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = build_dataset(tmp_path, "eurosat")
    truncated = expected.image_root / expected.paths["train"][0]
    _truncate_jpeg(truncated)
    argv = ["data", "check", "--dataset", "eurosat", "--root", str(tmp_path), "--quiet"]
    assert main(argv) == 1
    assert f"unreadable images (1):\n    {truncated}: " in capsys.readouterr().out
    assert main([*argv, "--fast"]) == 0
    assert "headers readable (not decoded)" in capsys.readouterr().out


def test_every_bad_file_can_be_listed_or_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = build_dataset(tmp_path, "ucf101")
    gone = [expected.image_root / p for split in ("train", "val", "test") for p in expected.paths[split]]
    for path in gone:
        path.unlink()
    assert len(gone) > 20
    argv = ["data", "check", "--dataset", "ucf101", "--root", str(tmp_path), "--quiet"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert f"missing images ({len(gone)}):" in out and f"... and {len(gone) - 20} more" in out
    assert "--all prints every one" in out and str(gone[-1]) not in out
    assert main([*argv, "--all"]) == 1
    out = capsys.readouterr().out
    assert all(str(p) in out for p in gone) and "more" not in out
    report_file = tmp_path / "reports" / "check.txt"
    assert main([*argv, "--output", str(report_file)]) == 1
    assert f"full report written to {report_file}" in capsys.readouterr().out
    written = report_file.read_text()
    assert all(f"    {p}\n" in written for p in gone) and "FAILED" in written


def test_require_images_lists_the_count_and_first_missing(tmp_path: Path) -> None:
    expected = build_dataset(tmp_path, "dtd")
    splits = load_dataset("dtd", tmp_path)
    require_images(splits)  # complete: no error
    gone = [expected.image_root / p for p in expected.paths["test"][:7]]
    for path in gone:
        path.unlink()
    require_images(splits, ("train", "val"))  # only the test split lost files
    with pytest.raises(DataError) as err:
        require_images(splits, dataset="dtd", root=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"7 of {len(splits.train) + len(splits.val) + len(splits.test)} images" in message
    assert all(str(p) in message for p in gone[:5]) and str(gone[5]) not in message
    assert f"`vladapt data check --dataset dtd --root {tmp_path}`" in message
    assert "vladapt.data.check_dataset()" in message


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a run gets as far as encoding images."""
    from vladapt.engine import features

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started computing features before checking its images")

    monkeypatch.setattr(features.FrozenFeatures, "__init__", refuse)


def test_eval_checks_every_image_before_any_compute(tmp_path: Path, no_compute: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    expected = build_dataset(tmp_path, "dtd")
    for path in expected.paths["test"][-3:]:
        (expected.image_root / path).unlink()
    argv = ["eval", "--method", "zeroshot", "--protocol", "fewshot", "--dataset", "dtd", "--root", str(tmp_path),
            "--shots", "1", "--out", str(tmp_path / "runs"), "--quiet"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "3 of 15 images of the train/val/test split(s) are missing" in err
    assert "vladapt data check --dataset dtd" in err


def test_transfer_targets_are_checked_before_training(tmp_path: Path, no_compute: None) -> None:
    from vladapt.backbones import load_clip
    from vladapt.protocols.runner import RunSettings, run_cross_dataset

    build_dataset(tmp_path, "imagenet")
    target = build_dataset(tmp_path, "eurosat")
    (target.image_root / target.paths["test"][0]).unlink()
    settings = RunSettings(backbone=load_clip("vladapt-test-tiny"), root=tmp_path, method="zeroshot", progress=False)
    with pytest.raises(DataError, match=r"dataset 'eurosat': 1 of \d+ images of the test split"):
        run_cross_dataset(settings, "imagenet", shots=1, seed=1, targets=("eurosat",))
