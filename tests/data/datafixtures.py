"""Generated miniature copies of every benchmark dataset layout (spec/METHODS.md §5.1).

Each builder writes tiny 8x8 images and the dataset's split/metadata files under a data root and
returns what a correct reader must produce, written down independently of the library's readers.

A plain helper module rather than a conftest.py: tests elsewhere import names from the top-level
conftest, which a second conftest module in this folder would shadow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

SHARED_SPLITS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coop-splits"


def write_image(path: Path, shade: int = 0) -> Path:
    """Write an 8x8 RGB image; the format follows the suffix (.jpg/.jpeg/.png, any case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade % 256, 40, 200)).save(path)
    return path


@dataclass
class Expected:
    """What loading a generated dataset must give: image root, class names and per-split paths."""

    image_root: Path
    classnames: list[str]
    paths: dict[str, list[str]]  # split -> relative paths in reader order
    labels: dict[str, list[int]]


# name -> (folder, image dir, split file, class names, path of image i of class c in split s)
JSON_LAYOUTS: dict[str, tuple[str, str, str, list[str], Callable[[int, str, int], str]]] = {
    "caltech101": (
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        ["face", "leopard", "yin_yang"],
        lambda c, s, i: f"{['Faces', 'Leopards', 'yin_yang'][c]}/image_{s}{i:04d}.jpg",
    ),
    "oxford_pets": (
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        ["abyssinian", "great_pyrenees", "yorkshire_terrier"],
        lambda c, s, i: f"{['Abyssinian', 'great_pyrenees', 'yorkshire_terrier'][c]}_{s}{i}.jpg",
    ),
    "stanford_cars": (
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        ["2012 Audi TTS Coupe", "2007 BMW X5 SUV", "2012 Tesla Model S Sedan"],
        lambda c, s, i: f"{'cars_test' if s == 'test' else 'cars_train'}/{c}{s}{i:04d}.jpg",
    ),
    "oxford_flowers": (
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        ["pink primrose", "passion flower", "blackberry lily"],
        lambda c, s, i: f"image_{c}{s}{i:04d}.jpg",
    ),
    "food101": (
        "food-101",
        "images",
        "split_zhou_Food101.json",
        ["apple_pie", "baby_back_ribs", "waffles"],
        lambda c, s, i: f"{['apple_pie', 'baby_back_ribs', 'waffles'][c]}/{s}{i}.jpg",
    ),
    "sun397": (
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        ["abbey", "indoor airport_terminal", "outdoor apartment_building"],
        lambda c, s, i: (
            f"{['a/abbey', 'a/airport_terminal', 'a/apartment_building/outdoor'][c]}/sun_{s}{i}.jpg"
        ),
    ),
    "dtd": (
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        ["banded", "blotchy", "zigzagged"],
        lambda c, s, i: f"{['banded', 'blotchy', 'zigzagged'][c]}/{s}_{i:04d}.jpg",
    ),
    "eurosat": (
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        ["Annual Crop Land", "Highway or Road", "Sea or Lake"],
        lambda c, s, i: f"{['AnnualCrop', 'Highway', 'SeaLake'][c]}/{s}_{i}.jpg",
    ),
    "ucf101": (
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        ["Apply_Eye_Makeup", "Band_Marching", "Yo_Yo"],
        lambda c, s, i: f"{['Apply_Eye_Makeup', 'Band_Marching', 'Yo_Yo'][c]}/v_{s}_g{i:02d}_c01.jpg",
    ),
}

# Items per class in each split of the generated split files.
SPLIT_SIZES = {"train": 4, "val": 2, "test": 3}


def build_json_dataset(root: Path, name: str) -> Expected:
    folder, image_dir, split_file, classnames, path_of = JSON_LAYOUTS[name]
    dataset_dir = root / folder
    image_root = dataset_dir / image_dir if image_dir else dataset_dir
    content: dict[str, list[list[object]]] = {}
    for split, size in SPLIT_SIZES.items():
        # Interleave classes so that "first appearance order" and "label order" are both exercised.
        content[split] = [
            [path_of(c, split, i), c, classnames[c]] for i in range(size) for c in range(len(classnames))
        ]
        for rel, label, _ in content[split]:
            write_image(image_root / str(rel), shade=int(label) * 60)
    (dataset_dir / split_file).write_text(json.dumps(content))
    return Expected(
        image_root,
        classnames,
        {s: [str(e[0]) for e in entries] for s, entries in content.items()},
        {s: [int(e[1]) for e in entries] for s, entries in content.items()},  # type: ignore[arg-type]
    )


FGVC_VARIANTS = ["707-320", "A300B4", "F/A-18", "Cessna 172"]  # file order, deliberately unsorted


def build_fgvc(root: Path) -> Expected:
    dataset_dir = root / "fgvc_aircraft"
    dataset_dir.mkdir(parents=True)
    (dataset_dir / "variants.txt").write_text("\n".join(FGVC_VARIANTS) + "\n")
    paths: dict[str, list[str]] = {}
    labels: dict[str, list[int]] = {}
    image_id = 1000000
    for split, size in SPLIT_SIZES.items():
        lines = []
        paths[split], labels[split] = [], []
        for _ in range(size):
            for label, variant in enumerate(FGVC_VARIANTS):
                image_id += 1
                lines.append(f"{image_id} {variant}")
                write_image(dataset_dir / "images" / f"{image_id}.jpg", shade=label * 50)
                paths[split].append(f"{image_id}.jpg")
                labels[split].append(label)
        (dataset_dir / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return Expected(dataset_dir / "images", FGVC_VARIANTS, paths, labels)


# wnid -> CLIP-style name; the classnames.txt order is deliberately not the wnid order.
IMAGENET_CLASSES = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
}
CLASSNAMES_TXT = "".join(
    f"{w} {IMAGENET_CLASSES[w]}\n" for w in ["n01443537", "n01440764", "n01484850", "n01491361", "n01494475"]
)


def _wnid_tree(
    image_root: Path, wnids: list[str], prefix: str, count: int, suffix: str
) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        # Written in reverse so that a reader relying on creation order would get them unsorted.
        names = [f"img_{i:03d}{suffix}" for i in reversed(range(count))]
        for name in names:
            write_image(image_root / prefix / wnid / name, shade=label * 40)
        paths += [f"{prefix}{wnid}/{name}" for name in sorted(names)]
        labels += [label] * count
    return paths, labels


def build_imagenet(root: Path) -> Expected:
    dataset_dir = root / "imagenet"
    image_root = dataset_dir / "images"
    wnids = sorted(IMAGENET_CLASSES)
    dataset_dir.mkdir(parents=True)
    (dataset_dir / "classnames.txt").write_text(CLASSNAMES_TXT)
    train = _wnid_tree(image_root, wnids, "train/", 3, ".JPEG")
    test = _wnid_tree(image_root, wnids, "val/", 2, ".JPEG")
    return Expected(
        image_root,
        [IMAGENET_CLASSES[w] for w in wnids],
        {"train": train[0], "val": [], "test": test[0]},
        {"train": train[1], "val": [], "test": test[1]},
    )


def build_imagenetv2(root: Path) -> Expected:
    dataset_dir = root / "imagenetv2"
    image_root = dataset_dir / "imagenetv2-matched-frequency-format-val"
    dataset_dir.mkdir(parents=True)
    (dataset_dir / "classnames.txt").write_text(CLASSNAMES_TXT)
    order = ["n01443537", "n01440764", "n01484850", "n01491361", "n01494475"]  # classnames.txt order
    paths, labels = _wnid_tree(image_root, [str(i) for i in range(len(order))], "", 2, ".jpeg")
    return Expected(
        image_root,
        [IMAGENET_CLASSES[w] for w in order],
        {"train": [], "val": [], "test": paths},
        {"train": [], "val": [], "test": labels},
    )


# name -> (folder, image dir, wnids present)
WNID_TEST_SETS = {
    "imagenet_sketch": ("imagenet-sketch", "images", sorted(IMAGENET_CLASSES)),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", ["n01494475", "n01443537", "n01484850"]),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", ["n01491361", "n01440764"]),
}


def build_wnid_test_set(root: Path, name: str) -> Expected:
    folder, image_dir, wnids = WNID_TEST_SETS[name]
    dataset_dir = root / folder
    image_root = dataset_dir / image_dir
    image_root.mkdir(parents=True)
    (dataset_dir / "classnames.txt").write_text(CLASSNAMES_TXT)
    (image_root / "README.txt").write_text("not a class folder\n")
    paths, labels = _wnid_tree(image_root, sorted(wnids), "", 2, ".jpg")
    return Expected(
        image_root,
        [IMAGENET_CLASSES[w] for w in sorted(wnids)],
        {"train": [], "val": [], "test": paths},
        {"train": [], "val": [], "test": labels},
    )


def build_dataset(root: Path, name: str) -> Expected:
    """Build the miniature of benchmark dataset ``name`` under the data root ``root``."""
    if name in JSON_LAYOUTS:
        return build_json_dataset(root, name)
    if name in WNID_TEST_SETS:
        return build_wnid_test_set(root, name)
    builders = {"fgvc_aircraft": build_fgvc, "imagenet": build_imagenet, "imagenetv2": build_imagenetv2}
    return builders[name](root)


BENCHMARK_DATASETS = [*JSON_LAYOUTS, "fgvc_aircraft", "imagenet", "imagenetv2", *WNID_TEST_SETS]


def build_benchmark_root(root: Path) -> tuple[Path, dict[str, Expected]]:
    """All 15 miniature benchmark datasets under ``root``, with what each reader must return."""
    return root, {name: build_dataset(root, name) for name in BENCHMARK_DATASETS}


def shared_splits_dir() -> Path:
    """The official split files shipped next to the repository; skips the test when they are absent."""
    if not SHARED_SPLITS.is_dir():
        pytest.skip(f"official split files not available (looked in {SHARED_SPLITS})")
    return SHARED_SPLITS
