"""Core dataset types and the dataset registry.

A dataset is loaded into a :class:`DatasetSplits`: three lists of :class:`Datum` whose paths are
relative to one image root, plus the class names indexed by label. Readers register themselves under a
short name with :func:`register_dataset`; :func:`load_dataset` is the single entry point.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vladapt.errors import ConfigError, DataError

#: Extensions (lower case) that folder-based readers treat as images.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

#: Name of the folder, inside a dataset folder, that holds few-shot subset caches (Dassl's name).
FEWSHOT_DIRNAME = "split_fewshot"

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Datum:
    """One labelled image.

    ``path`` is relative to the dataset's image root (POSIX separators), ``label`` is the 0-based class
    index and ``classname`` the raw class name as stored by the dataset (underscores kept).
    """

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A loaded dataset: train/val/test item lists sharing one image root.

    ``classnames[label]`` is the name of class ``label``. ``val`` is empty for datasets without a
    validation split (ImageNet, the test-only ImageNet variants). ``fewshot_cache_dir`` is where
    few-shot subsets of this dataset are cached (``<dataset folder>/split_fewshot`` for the benchmark
    datasets, as in Dassl); ``None`` disables caching.
    """

    name: str
    image_root: Path
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]
    fewshot_cache_dir: Path | None = field(default=None)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, which: str) -> list[Datum]:
        """The item list of ``which`` ("train", "val" or "test")."""
        if which not in SPLIT_NAMES:
            raise ConfigError(f"unknown split {which!r}; allowed: {', '.join(SPLIT_NAMES)}")
        return getattr(self, which)

    def abspath(self, datum: Datum) -> Path:
        """Absolute location of ``datum``'s image."""
        return self.image_root / datum.path


Loader = Callable[..., DatasetSplits]

_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(root: Path, **kw) -> DatasetSplits`` under ``name``."""

    def decorate(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ConfigError(f"dataset name {name!r} is registered twice")
        _REGISTRY[name] = loader
        return loader

    return decorate


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_REGISTRY)


def load_dataset(name: str, root: str | os.PathLike[str], **kwargs: object) -> DatasetSplits:
    """Load dataset ``name``.

    For the benchmark datasets ``root`` is the data root holding the dataset folders (``dtd/``,
    ``eurosat/``, ``imagenet/``, ...). For custom data (``folder``, ``csv``, ``json``) it is the image
    folder or the list file itself; see :mod:`vladapt.data.custom`. ``kwargs`` go to the reader.
    """
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}") from None
    splits = loader(Path(root).expanduser(), **kwargs)
    check_paths_inside(splits)
    return splits


def check_paths_inside(splits: DatasetSplits) -> None:
    """Raise :class:`DataError` if an item path of ``splits`` is absolute or leaves its image root.

    The readers already refuse such paths entry by entry; this backstop covers every registered
    reader (including ones registered outside vladapt) at the cost of a few string tests per item.
    """
    bad = [
        f"{split}[{index}]: path {datum.path!r} {reason}"
        for split in SPLIT_NAMES
        for index, datum in enumerate(splits.split(split))
        if (".." in datum.path or datum.path[:1] in ("/", "\\") or datum.path[1:2] == ":")
        and (reason := unsafe_path_reason(datum.path)) is not None
    ]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(
            f"dataset {splits.name!r} (image root {splits.image_root}) lists {len(bad)} image path(s) "
            f"outside its image root: {shown}; fix the split file or list these items came from"
        )


def classnames_from_items(items: Iterable[tuple[str, Datum]]) -> tuple[list[str], list[str]]:
    """Derive ``classnames[label]`` from ``(where, datum)`` pairs and check label/name consistency.

    ``where`` is a short location used in messages (e.g. ``"train[12]"``). Returns
    ``(classnames, problems)``: every label must carry exactly one name, every name exactly one label,
    and the labels must be 0..N-1 without gaps. An inconsistent label or name is reported once, with
    its variants counted, rather than once per item. ``problems`` is empty when all holds; with gaps
    in the labels ``classnames`` is empty (the largest label may be absurd, e.g. ``10**18``).
    """
    # label -> name -> [count, first location], and the reverse; dicts keep first-seen order.
    names: dict[int, dict[str, list]] = {}
    labels: dict[str, dict[int, list]] = {}
    for where, datum in items:
        names.setdefault(datum.label, {}).setdefault(datum.classname, [0, where])[0] += 1
        labels.setdefault(datum.classname, {}).setdefault(datum.label, [0, where])[0] += 1
    problems = [
        f"label {label} has {len(variants)} class names: {_variants(variants)}"
        for label, variants in names.items()
        if len(variants) > 1
    ]
    problems += [
        f"class {name!r} has {len(variants)} labels: {_variants(variants)}"
        for name, variants in labels.items()
        if len(variants) > 1
    ]
    count = max(names, default=-1) + 1
    if count > len(names):
        # Never walk range(count): a corrupt file may hold a label like 10**18.
        gaps = []
        for label in range(count):
            if label not in names:
                gaps.append(label)
                if len(gaps) > 10:
                    break
        shown = ", ".join(map(str, gaps[:10])) + (" ..." if len(gaps) > 10 else "")
        problems.append(f"labels must be 0..{count - 1} without gaps; no item has label {shown}")
        return [], problems
    # The most frequent name stands for a label (stable: ties go to the first seen).
    classnames = [max(names[label].items(), key=lambda kv: kv[1][0])[0] for label in range(count)]
    return classnames, problems


def _variants(variants: dict) -> str:
    return ", ".join(
        f"{value!r} ({n} item{'s' if n > 1 else ''}, first at {where})"
        for value, (n, where) in variants.items()
    )


def list_images(folder: Path, recursive: bool = False) -> list[str]:
    """Image files under ``folder`` as sorted POSIX paths relative to it; hidden entries are skipped.

    Sorting makes the item order, and hence the seeded few-shot draw, independent of the file system.
    """
    if not recursive:
        # scandir's cached d_type avoids one stat per file, which matters for ImageNet's 1.28 M images.
        with os.scandir(folder) as entries:
            return sorted(
                e.name
                for e in entries
                if not e.name.startswith(".")
                and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                and e.is_file()
            )
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        found.extend(
            (rel / f).as_posix()
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` (from a split file or item list) may not name an image, or ``None`` if it may.

    Image paths must be relative and stay inside the image root once ``..`` components are
    resolved: an absolute path (``/etc/hostname``, ``C:/x``, ``//server/share``) or one that climbs
    out (``../outside/evil.jpg``, ``a/../../b``) would make vladapt read files outside the dataset.
    Backslashes count as separators, so Windows-style paths are judged the same way on every OS.
    Purely lexical: symbolic links inside the root are followed, so a symlinked dataset folder works.
    """
    text = path.replace("\\", "/")
    if "\0" in text:
        return "contains a NUL character"
    # "C:/x" and "C:" are Windows absolute paths; "a:b/x.jpg" is a folder named "a:b" except on Windows.
    drive = text[1:2] == ":" and text[0].isalpha() and (text[2:3] in ("", "/") or os.name == "nt")
    if text.startswith("/") or drive:
        return "is an absolute path; image paths must be relative to the image root"
    depth = 0
    for part in text.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "leaves the image root ('..'); image paths must stay inside it"
        elif part not in ("", "."):
            depth += 1
    return None


def require_dir(path: Path, what: str, hint: str) -> None:
    """Raise :class:`DataError` unless ``path`` is a directory."""
    if not path.is_dir():
        raise DataError(f"{what} {path} not found; {hint}")
