"""Readers of the ten non-ImageNet benchmark datasets (CoOp layouts, spec/METHODS.md §5.1).

Nine of them read the official ``split_zhou_<Name>.json`` file; FGVC-Aircraft reads the archive's own
``images_variant_{train,val,test}.txt`` files. Class names are kept exactly as the split files spell
them; splits are never regenerated because the reference code's regeneration is not reproducible.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from vladapt.data.base import (
    FEWSHOT_DIRNAME,
    SPLIT_NAMES,
    DatasetSplits,
    Datum,
    register_dataset,
    unsafe_path_reason,
)
from vladapt.data.splitfile import DataProblems, read_split_file
from vladapt.errors import DataError


@dataclass(frozen=True)
class SplitFileLayout:
    """Where a split-file dataset lives below the data root.

    ``folder`` is the dataset folder, ``image_dir`` the image root inside it (``""`` = the folder
    itself) and ``split_file`` the split JSON inside the folder.
    """

    folder: str
    image_dir: str
    split_file: str


SPLIT_FILE_LAYOUTS: dict[str, SplitFileLayout] = {
    "caltech101": SplitFileLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": SplitFileLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    # Paths in this split start with cars_train/ or cars_test/, so the image root is the folder itself.
    "stanford_cars": SplitFileLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": SplitFileLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": SplitFileLayout("food-101", "images", "split_zhou_Food101.json"),
    "sun397": SplitFileLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": SplitFileLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": SplitFileLayout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": SplitFileLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    # vladapt's synthetic downstream datasets (written by vladapt.synth.datasets in the same format)
    "synth_shapes": SplitFileLayout("synth_shapes", "images", "split_zhou_SynthShapes.json"),
    "synth_textures": SplitFileLayout("synth_textures", "images", "split_zhou_SynthTextures.json"),
    "synth_counts": SplitFileLayout("synth_counts", "images", "split_zhou_SynthCounts.json"),
}


#: Datasets vladapt generates (vladapt.synth.datasets) instead of reading an official download.
SYNTHETIC_DATASETS = frozenset(name for name in SPLIT_FILE_LAYOUTS if name.startswith("synth_"))


def _load_split_file_dataset(root: Path, *, name: str, layout: SplitFileLayout) -> DatasetSplits:
    dataset_dir = root / layout.folder
    image_root = dataset_dir / layout.image_dir if layout.image_dir else dataset_dir
    split_path = dataset_dir / layout.split_file
    if not split_path.is_file() and name in SYNTHETIC_DATASETS:
        raise DataError(
            f"split file {split_path} not found; {name!r} is vladapt's synthetic data, generated rather than "
            f"downloaded: `vladapt demo --out OUT --datasets {name} --methods zeroshot` writes it to OUT/data "
            f"(then pass --root OUT/data), or from Python vladapt.synth.datasets.write_dataset({name!r}, "
            f"{str(root)!r}) writes it under this root"
        )
    if not split_path.is_file():
        raise DataError(
            f"split file {split_path} not found; dataset {name!r} needs the official "
            f"{layout.split_file} (see CoOp's DATASETS.md) in {dataset_dir} and its images under "
            f"{image_root}"
        )
    parts, classnames = read_split_file(split_path)
    return DatasetSplits(
        name,
        image_root,
        parts["train"],
        parts["val"],
        parts["test"],
        classnames,
        dataset_dir / FEWSHOT_DIRNAME,
    )


for _name, _layout in SPLIT_FILE_LAYOUTS.items():
    register_dataset(_name)(functools.partial(_load_split_file_dataset, name=_name, layout=_layout))


@register_dataset("fgvc_aircraft")
def load_fgvc_aircraft(root: Path) -> DatasetSplits:
    """FGVC-Aircraft from ``root/fgvc_aircraft`` (the ``data/`` folder of the 2013b archive).

    Labels follow the line order of ``variants.txt``; each ``images_variant_<split>.txt`` line is
    ``"<image id> <variant name>"`` and the image is ``images/<image id>.jpg``.
    """
    dataset_dir = root / "fgvc_aircraft"
    variants_path = dataset_dir / "variants.txt"
    layout_hint = (
        f"fgvc_aircraft expects the data/ folder of the FGVC-Aircraft 2013b archive at {dataset_dir}, "
        "holding variants.txt, images_variant_{train,val,test}.txt and images/"
    )
    if not variants_path.is_file():
        raise DataError(f"{variants_path} not found; {layout_hint}")
    classnames = [line.strip() for line in _read_lines(variants_path) if line.strip()]
    label_of = {name: label for label, name in enumerate(classnames)}
    problems = [
        f"variants.txt: variant {name!r} is listed more than once"
        for name in sorted(label_of)
        if classnames.count(name) > 1
    ]
    parts: dict[str, list[Datum]] = {}
    for split in SPLIT_NAMES:
        list_path = dataset_dir / f"images_variant_{split}.txt"
        if not list_path.is_file():
            problems.append(f"{list_path.name} not found")
            parts[split] = []
            continue
        parts[split] = []
        for lineno, line in enumerate(_read_lines(list_path), start=1):
            line = line.strip()
            if not line:
                continue
            image_id, _, variant = line.partition(" ")
            if not variant:
                problems.append(
                    f"{list_path.name} line {lineno}: expected '<image id> <variant>', got {line!r}"
                )
            elif (unsafe := unsafe_path_reason(f"{image_id}.jpg")) is not None:
                problems.append(f"{list_path.name} line {lineno}: image id {image_id!r} {unsafe}")
            elif variant not in label_of:
                problems.append(f"{list_path.name} line {lineno}: variant {variant!r} is not in variants.txt")
            else:
                parts[split].append(Datum(f"{image_id}.jpg", label_of[variant], variant))
    if problems:
        raise DataProblems(dataset_dir, problems, layout_hint)
    return DatasetSplits(
        "fgvc_aircraft",
        dataset_dir / "images",
        parts["train"],
        parts["val"],
        parts["test"],
        classnames,
        dataset_dir / FEWSHOT_DIRNAME,
    )


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
