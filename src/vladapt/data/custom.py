"""Custom data: an image folder, a CSV file or a JSON list, split reproducibly into train/val/test.

Three registered names, used through :func:`vladapt.data.load_dataset` (or :func:`load_custom`, which
picks one from the path):

* ``load_dataset("folder", root=DIR)``: one sub-folder of ``DIR`` per class; class names are the sorted
  sub-folder names; images (``.jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm``, any case) are found
  recursively inside each class folder. Files directly in ``DIR`` are ignored.
* ``load_dataset("csv", root=FILE)``: a CSV with header columns ``path`` and ``label`` (other columns
  ignored); ``label`` is the class name, ``path`` is relative to the CSV's folder.
* ``load_dataset("json", root=FILE)``: ``[{"path": ..., "label": ...}, ...]`` or ``[[path, label], ...]``
  with the same meaning (an integer label is used as its decimal string); or a ready split file in
  the ``split_zhou`` format (keys train/val/test), which is used as is.

Listed paths must be relative and stay inside the image root (no absolute paths, no ``..`` that
climbs out of it); other entries are reported, with their line or index, and nothing is read.

Labels index the sorted class names. Without a split, a seeded per-class split (default 50/20/30
train/val/test, at least one test image per class) is made and saved as a split file, by default
``DIR/split.json`` or ``<FILE stem>.split.json`` beside the list file, so that reruns reuse it. A saved
split that no longer matches the data (images or classes added or removed) is an error rather than
being silently regenerated: delete it to make a new one.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path, PurePath

from vladapt.data.base import (
    FEWSHOT_DIRNAME,
    DatasetSplits,
    Datum,
    list_images,
    register_dataset,
    require_dir,
    unsafe_path_reason,
)
from vladapt.data.splitfile import DataProblems, read_split_file, write_split_file
from vladapt.errors import ConfigError, DataError

#: Registered names of the custom-data readers; they accept the keyword arguments of :func:`load_custom`.
CUSTOM_DATASETS = ("folder", "csv", "json")

DEFAULT_RATIOS = (0.5, 0.2, 0.3)

# (path relative to the image root, class name)
_Entry = tuple[str, str]


def load_custom(
    path: str | os.PathLike[str],
    *,
    split_file: str | os.PathLike[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    save_split: bool = True,
    name: str | None = None,
) -> DatasetSplits:
    """Load custom data from an image folder, a ``.csv`` or a ``.json`` file (chosen from ``path``).

    ``split_file`` overrides where the split is read from or saved to; ``ratios`` are the
    train/val/test fractions and ``seed`` the seed of a newly made split; ``save_split=False`` makes
    the split in memory only; ``name`` defaults to the folder name or the file stem.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"custom data {root} not found; pass an image folder or a .csv/.json list file")
    kind = "folder" if root.is_dir() else root.suffix.lower().lstrip(".")
    loaders = {"folder": load_image_folder, "csv": load_csv, "json": load_json}
    if kind not in loaders:
        raise DataError(f"{root} is neither an image folder nor a .csv or .json file")
    return loaders[kind](
        root, split_file=split_file, ratios=ratios, seed=seed, save_split=save_split, name=name
    )


@register_dataset("folder")
def load_image_folder(
    root: Path,
    *,
    split_file: str | os.PathLike[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    save_split: bool = True,
    name: str | None = None,
) -> DatasetSplits:
    """Class-per-sub-folder data under ``root``; see the module docstring and :func:`load_custom`."""
    require_dir(root, "image folder", "pass a folder with one sub-folder of images per class")
    # The few-shot cache lives inside the folder, so it must not be mistaken for a class.
    class_dirs = sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != FEWSHOT_DIRNAME
    )
    if not class_dirs:
        raise DataError(
            f"image folder {root} has no class sub-folders; put each class's images in its own sub-folder"
        )
    entries: list[_Entry] = []
    problems: list[str] = []
    for class_dir in class_dirs:
        files = list_images(class_dir, recursive=True)
        if not files:
            problems.append(f"class folder {class_dir} holds no images")
        entries.extend((f"{class_dir.name}/{f}", class_dir.name) for f in files)
    if problems:
        raise DataProblems(root, problems, "remove the empty class folders or add images to them")
    split_path = Path(split_file) if split_file is not None else root / "split.json"
    return _with_split(
        name or root.resolve().name,
        root,
        root / FEWSHOT_DIRNAME,
        entries,
        split_path,
        ratios,
        seed,
        save_split,
    )


@register_dataset("csv")
def load_csv(
    root: Path,
    *,
    split_file: str | os.PathLike[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    save_split: bool = True,
    name: str | None = None,
) -> DatasetSplits:
    """A ``path,label`` CSV file at ``root``; see the module docstring and :func:`load_custom`."""
    try:
        with root.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "path" not in columns or "label" not in columns:
                raise DataError(
                    f"{root}: the header must have columns 'path' and 'label' (class name), found {columns}"
                )
            reader.fieldnames = columns
            # line_num follows quoted multi-line fields, so messages point at the right line.
            rows = [(f"line {reader.line_num}", row.get("path"), row.get("label")) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read CSV file {root}: {err}") from err
    return _from_list_file(root, rows, split_file, ratios, seed, save_split, name)


@register_dataset("json")
def load_json(
    root: Path,
    *,
    split_file: str | os.PathLike[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    save_split: bool = True,
    name: str | None = None,
) -> DatasetSplits:
    """A JSON item list, or a ready split file, at ``root``; see the module docstring."""
    try:
        raw = json.loads(root.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: bad JSON or a huge int
        raise DataError(f"cannot read JSON file {root}: {err}") from err
    if isinstance(raw, dict):
        parts, classnames = read_split_file(root)
        return DatasetSplits(
            name or root.stem,
            root.parent,
            parts["train"],
            parts["val"],
            parts["test"],
            classnames,
            root.parent / FEWSHOT_DIRNAME / root.stem,
        )
    if not isinstance(raw, list):
        raise DataError(f"{root}: expected a list of {{'path': ..., 'label': ...}} or [path, label] entries")
    rows = []
    for index, entry in enumerate(raw):
        if isinstance(entry, dict):
            rows.append((f"entry {index}", entry.get("path"), entry.get("label")))
        elif isinstance(entry, list) and len(entry) == 2:
            rows.append((f"entry {index}", entry[0], entry[1]))
        else:
            rows.append((f"entry {index}", None, None))
    return _from_list_file(root, rows, split_file, ratios, seed, save_split, name)


def _from_list_file(
    root: Path,
    rows: list[tuple[str, object, object]],
    split_file: str | os.PathLike[str] | None,
    ratios: Sequence[float],
    seed: int,
    save_split: bool,
    name: str | None,
) -> DatasetSplits:
    """Validate ``(where, path, label)`` rows of a CSV/JSON list and attach a split."""
    entries: list[_Entry] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for where, path, label in rows:
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(path, str) or not path.strip():
            problems.append(f"{where}: needs a non-empty 'path', got {path!r}")
        elif not isinstance(label, str) or not label.strip():
            problems.append(f"{where}: needs a non-empty 'label' (the class name), got {label!r}")
        elif (unsafe := unsafe_path_reason(path.strip())) is not None:
            problems.append(f"{where}: path {path.strip()!r} {unsafe}")
        else:
            rel = PurePath(path.strip()).as_posix()
            if rel in first_seen:
                problems.append(f"{where}: path {rel!r} is already listed at {first_seen[rel]}")
            else:
                first_seen[rel] = where
                entries.append((rel, label.strip()))
    if not entries and not problems:
        problems.append("no items listed")
    if problems:
        raise DataProblems(root, problems, "fix these entries; each item needs a path and a class name")
    split_path = Path(split_file) if split_file is not None else root.with_name(f"{root.stem}.split.json")
    # Several list files may share a folder, so each gets its own few-shot cache folder.
    cache_dir = root.parent / FEWSHOT_DIRNAME / root.stem
    return _with_split(
        name or root.stem, root.parent, cache_dir, entries, split_path, ratios, seed, save_split
    )


def _with_split(
    name: str,
    image_root: Path,
    cache_dir: Path,
    entries: list[_Entry],
    split_path: Path,
    ratios: Sequence[float],
    seed: int,
    save_split: bool,
) -> DatasetSplits:
    classnames = sorted({classname for _, classname in entries})
    if split_path.is_file():
        parts, split_classnames = read_split_file(split_path)
        _check_split_matches(split_path, parts, split_classnames, entries, classnames)
    else:
        parts = stratified_split(entries, ratios, seed)
        if save_split:
            write_split_file(split_path, parts)
    return DatasetSplits(name, image_root, parts["train"], parts["val"], parts["test"], classnames, cache_dir)


def _check_split_matches(
    split_path: Path,
    parts: dict[str, list[Datum]],
    split_classnames: list[str],
    entries: list[_Entry],
    classnames: list[str],
) -> None:
    hint = f"delete {split_path} to make a new split of the current data"
    if split_classnames != classnames:
        raise DataError(
            f"split file {split_path} has classes {split_classnames} but the data has {classnames}; {hint}"
        )
    in_split = {(d.path, d.classname) for items in parts.values() for d in items}
    in_data = set(entries)
    if in_split != in_data:
        unsplit = sorted(in_data - in_split)
        gone = sorted(in_split - in_data)
        details = []
        if unsplit:
            details.append(f"{len(unsplit)} item(s) of the data are not in it (e.g. {unsplit[0][0]})")
        if gone:
            details.append(f"{len(gone)} of its item(s) are not in the data (e.g. {gone[0][0]})")
        raise DataError(f"split file {split_path} is out of date: {'; '.join(details)}; {hint}")


def stratified_split(entries: Sequence[_Entry], ratios: Sequence[float], seed: int) -> dict[str, list[Datum]]:
    """Seeded per-class train/val/test split of ``(path, classname)`` entries.

    Labels index the sorted class names. Each class's paths are sorted, shuffled with one
    ``random.Random(seed)`` (classes in label order) and cut by :func:`split_sizes`. Every split is
    returned sorted by (label, path).
    """
    fractions = _check_ratios(ratios)
    by_class: dict[str, list[str]] = {}
    for path, classname in entries:
        by_class.setdefault(classname, []).append(path)
    rng = random.Random(seed)
    parts: dict[str, list[Datum]] = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(sorted(by_class)):
        paths = sorted(by_class[classname])
        rng.shuffle(paths)
        n_train, n_val, _ = split_sizes(len(paths), fractions)
        cuts = {
            "train": paths[:n_train],
            "val": paths[n_train : n_train + n_val],
            "test": paths[n_train + n_val :],
        }
        for split, chosen in cuts.items():
            parts[split].extend(Datum(p, label, classname) for p in chosen)
    for items in parts.values():
        items.sort(key=lambda d: (d.label, d.path))
    return parts


def split_sizes(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)`` for a class of ``n`` items.

    Counts are rounded half up; a non-zero test fraction keeps at least one test item and, from two
    items on, at least one training item is kept too (a class without training images cannot be
    learned).
    """
    _, val_frac, test_frac = ratios
    n_test = min(n, max(1, int(n * test_frac + 0.5))) if test_frac > 0 else 0
    n_val = min(n - n_test, int(n * val_frac + 0.5))
    if n - n_test - n_val == 0 and n >= 2:
        if n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_test - n_val, n_val, n_test


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    values = [float(r) for r in ratios]
    if len(values) != 3 or min(values) < 0 or values[0] == 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(
            "ratios must be three fractions (train, val, test) summing to 1 with train > 0, "
            f"got {tuple(ratios)}"
        )
    train, val, test = values
    return train, val, test
