"""Custom data: image folder, CSV, JSON list, and the saved, reused stratified split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datafixtures import write_image

from vladapt.data import Datum, load_custom, load_dataset
from vladapt.data.custom import split_sizes, stratified_split
from vladapt.errors import ConfigError, DataError

# class -> number of images; "cat" has 10 so the 50/20/30 split is exact, "owl" a single image.
CLASS_SIZES = {"dog": 7, "cat": 10, "owl": 1, "ant": 3}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    for classname, count in CLASS_SIZES.items():
        for i in range(count):
            write_image(root / classname / f"{i:02d}.png", shade=i)
    return root


def _all(splits) -> list[Datum]:
    return splits.train + splits.val + splits.test


def test_folder_classes_are_sorted_and_every_image_lands_in_one_split(image_folder: Path) -> None:
    splits = load_dataset("folder", image_folder)
    assert splits.name == "pets" and splits.image_root == image_folder
    assert splits.classnames == ["ant", "cat", "dog", "owl"]
    items = _all(splits)
    assert sorted(d.path for d in items) == sorted(
        f"{c}/{i:02d}.png" for c, n in CLASS_SIZES.items() for i in range(n)
    )
    assert all(d.label == splits.classnames.index(d.path.split("/")[0]) for d in items)
    per_class = {c: [sum(d.classname == c for d in part) for part in (splits.train, splits.val, splits.test)]
                 for c in CLASS_SIZES}  # fmt: skip
    assert per_class == {"cat": [5, 2, 3], "dog": [4, 1, 2], "ant": [1, 1, 1], "owl": [0, 0, 1]}


def test_split_sizes_keep_a_test_and_a_train_item() -> None:
    ratios = (0.5, 0.2, 0.3)
    assert split_sizes(1, ratios) == (0, 0, 1)
    assert split_sizes(2, ratios) == (1, 0, 1)
    assert split_sizes(10, ratios) == (5, 2, 3)
    assert split_sizes(2, (0.1, 0.45, 0.45)) == (1, 0, 1)
    assert split_sizes(4, (0.8, 0.2, 0.0)) == (3, 1, 0)


def test_split_is_saved_and_reused_by_later_runs(image_folder: Path) -> None:
    first = load_dataset("folder", image_folder, seed=1)
    split_path = image_folder / "split.json"
    saved = json.loads(split_path.read_text())
    assert set(saved) == {"train", "val", "test"}
    assert saved["test"][0] == [first.test[0].path, first.test[0].label, first.test[0].classname]
    # A different seed would shuffle differently; the saved split must win.
    assert stratified_split([(d.path, d.classname) for d in _all(first)], (0.5, 0.2, 0.3), 2) != {
        "train": first.train,
        "val": first.val,
        "test": first.test,
    }
    again = load_dataset("folder", image_folder, seed=2)
    assert (again.train, again.val, again.test) == (first.train, first.val, first.test)


def test_same_seed_gives_same_split_without_saving(image_folder: Path) -> None:
    a = load_custom(image_folder, seed=5, save_split=False)
    b = load_custom(image_folder, seed=5, save_split=False)
    assert not (image_folder / "split.json").exists()
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)


def test_stale_split_is_an_error_not_a_silent_resplit(image_folder: Path) -> None:
    load_dataset("folder", image_folder)
    write_image(image_folder / "cat" / "new.png")
    with pytest.raises(
        DataError,
        match=r"split\.json is out of date: 1 item\(s\) of the data are not in it "
        r"\(e\.g\. cat/new\.png\).*delete",
    ):
        load_dataset("folder", image_folder)
    write_image(image_folder / "bee" / "0.png")
    with pytest.raises(
        DataError, match=r"has classes \['ant', 'cat', 'dog', 'owl'\] but the data has \['ant', 'bee'"
    ):
        load_dataset("folder", image_folder)


def test_explicit_split_file_location(image_folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "splits" / "pets.json"
    splits = load_custom(image_folder, split_file=target)
    assert target.is_file() and not (image_folder / "split.json").exists()
    assert load_custom(image_folder, split_file=target).test == splits.test


def test_folder_ignores_hidden_files_non_images_and_the_fewshot_cache(image_folder: Path) -> None:
    write_image(image_folder / "cat" / ".hidden.png")
    (image_folder / "cat" / "notes.txt").write_text("x")
    (image_folder / "split_fewshot").mkdir()
    (image_folder / "split_fewshot" / "shot_1-seed_1.json").write_text("{}")
    write_image(image_folder / "ant" / "nested" / "deep.JPG")
    splits = load_custom(image_folder, save_split=False)
    paths = {d.path for d in _all(splits)}
    assert "ant/nested/deep.JPG" in paths
    assert not any("hidden" in p or p.endswith(".txt") for p in paths)
    assert splits.classnames == ["ant", "cat", "dog", "owl"]
    assert splits.fewshot_cache_dir == image_folder / "split_fewshot"


def test_empty_class_folder_is_reported(image_folder: Path) -> None:
    (image_folder / "zebra").mkdir()
    with pytest.raises(DataError, match=r"class folder .*zebra holds no images"):
        load_custom(image_folder)


def test_bad_ratios_are_a_config_error(image_folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"ratios must be three fractions .* got \(0\.5, 0\.5, 0\.5\)"):
        load_custom(image_folder, ratios=(0.5, 0.5, 0.5))


def _write_list_images(folder: Path) -> list[tuple[str, str]]:
    rows = [(f"imgs/{c}_{i}.jpg", c) for c in ("red", "blue") for i in range(5)]
    for path, _ in rows:
        write_image(folder / path)
    return rows


def test_csv_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    rows = _write_list_images(tmp_path)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path, label ,note\n" + "".join(f"{p},{c},x\n" for p, c in rows))
    splits = load_dataset("csv", csv_path)
    assert splits.name == "labels" and splits.image_root == tmp_path
    assert splits.classnames == ["blue", "red"]
    assert sorted((d.path, d.classname) for d in _all(splits)) == sorted(rows)
    assert (tmp_path / "labels.split.json").is_file()
    assert splits.fewshot_cache_dir == tmp_path / "split_fewshot" / "labels"
    assert all(splits.abspath(d).is_file() for d in _all(splits))


def test_csv_problems_are_all_reported_with_line_numbers(tmp_path: Path) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("path,label\na.jpg,cat\n,dog\nb.jpg,\na.jpg,cat\n")
    with pytest.raises(DataError) as err:
        load_custom(csv_path)
    message = str(err.value)
    assert str(csv_path) in message
    assert "line 3: needs a non-empty 'path'" in message
    assert "line 4: needs a non-empty 'label'" in message
    assert "line 5: path 'a.jpg' is already listed at line 2" in message


def test_csv_without_required_columns(tmp_path: Path) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("file,class\na.jpg,cat\n")
    with pytest.raises(DataError, match=r"bad\.csv: the header must have columns 'path' and 'label'"):
        load_custom(csv_path)


@pytest.mark.parametrize("form", ["objects", "pairs"])
def test_json_list_forms(form: str, tmp_path: Path) -> None:
    rows = _write_list_images(tmp_path)
    entries = [{"path": p, "label": c} for p, c in rows] if form == "objects" else [[p, c] for p, c in rows]
    list_path = tmp_path / "items.json"
    list_path.write_text(json.dumps(entries))
    splits = load_dataset("json", list_path)
    assert sorted((d.path, d.classname) for d in _all(splits)) == sorted(rows)
    # The saved split is itself loadable as a ready split file.
    ready = load_custom(tmp_path / "items.split.json")
    assert (ready.train, ready.val, ready.test) == (splits.train, splits.val, splits.test)


def test_json_list_with_bad_entries(tmp_path: Path) -> None:
    list_path = tmp_path / "items.json"
    list_path.write_text(
        json.dumps([["a.jpg", "x"], ["b.jpg"], {"path": "c.jpg"}, {"path": "d.jpg", "label": 3}])
    )
    with pytest.raises(DataError) as err:
        load_custom(list_path)
    assert "entry 1: needs a non-empty 'path'" in str(err.value)
    assert "entry 2: needs a non-empty 'label'" in str(err.value)
    assert "entry 3" not in str(err.value)  # an integer label is accepted as the class name "3"


def test_load_custom_rejects_other_paths(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match=r"x\.txt is neither an image folder nor a \.csv or \.json file"):
        load_custom(tmp_path / "x.txt")


def test_load_custom_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"custom data .*nowhere not found"):
        load_custom(tmp_path / "nowhere")
