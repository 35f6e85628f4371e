"""The dataset checker collects every problem; ImageDataset reads images or names the bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datafixtures import Expected, build_benchmark_root, build_dataset, write_image

from vladapt.data import (
    ImageDataset,
    check_dataset,
    format_report,
    list_datasets,
    load_dataset,
)
from vladapt.errors import ConfigError, DataError
from vladapt.protocols import CROSS_DATASET_TARGETS, DG_TARGETS


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expected]]:
    return build_benchmark_root(tmp_path_factory.mktemp("data_root"))


def test_protocol_targets_are_registered_datasets() -> None:
    assert set(CROSS_DATASET_TARGETS) | set(DG_TARGETS) <= set(list_datasets())


def test_clean_dataset_is_ok(bench_root) -> None:
    root, expected = bench_root
    report = check_dataset("dtd", root, quiet=True)
    assert report.ok
    assert report.num_classes == 3 and report.counts == {"train": 12, "val": 6, "test": 9}
    assert report.image_root == expected["dtd"].image_root
    text = format_report(report)
    assert "classes: 3; items: train 12, val 6, test 9" in text
    assert "OK: 27 images present and readable" in text


def test_every_missing_and_unreadable_image_is_listed(tmp_path: Path) -> None:
    expected = build_dataset(tmp_path, "oxford_pets")
    missing = [expected.image_root / p for p in expected.paths["train"][:3]]
    for path in missing:
        path.unlink()
    corrupt = expected.image_root / expected.paths["test"][0]
    corrupt.write_bytes(b"\xff\xd8 this is not a jpeg")
    report = check_dataset("oxford_pets", tmp_path, quiet=True)
    assert not report.ok
    assert report.missing == missing
    assert [p for p, _ in report.unreadable] == [corrupt]
    text = format_report(report)
    assert "missing images (3):" in text and all(str(p) in text for p in missing)
    assert f"unreadable images (1):\n    {corrupt}: " in text
    assert "FAILED" in text


def test_existence_only_check_skips_decoding(tmp_path: Path) -> None:
    expected = build_dataset(tmp_path, "eurosat")
    (expected.image_root / expected.paths["val"][0]).write_bytes(b"garbage")
    report = check_dataset("eurosat", tmp_path, verify_images=False, quiet=True)
    assert report.ok
    assert "images present (not opened)" in format_report(report)


def test_long_lists_are_capped_with_a_total(tmp_path: Path) -> None:
    expected = build_dataset(tmp_path, "ucf101")
    for path in expected.paths["train"]:
        (expected.image_root / path).unlink()
    report = check_dataset("ucf101", tmp_path, quiet=True)
    text = format_report(report, max_listed=5)
    assert len(report.missing) == 12
    assert "missing images (12):" in text and "... and 7 more" in text


def test_missing_split_file_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    report = check_dataset("caltech101", tmp_path, quiet=True)
    assert not report.ok
    assert len(report.problems) == 1
    assert str(tmp_path / "caltech-101" / "split_zhou_Caltech101.json") in report.problems[0]
    assert "not found" in format_report(report)


def test_all_split_file_problems_are_collected(tmp_path: Path) -> None:
    build_dataset(tmp_path, "food101")
    path = tmp_path / "food-101" / "split_zhou_Food101.json"
    content = json.loads(path.read_text())
    content["train"][0][2] = "apple pie"  # label 0 now has two names
    content["val"][1] = ["x.jpg", 1]
    content["test"][2][1] = 0  # "waffles" now has two labels
    path.write_text(json.dumps(content))
    report = check_dataset("food101", tmp_path, quiet=True)
    assert len(report.problems) == 3
    assert all(p.startswith(f"{path}: ") for p in report.problems)
    assert any("val[1]: expected a 3-item list" in p for p in report.problems)
    # One message per inconsistent label or name, however many items repeat it.
    assert any("label 0 has 3 class names: 'apple pie' (1 item, first at train[0]), 'apple_pie' (8 items" in p
               for p in report.problems)  # fmt: skip
    assert any(
        "class 'waffles' has 2 labels: 2 (" in p and "0 (1 item, first at test[2])" in p
        for p in report.problems
    )


def test_custom_folder_check_does_not_save_a_split(tmp_path: Path) -> None:
    for name in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / "imgs" / name / f"{i}.png")
    (tmp_path / "imgs" / "b" / "2.png").write_bytes(b"not a png")
    report = check_dataset("folder", tmp_path / "imgs", quiet=True)
    assert not (tmp_path / "imgs" / "split.json").exists()
    assert [p.name for p, _ in report.unreadable] == ["2.png"]
    assert report.num_classes == 2 and sum(report.counts.values()) == 6


def test_custom_csv_problems_are_listed(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path,label\n,a\nx.jpg,\n")
    report = check_dataset("csv", tmp_path / "l.csv", quiet=True)
    assert len(report.problems) == 2 and "line 2" in report.problems[0] and "line 3" in report.problems[1]


def test_unknown_name_still_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        check_dataset("nope", tmp_path, quiet=True)


def test_image_dataset_yields_tensor_and_label(bench_root) -> None:
    root, _ = bench_root
    splits = load_dataset("imagenet", root)
    dataset = ImageDataset(splits.test, splits.image_root)
    image, label = dataset[3]
    assert len(dataset) == 10
    assert (
        isinstance(image, torch.Tensor)
        and image.shape == (3, 8, 8)
        and 0.0 <= image.min() <= image.max() <= 1.0
    )
    assert label == splits.test[3].label == 1
    flipped = ImageDataset(splits.test, splits.image_root, transform=lambda im: torch.tensor(im.size))
    assert flipped[0][0].tolist() == [8, 8]


def test_image_dataset_names_missing_and_corrupt_files(tmp_path: Path) -> None:
    expected = build_dataset(tmp_path, "dtd")
    splits = load_dataset("dtd", tmp_path)
    gone = splits.abspath(splits.train[0])
    gone.unlink()
    bad = splits.abspath(splits.train[1])
    bad.write_bytes(b"nope")
    dataset = ImageDataset(splits.train, expected.image_root)
    with pytest.raises(DataError, match=rf"image {gone} not found") as missing:
        dataset[0]
    with pytest.raises(DataError, match=rf"cannot read image {bad}") as unreadable:
        dataset[1]
    # The hint names the CLI command first (most users meet this in `vladapt train/eval`), then the API.
    for err in (missing, unreadable):
        assert "`vladapt data check --dataset NAME --root ROOT` (Python: vladapt.data.check_dataset())" in str(err.value)
