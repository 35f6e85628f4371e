"""Image paths from split files, item lists and few-shot caches may not leave the image root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from datafixtures import build_dataset, write_image

from vladapt.data import check_dataset, fewshot_splits, format_report, load_dataset
from vladapt.data.base import DatasetSplits, Datum, register_dataset, unsafe_path_reason
from vladapt.errors import DataError

ESCAPES = ["../outside/evil.jpg", "/etc/hostname", "../../etc/hostname", "a/../../b.jpg", "C:/x.jpg",
           "..\\..\\secret.jpg", "//server/share/x.jpg"]  # fmt: skip


@pytest.mark.parametrize("path", ESCAPES)
def test_escaping_paths_are_unsafe(path: str) -> None:
    assert unsafe_path_reason(path) is not None


@pytest.mark.parametrize("path", ["a.jpg", "cls/a.jpg", "./cls/a.jpg", "cls/../other/a.jpg", "a..b.jpg", "..a/b.jpg",
                                  pytest.param("a:b/x.jpg", marks=pytest.mark.skipif(os.name == "nt", reason="a drive on Windows"))])
def test_paths_inside_the_root_are_safe(path: str) -> None:
    assert unsafe_path_reason(path) is None


def _plant_outside(tmp_path: Path) -> Path:
    """An image outside every dataset root, which a bad path could otherwise read."""
    return write_image(tmp_path / "outside" / "evil.jpg")


def test_split_file_paths_outside_the_root_are_refused(tmp_path: Path) -> None:
    _plant_outside(tmp_path)
    root = tmp_path / "data"
    build_dataset(root, "dtd")
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    content = json.loads(split.read_text())
    label, name = content["train"][0][1], content["train"][0][2]
    # dtd/images/../../../outside/evil.jpg is tmp_path/outside/evil.jpg: a real, readable image.
    content["train"][0][0] = "../../../outside/evil.jpg"
    content["val"][1][0] = "/etc/hostname"
    content["test"].append(["../../etc/hostname", label, name])
    split.write_text(json.dumps(content))
    with pytest.raises(DataError) as err:
        load_dataset("dtd", root)
    message = str(err.value)
    assert message.startswith(f"{split}: 3 problem(s):")
    assert "train[0]: path '../../../outside/evil.jpg' leaves the image root" in message
    assert "val[1]: path '/etc/hostname' is an absolute path" in message
    assert f"test[{len(content['test']) - 1}]: path '../../etc/hostname' leaves the image root" in message
    report = check_dataset("dtd", root, quiet=True)
    assert not report.ok and len(report.problems) == 3
    assert all(p.startswith(f"{split}: ") for p in report.problems)
    assert report.checked_images == 0  # nothing outside the root was opened


def test_data_check_cli_reports_escaping_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vladapt.cli import main

    build_dataset(tmp_path, "eurosat")
    split = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    content = json.loads(split.read_text())
    content["test"][0][0] = "../../etc/hostname"
    split.write_text(json.dumps(content))
    assert main(["data", "check", "--dataset", "eurosat", "--root", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "test[0]: path '../../etc/hostname' leaves the image root" in out and "FAILED" in out


def test_csv_and_json_lists_refuse_paths_outside(tmp_path: Path) -> None:
    _plant_outside(tmp_path)
    lists = tmp_path / "lists"
    write_image(lists / "a" / "1.jpg")
    (lists / "l.csv").write_text("path,label\na/1.jpg,a\n../outside/evil.jpg,b\n/etc/hostname,b\n")
    with pytest.raises(DataError) as err:
        load_dataset("csv", lists / "l.csv")
    message = str(err.value)
    assert str(lists / "l.csv") in message
    assert "line 3: path '../outside/evil.jpg' leaves the image root" in message
    assert "line 4: path '/etc/hostname' is an absolute path" in message
    assert not (lists / "l.split.json").exists()
    (lists / "l.json").write_text(json.dumps([["a/1.jpg", "a"], {"path": "../../etc/hostname", "label": "b"}]))
    with pytest.raises(DataError, match=r"entry 1: path '\.\./\.\./etc/hostname' leaves the image root"):
        load_dataset("json", lists / "l.json")


def test_custom_split_files_refuse_paths_outside(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        for i in range(3):
            write_image(folder / cls / f"{i}.png")
    # A ready split file given as a JSON dataset ...
    ready = {"train": [["../outside/evil.jpg", 0, "a"]], "val": [], "test": [["a/0.png", 0, "a"]]}
    (folder / "ready.json").write_text(json.dumps(ready))
    with pytest.raises(DataError, match=r"ready\.json: 1 problem.*\n  - train\[0\]: path '\.\./outside/evil\.jpg'"):
        load_dataset("json", folder / "ready.json")
    # ... and a saved split of an image folder.
    load_dataset("folder", folder)
    saved = folder / "split.json"
    content = json.loads(saved.read_text())
    content["test"][0][0] = "/etc/hostname"
    saved.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"split\.json: 1 problem.*\n  - test\[0\]: path '/etc/hostname' is an absolute"):
        load_dataset("folder", folder)


def test_fewshot_cache_paths_outside_are_refused(tmp_path: Path) -> None:
    build_dataset(tmp_path, "eurosat")
    splits = load_dataset("eurosat", tmp_path)
    cache_dir = tmp_path / "cache"
    fewshot_splits(splits, 1, seed=1, cache_dir=cache_dir)
    cache = cache_dir / "shot_1-seed_1.json"
    raw = json.loads(cache.read_text())
    raw["train"][0][0] = "../../../etc/hostname"
    cache.write_text(json.dumps(raw))
    with pytest.raises(DataError) as err:
        fewshot_splits(splits, 1, seed=1, cache_dir=cache_dir)
    assert str(cache) in str(err.value)
    assert "train[0]: path '../../../etc/hostname' leaves the image root" in str(err.value)


def test_fgvc_image_ids_outside_are_refused(tmp_path: Path) -> None:
    build_dataset(tmp_path, "fgvc_aircraft")
    listing = tmp_path / "fgvc_aircraft" / "images_variant_test.txt"
    lines = listing.read_text().splitlines()
    variant = lines[0].partition(" ")[2]
    listing.write_text("\n".join([f"../../../etc/hostname {variant}", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"images_variant_test\.txt line 1: image id '\.\./\.\./\.\./etc/hostname' leaves"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_any_registered_reader_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vladapt.data import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the registration ends with the test

    @register_dataset("test_paths_rogue_reader")
    def rogue(root: Path) -> DatasetSplits:
        items = [Datum("ok.jpg", 0, "a"), Datum("../../etc/hostname", 0, "a")]
        return DatasetSplits("rogue", root, items, [], [Datum("/etc/passwd", 0, "a")], ["a"])

    with pytest.raises(DataError) as err:
        load_dataset("test_paths_rogue_reader", tmp_path)
    message = str(err.value)
    assert "dataset 'rogue'" in message and "2 image path(s) outside its image root" in message
    assert "train[1]: path '../../etc/hostname'" in message and "test[0]: path '/etc/passwd'" in message
    report = check_dataset("test_paths_rogue_reader", tmp_path, quiet=True)
    assert not report.ok and "outside its image root" in format_report(report)
