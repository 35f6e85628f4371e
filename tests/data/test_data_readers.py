"""Readers of the 15 benchmark datasets on generated layouts, split-file validation, the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datafixtures import Expected, build_benchmark_root, build_dataset, shared_splits_dir, write_image

from vladapt.data import Datum, list_datasets, load_dataset
from vladapt.data.splitfile import read_split_file
from vladapt.errors import ConfigError, DataError

BENCHMARKS = [
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
    "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expected]]:
    return build_benchmark_root(tmp_path_factory.mktemp("data_root"))


def test_registry_lists_every_benchmark_and_custom_reader() -> None:
    assert set(list_datasets()) == {*BENCHMARKS, "folder", "csv", "json", "synth_shapes", "synth_textures", "synth_counts"}


def test_unknown_dataset_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'dtdd'.*known datasets: .*\bdtd\b.*\beurosat\b"):
        load_dataset("dtdd", tmp_path)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_reader_matches_layout(name: str, bench_root) -> None:
    root, expected_by_name = bench_root
    expected = expected_by_name[name]
    splits = load_dataset(name, root)
    assert splits.name == name
    assert splits.image_root == expected.image_root
    assert splits.classnames == expected.classnames
    for split in ("train", "val", "test"):
        items = splits.split(split)
        assert [d.path for d in items] == expected.paths[split], split
        assert [d.label for d in items] == expected.labels[split], split
        assert all(d.classname == splits.classnames[d.label] for d in items)
        assert all(splits.abspath(d).is_file() for d in items)


@pytest.mark.parametrize(
    ("name", "cache_dir"),
    [("dtd", "dtd/split_fewshot"), ("stanford_cars", "stanford_cars/split_fewshot"),
     ("imagenet", "imagenet/split_fewshot"), ("fgvc_aircraft", "fgvc_aircraft/split_fewshot"),
     ("imagenet_a", None)],
)  # fmt: skip
def test_fewshot_cache_lives_in_the_dataset_folder(name: str, cache_dir: str | None, bench_root) -> None:
    root, _ = bench_root
    splits = load_dataset(name, root)
    assert splits.fewshot_cache_dir == (root / cache_dir if cache_dir else None)


def test_imagenet_variants_are_test_only_with_their_own_class_lists(bench_root) -> None:
    root, _ = bench_root
    a = load_dataset("imagenet_a", root)
    assert a.train == [] and a.val == [] and a.num_classes == 3  # the wnid folders present, not all 5
    assert a.classnames == ["goldfish", "great white shark", "hammerhead shark"]
    v2 = load_dataset("imagenetv2", root)
    # Folder "0" is the first line of classnames.txt, whatever its wnid.
    assert v2.test[0] == Datum("0/img_000.jpeg", 0, "goldfish")


def test_missing_split_file_names_file_and_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        load_dataset("eurosat", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "eurosat" / "split_zhou_EuroSAT.json") in message
    assert "official" in message and str(tmp_path / "eurosat" / "2750") in message


def _write_split(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def test_split_file_reports_every_bad_entry_with_its_index(tmp_path: Path) -> None:
    path = _write_split(
        tmp_path,
        {
            "train": [["a/1.jpg", 0, "a"], ["a/2.jpg", 0], "b/1.jpg", ["b/2.jpg", True, "b"]],
            "val": [["a/3.jpg", -1, "a"], ["", 0, "a"]],
        },
    )
    with pytest.raises(DataError) as err:
        load_dataset("dtd", tmp_path)
    message = str(err.value)
    assert str(path) in message
    for needle in ["train[1]: expected a 3-item list", "train[2]: expected a 3-item list",
                   "train[3]: label must be an integer", "val[0]: label must be", "val[1]: path must be",
                   "missing key 'test'"]:  # fmt: skip
        assert needle in message
    assert err.value.problems and len(err.value.problems) == 6


def test_split_file_label_and_classname_must_agree(tmp_path: Path) -> None:
    _write_split(
        tmp_path,
        {
            "train": [["a/1.jpg", 0, "a"], ["b/1.jpg", 1, "b"], ["c/1.jpg", 4, "c"]],
            "val": [["a/2.jpg", 0, "alpha"]],
            "test": [["b/2.jpg", 2, "b"]],
        },
    )
    with pytest.raises(DataError) as err:
        load_dataset("dtd", tmp_path)
    message = str(err.value)
    assert (
        "label 0 has 2 class names: 'a' (1 item, first at train[0]), 'alpha' (1 item, first at val[0])"
        in message
    )
    assert "class 'b' has 2 labels: 1 (1 item, first at train[1]), 2 (1 item, first at test[0])" in message
    assert len(err.value.problems) == 3
    assert "labels must be 0..4 without gaps; no item has label 3" in message


def test_split_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_dataset("dtd", tmp_path)


def test_fgvc_unknown_variant_names_list_file_and_line(tmp_path: Path) -> None:
    build_dataset(tmp_path, "fgvc_aircraft")
    listing = tmp_path / "fgvc_aircraft" / "images_variant_val.txt"
    listing.write_text(listing.read_text() + "1234567 Boeing 999\n0000001\n")
    with pytest.raises(DataError) as err:
        load_dataset("fgvc_aircraft", tmp_path)
    message = str(err.value)
    assert "images_variant_val.txt line 9: variant 'Boeing 999' is not in variants.txt" in message
    assert "images_variant_val.txt line 10: expected '<image id> <variant>'" in message


def test_fgvc_without_archive_explains_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"variants\.txt not found.*2013b archive"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_imagenet_variant_with_unknown_wnid(tmp_path: Path) -> None:
    build_dataset(tmp_path, "imagenet_r")
    (tmp_path / "imagenet-rendition" / "imagenet-r" / "n99999999").mkdir()
    with pytest.raises(DataError, match=r"n99999999 has no entry in .*classnames\.txt"):
        load_dataset("imagenet_r", tmp_path)


def test_imagenet_val_class_without_train_folder(tmp_path: Path) -> None:
    build_dataset(tmp_path, "imagenet")
    write_image(tmp_path / "imagenet" / "images" / "val" / "n01440000" / "x.JPEG")
    with pytest.raises(DataError, match=r"val/n01440000 has no matching folder"):
        load_dataset("imagenet", tmp_path)


def test_imagenetv2_missing_class_folder(tmp_path: Path) -> None:
    build_dataset(tmp_path, "imagenetv2")
    folder = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "3"
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    with pytest.raises(DataError, match=re.escape(f"class folder {folder} not found")):
        load_dataset("imagenetv2", tmp_path)


def test_classnames_txt_errors_name_the_line(tmp_path: Path) -> None:
    build_dataset(tmp_path, "imagenet_sketch")
    path = tmp_path / "imagenet-sketch" / "classnames.txt"
    path.write_text(path.read_text() + "n01443537 goldfish again\nn02000000\n")
    with pytest.raises(DataError) as err:
        load_dataset("imagenet_sketch", tmp_path)
    assert "line 6: wnid n01443537 is listed twice" in str(err.value)
    assert "line 7: expected '<wnid> <class name>'" in str(err.value)


# The official files' sizes and class counts (shared/data/coop-splits/README.md) and the naming
# conventions of spec/METHODS.md §5.2, which readers must keep unchanged.
OFFICIAL = {
    "split_zhou_Caltech101.json": (100, (4128, 1649, 2465), ["face", "leopard", "motorbike", "airplane"]),
    "split_zhou_DescribableTextures.json": (47, (2820, 1128, 1692), ["banded", "zigzagged"]),
    "split_zhou_EuroSAT.json": (
        10,
        (13500, 5400, 8100),
        ["Annual Crop Land", "Highway or Road", "Sea or Lake"],
    ),
    "split_zhou_OxfordFlowers.json": (102, (4093, 1633, 2463), ["passion flower", "blackberry lily"]),
    "split_zhou_OxfordPets.json": (37, (2944, 736, 3669), ["abyssinian", "yorkshire_terrier"]),
    "split_zhou_StanfordCars.json": (196, (6509, 1635, 8041), ["2012 Audi TTS Coupe", "2007 BMW X5 SUV"]),
    "split_zhou_UCF101.json": (101, (7639, 1898, 3783), ["Apply_Eye_Makeup", "Yo_Yo"]),
}


@pytest.mark.parametrize("filename", sorted(OFFICIAL))
def test_official_split_files_parse_with_names_unchanged(filename: str) -> None:
    shared_splits = shared_splits_dir()
    num_classes, sizes, some_names = OFFICIAL[filename]
    parts, classnames = read_split_file(shared_splits / filename)
    assert len(classnames) == num_classes
    assert tuple(len(parts[s]) for s in ("train", "val", "test")) == sizes
    assert set(some_names) <= set(classnames)
    assert "BACKGROUND_Google" not in classnames and "Faces_easy" not in classnames


def test_reader_loads_an_official_split_file(tmp_path: Path) -> None:
    shared_splits = shared_splits_dir()
    # A symlink keeps the official file out of the project while exercising the real reader path.
    (tmp_path / "oxford_pets").mkdir()
    (tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").symlink_to(
        shared_splits / "split_zhou_OxfordPets.json"
    )
    splits = load_dataset("oxford_pets", tmp_path)
    assert splits.train[0] == Datum("Abyssinian_122.jpg", 0, "abyssinian")
    assert splits.abspath(splits.train[0]) == tmp_path / "oxford_pets" / "images" / "Abyssinian_122.jpg"


@pytest.mark.parametrize("name", ["synth_shapes", "synth_textures", "synth_counts"])
def test_missing_synthetic_data_says_how_to_generate_it(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(name, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "official" not in message and "DATASETS.md" not in message
    assert f"`vladapt demo --out OUT --datasets {name} --methods zeroshot` writes it to OUT/data" in message
    assert f"vladapt.synth.datasets.write_dataset({name!r}, {str(tmp_path)!r})" in message


def test_synthetic_hint_is_what_generates_a_loadable_dataset(tmp_path: Path) -> None:
    from vladapt.synth.datasets import write_dataset

    write_dataset("synth_textures", tmp_path, per_class=(2, 1, 1))
    splits = load_dataset("synth_textures", tmp_path)
    assert len(splits.train) == 2 * splits.num_classes and len(splits.test) == splits.num_classes
