"""Dataset checker: load a layout and collect every problem instead of stopping at the first.

:func:`check_dataset` is the thorough check behind ``vladapt data check`` (every image decoded by
default); :func:`require_images` is the cheap existence check a run does before spending compute.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from vladapt.data.base import SPLIT_NAMES, DatasetSplits, load_dataset
from vladapt.data.custom import CUSTOM_DATASETS
from vladapt.data.splitfile import DataProblems
from vladapt.errors import DataError

_MISSING = "missing"
_BATCH = 4096


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    ``problems`` holds layout, split-file and label/classname problems (one message each);
    ``missing`` the absolute paths of absent images; ``unreadable`` ``(path, reason)`` pairs of images
    PIL cannot open or decode. ``counts`` maps split name to item count; ``checked_images`` counts
    distinct image files looked at, ``images_verified`` whether they were opened with PIL or only
    found and ``images_decoded`` whether their pixel data was decoded (not only their headers read).
    """

    name: str
    root: Path
    image_root: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)
    num_classes: int = 0
    checked_images: int = 0
    images_verified: bool = False
    images_decoded: bool = False
    problems: list[str] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.problems or self.missing or self.unreadable)


def check_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    verify_images: bool = True,
    decode: bool = True,
    workers: int = 8,
    quiet: bool = False,
    **load_kwargs: object,
) -> CheckReport:
    """Check dataset ``name`` under ``root`` (as for :func:`~vladapt.data.load_dataset`) without raising.

    Reports a missing or malformed split file, label/classname inconsistencies, image paths that
    leave the image root, every missing image and, with ``verify_images``, every image PIL cannot
    open, verify and (with ``decode``, the default) fully decode; ``decode=False`` only reads the
    headers, which is faster but passes truncated files (``workers`` threads; a progress bar unless
    ``quiet``). Custom data is checked without saving a new split file. Only an
    unknown dataset name raises (:class:`~vladapt.errors.ConfigError`).
    """
    report = CheckReport(name, Path(root).expanduser())
    if name in CUSTOM_DATASETS:
        # A check must not freeze a split of data that may be about to be fixed.
        load_kwargs.setdefault("save_split", False)
    try:
        splits = load_dataset(name, root, **load_kwargs)
    except DataProblems as err:
        report.problems.extend(f"{err.source}: {problem}" for problem in err.problems)
        return report
    except DataError as err:
        report.problems.append(str(err))
        return report
    report.image_root = splits.image_root
    report.counts = {split: len(splits.split(split)) for split in SPLIT_NAMES}
    report.num_classes = splits.num_classes
    if not splits.image_root.is_dir():
        report.problems.append(f"image root {splits.image_root} not found")
    paths = list(dict.fromkeys(splits.abspath(d) for split in SPLIT_NAMES for d in splits.split(split)))
    report.checked_images = len(paths)
    report.images_verified = verify_images
    report.images_decoded = verify_images and decode
    if not verify_images:
        inspect = _inspect_existence
    else:
        inspect = _decode_image if decode else _inspect_image
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=len(paths), desc=f"checking {name}", unit="img", disable=quiet) as progress,
    ):
        # Batches bound the number of pending futures (ImageNet has 1.33 M images).
        for start in range(0, len(paths), _BATCH):
            batch = paths[start : start + _BATCH]
            for path, outcome in zip(batch, pool.map(inspect, batch), strict=True):
                if outcome == _MISSING:
                    report.missing.append(path)
                elif outcome is not None:
                    report.unreadable.append((path, outcome))
            progress.update(len(batch))
    return report


def _inspect_existence(path: Path) -> str | None:
    return None if path.is_file() else _MISSING


def _inspect_image(path: Path) -> str | None:
    """``None`` if readable, :data:`_MISSING` if absent, else the reason PIL gave."""
    if not path.is_file():
        return _MISSING
    try:
        with Image.open(path) as image:
            image.verify()
    # PIL's decoders raise many exception types on corrupt input; any of them means "unreadable".
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _decode_image(path: Path) -> str | None:
    """Like :func:`_inspect_image`, then decode every pixel: ``verify()`` misses truncated files."""
    outcome = _inspect_image(path)
    if outcome is not None:
        return outcome
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def require_images(
    splits: DatasetSplits,
    which: tuple[str, ...] = SPLIT_NAMES,
    *,
    dataset: str | None = None,
    root: str | os.PathLike[str] | None = None,
    max_shown: int = 5,
) -> None:
    """Raise one :class:`DataError` if an image of the ``which`` splits of ``splits`` is missing.

    A cheap existence check (no image is opened) to run before training or evaluating, so that a
    dataset with absent files fails at once with the number of missing images and the first
    ``max_shown`` of them, instead of after minutes of compute on the first one met. ``dataset`` and
    ``root`` (the name and ``--root`` the user gave) make the hint a ready ``vladapt data check``
    command line.
    """
    paths = dict.fromkeys(splits.abspath(d) for split in which for d in splits.split(split))
    missing = [path for path in paths if not path.is_file()]
    if not missing:
        return
    shown = ", ".join(str(p) for p in missing[:max_shown]) + (", ..." if len(missing) > max_shown else "")
    command = f"vladapt data check --dataset {dataset or splits.name} --root {root or splits.image_root}"
    raise DataError(
        f"dataset {splits.name!r}: {len(missing)} of {len(paths)} images of the "
        f"{'/'.join(which)} split(s) are missing under {splits.image_root} (first: {shown}); "
        f"run `{command}` (Python: vladapt.data.check_dataset()) to list every missing or unreadable file"
    )


def format_report(report: CheckReport, max_listed: int | None = 20) -> str:
    """Human-readable summary of ``report``; long lists show ``max_listed`` entries and a total
    (``None``: every entry)."""
    lines = [f"dataset {report.name!r} at {report.root}"]
    if report.image_root is not None:
        counts = ", ".join(f"{split} {count}" for split, count in report.counts.items())
        lines.append(f"  image root: {report.image_root}")
        lines.append(f"  classes: {report.num_classes}; items: {counts}")
    sections = [
        ("problems", report.problems),
        ("missing images", [str(p) for p in report.missing]),
        ("unreadable images", [f"{p}: {reason}" for p, reason in report.unreadable]),
    ]
    for title, entries in sections:
        if entries:
            lines.append(f"  {title} ({len(entries)}):")
            lines.extend(f"    {entry}" for entry in entries[:max_listed])
            if max_listed is not None and len(entries) > max_listed:
                lines.append(f"    ... and {len(entries) - max_listed} more")
    if report.ok:
        if not report.images_verified:
            verdict = "present (not opened)"
        elif report.images_decoded:
            verdict = "present and readable (fully decoded)"
        else:
            verdict = "present, headers readable (not decoded)"
        lines.append(f"  OK: {report.checked_images} images {verdict}")
    else:
        lines.append("  FAILED: fix the problems above")
    return "\n".join(lines)
