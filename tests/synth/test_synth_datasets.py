"""Downstream dataset writers: CoOp split layout, manifest, idempotence, atomicity, image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vladapt.errors import ConfigError, DataError
from vladapt.synth.captions import NUMBER_WORDS
from vladapt.synth.datasets import DATASETS, write_all, write_dataset, write_image_folder
from vladapt.synth.scene import BACKGROUNDS, COLORS, SHAPES

SMALL = (2, 1, 1)


def _read_split(folder: Path, name: str) -> dict[str, list[list[object]]]:
    return json.loads((folder / f"split_zhou_{DATASETS[name].split_name}.json").read_text())


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_split_file_is_valid_and_complete(tmp_path: Path, name: str) -> None:
    folder = write_dataset(name, tmp_path, seed=3, per_class=SMALL)
    assert folder == tmp_path / name
    split = _read_split(folder, name)
    assert set(split) == {"train", "val", "test"}
    classnames = sorted({c for items in split.values() for _, _, c in items})
    assert classnames == DATASETS[name].classnames
    assert len(classnames) % 2 == 0 and 10 <= len(classnames) <= 20  # equal base/new halves
    for split_name, per_class in zip(("train", "val", "test"), SMALL):
        items = split[split_name]
        assert len(items) == per_class * len(classnames)
        for path, label, classname in items:
            assert isinstance(path, str) and isinstance(label, int)
            assert classnames[label] == classname
            assert path.split("/")[0] == classname.replace(" ", "_")
            with Image.open(folder / "images" / path) as image:
                assert image.mode == "RGB" and image.size == (64, 64)
    all_paths = [p for items in split.values() for p, _, _ in items]
    assert len(set(all_paths)) == len(all_paths)
    assert len(list((folder / "images").rglob("*.png"))) == len(all_paths)
    # the dataset is registered with the readers like the real benchmark datasets
    from vladapt.data import check_dataset, load_dataset

    loaded = load_dataset(name, tmp_path)
    assert loaded.classnames == classnames and len(loaded.test) == len(split["test"])
    assert check_dataset(name, tmp_path, quiet=True).ok


def test_class_names_match_the_scenes_that_are_drawn() -> None:
    rng = np.random.default_rng(0)
    words_to_count = {word: n for n, word in NUMBER_WORDS.items()}
    for name, spec in DATASETS.items():
        for classname in spec.classnames:
            for _ in range(5):
                scene = spec.scene(classname, rng)
                words = classname.split()
                if name == "synth_shapes":
                    assert (scene.color, scene.shape) == (words[0], words[1])
                    assert words[0] in COLORS and words[1] in SHAPES
                elif name == "synth_textures":
                    assert scene.background == classname and classname in BACKGROUNDS
                else:
                    assert scene.count == words_to_count[words[0]]
                    assert scene.shape == words[1].removesuffix("s")


def test_manifest_and_description_bank(tmp_path: Path) -> None:
    folder = write_dataset("synth_shapes", tmp_path, seed=5, per_class=SMALL)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["per_class"] == {"train": 2, "val": 1, "test": 1}
    assert manifest["generator_version"] and manifest["image_size"] == 64
    assert manifest["style"]["outline"] == 1.0
    bank = json.loads((folder / "descriptions.json").read_text())
    assert sorted(bank) == DATASETS["synth_shapes"].classnames
    assert all(len(set(sentences)) >= 8 for sentences in bank.values())


def test_writing_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    first = write_dataset("synth_counts", tmp_path / "a", seed=1, per_class=SMALL)
    again = write_dataset("synth_counts", tmp_path / "b", seed=1, per_class=SMALL)
    some_image = Path("images/two_stars/train_0001.png")
    assert (first / some_image).read_bytes() == (again / some_image).read_bytes()

    stamp = (first / some_image).stat().st_mtime_ns
    assert write_dataset("synth_counts", tmp_path / "a", seed=1, per_class=SMALL) == first
    assert (first / some_image).stat().st_mtime_ns == stamp

    # A different configuration replaces the stale copy in place and leaves no temp folders.
    write_dataset("synth_counts", tmp_path / "a", seed=2, per_class=(1, 1, 1))
    assert json.loads((first / "manifest.json").read_text())["seed"] == 2
    assert len(_read_split(first, "synth_counts")["train"]) == len(DATASETS["synth_counts"].classnames)
    assert not (first / "images/two_stars/train_0001.png").exists()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["synth_counts"]


def test_incomplete_or_foreign_folders_are_handled(tmp_path: Path) -> None:
    foreign = tmp_path / "synth_textures"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not written by vladapt.synth"):
        write_dataset("synth_textures", tmp_path, per_class=SMALL)
    assert (foreign / "mine.txt").read_text() == "keep me"

    # A dataset whose manifest no longer parses is ours but stale: it is rebuilt.
    folder = write_dataset("synth_shapes", tmp_path, per_class=SMALL)
    (folder / "manifest.json").write_text("{truncated")
    write_dataset("synth_shapes", tmp_path, per_class=SMALL)
    assert json.loads((folder / "manifest.json").read_text())["dataset"] == "synth_shapes"


def test_write_all_and_bad_arguments(tmp_path: Path) -> None:
    written = write_all(tmp_path, per_class=(1, 0, 1))
    assert set(written) == set(DATASETS)
    for name, folder in written.items():
        split = _read_split(folder, name)
        assert split["val"] == [] and len(split["test"]) == len(DATASETS[name].classnames)
    with pytest.raises(ConfigError, match="synth_shapes"):
        write_dataset("imagenet", tmp_path)
    with pytest.raises(ConfigError, match="per_class"):
        write_dataset("synth_shapes", tmp_path, per_class=(1, 2))


def test_write_image_folder_layout(tmp_path: Path) -> None:
    classes = ["red_circle", "blue square"]
    names = write_image_folder(tmp_path / "folder", classes=classes, per_class=3, seed=1)
    assert names == ["blue_square", "red_circle"]
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == names
    for name in names:
        files = sorted((tmp_path / "folder" / name).glob("*.png"))
        assert len(files) == 3
        pixels = np.asarray(Image.open(files[0]))
        assert pixels.shape == (64, 64, 3)
        # Clean style: the class colour appears exactly.
        color = COLORS[name.split("_")[0]]
        assert (pixels == np.array(color, np.uint8)).all(axis=-1).sum() > 20
    assert len(write_image_folder(tmp_path / "default", per_class=1)) == 4
    with pytest.raises(ConfigError, match="color"):
        write_image_folder(tmp_path / "bad", classes=["red blob"])
