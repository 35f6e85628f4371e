"""Readers of ImageNet and its four distribution-shift variants (spec/METHODS.md §5.1, §5.7).

All of them are class-per-folder layouts named by WordNet id (ImageNetV2: by label index) plus a copy
of CLIP's ``classnames.txt`` (lines ``"<wnid> <class name>"``). Images inside a class folder are
listed in sorted order so that seeded few-shot draws do not depend on the file system.
"""

from __future__ import annotations

from pathlib import Path

from vladapt.data.base import (
    FEWSHOT_DIRNAME,
    DatasetSplits,
    Datum,
    list_images,
    register_dataset,
    require_dir,
)
from vladapt.data.splitfile import DataProblems
from vladapt.errors import DataError


def read_classnames(path: Path) -> dict[str, str]:
    """Parse ``classnames.txt`` into ``{wnid: class name}`` in file order."""
    if not path.is_file():
        raise DataError(
            f"{path} not found; ImageNet-style datasets need a copy of CLIP's classnames.txt "
            f"(one '<wnid> <class name>' line per class) in {path.parent}"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    names: dict[str, str] = {}
    problems: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip():
            problems.append(f"line {lineno}: expected '<wnid> <class name>', got {line!r}")
        elif wnid in names:
            problems.append(f"line {lineno}: wnid {wnid} is listed twice")
        else:
            names[wnid] = name.strip()
    if problems:
        raise DataProblems(path, problems, "fix the file or replace it with CLIP's classnames.txt")
    return names


def _subfolders(folder: Path) -> list[str]:
    # Files next to the class folders (ImageNet-A's README.txt) are not classes.
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_items(image_root: Path, prefix: str, folders: list[str], classnames: list[str]) -> list[Datum]:
    """Items of ``image_root/prefix/<folders[label]>/*``; ``prefix`` is "" or ends with "/"."""
    return [
        Datum(f"{prefix}{folder}/{file}", label, classnames[label])
        for label, folder in enumerate(folders)
        for file in list_images(image_root / prefix / folder)
    ]


def _unknown_wnids(wnids: list[str], names: dict[str, str], where: Path, classnames_path: Path) -> list[str]:
    return [f"class folder {where / w} has no entry in {classnames_path}" for w in wnids if w not in names]


@register_dataset("imagenet")
def load_imagenet(root: Path) -> DatasetSplits:
    """ImageNet-1k from ``root/imagenet/images/{train,val}/<wnid>/`` and ``root/imagenet/classnames.txt``.

    Labels index the sorted wnid folders of ``images/train`` (of ``images/val`` when only that is
    present). The official val set is the test split; there is no val split (empty list).
    """
    dataset_dir = root / "imagenet"
    image_root = dataset_dir / "images"
    classnames_path = dataset_dir / "classnames.txt"
    names = read_classnames(classnames_path)
    train_dir, val_dir = image_root / "train", image_root / "val"
    if not train_dir.is_dir() and not val_dir.is_dir():
        raise DataError(
            f"neither {train_dir} nor {val_dir} exists; put ImageNet's class folders (<wnid>/*.JPEG) there"
        )
    source = train_dir if train_dir.is_dir() else val_dir
    wnids = _subfolders(source)
    problems = _unknown_wnids(wnids, names, source, classnames_path)
    val_wnids = _subfolders(val_dir) if val_dir.is_dir() else []
    problems += [f"{val_dir / w} has no matching folder in {train_dir}" for w in val_wnids if w not in wnids]
    if problems:
        raise DataProblems(dataset_dir, problems, "the train and val folders must hold the same wnids")
    classnames = [names[w] for w in wnids]
    train = _folder_items(image_root, "train/", wnids, classnames) if train_dir.is_dir() else []
    # Val labels index the train folder list so that both splits agree even if val lacks a class.
    label_of = {w: label for label, w in enumerate(wnids)}
    test = [
        Datum(f"val/{w}/{file}", label_of[w], names[w])
        for w in val_wnids
        for file in list_images(val_dir / w)
    ]
    return DatasetSplits("imagenet", image_root, train, [], test, classnames, dataset_dir / FEWSHOT_DIRNAME)


@register_dataset("imagenetv2")
def load_imagenetv2(root: Path) -> DatasetSplits:
    """ImageNetV2 (matched frequency), test only: folder ``<i>/`` holds class ``i`` of classnames.txt."""
    dataset_dir = root / "imagenetv2"
    image_root = dataset_dir / "imagenetv2-matched-frequency-format-val"
    classnames = list(read_classnames(dataset_dir / "classnames.txt").values())
    require_dir(
        image_root, "image folder", "extract imagenetv2-matched-frequency.tar.gz into the imagenetv2 folder"
    )
    missing = [
        f"class folder {image_root / str(i)} not found"
        for i in range(len(classnames))
        if not (image_root / str(i)).is_dir()
    ]
    if missing:
        raise DataProblems(dataset_dir, missing, "ImageNetV2 needs one folder per class, named 0..N-1")
    test = _folder_items(image_root, "", [str(i) for i in range(len(classnames))], classnames)
    return DatasetSplits("imagenetv2", image_root, [], [], test, classnames)


def _load_wnid_test_set(root: Path, name: str, folder: str, image_dir: str) -> DatasetSplits:
    """Test-only dataset whose labels index the sorted wnid folders present under the image root.

    Test-only sets have nothing to sample, hence no few-shot cache folder.
    """
    dataset_dir = root / folder
    image_root = dataset_dir / image_dir
    classnames_path = dataset_dir / "classnames.txt"
    names = read_classnames(classnames_path)
    require_dir(image_root, "image folder", f"dataset {name!r} expects its <wnid>/ class folders there")
    wnids = _subfolders(image_root)
    problems = _unknown_wnids(wnids, names, image_root, classnames_path)
    if problems:
        raise DataProblems(dataset_dir, problems, f"use a classnames.txt that covers every {name} class")
    classnames = [names[w] for w in wnids]
    return DatasetSplits(
        name, image_root, [], [], _folder_items(image_root, "", wnids, classnames), classnames
    )


@register_dataset("imagenet_sketch")
def load_imagenet_sketch(root: Path) -> DatasetSplits:
    """ImageNet-Sketch, test only: ``root/imagenet-sketch/images/<wnid>/`` (1000 classes)."""
    return _load_wnid_test_set(root, "imagenet_sketch", "imagenet-sketch", "images")


@register_dataset("imagenet_a")
def load_imagenet_a(root: Path) -> DatasetSplits:
    """ImageNet-A, test only: ``root/imagenet-adversarial/imagenet-a/<wnid>/`` (200-way)."""
    return _load_wnid_test_set(root, "imagenet_a", "imagenet-adversarial", "imagenet-a")


@register_dataset("imagenet_r")
def load_imagenet_r(root: Path) -> DatasetSplits:
    """ImageNet-R, test only: ``root/imagenet-rendition/imagenet-r/<wnid>/`` (200-way)."""
    return _load_wnid_test_set(root, "imagenet_r", "imagenet-rendition", "imagenet-r")
