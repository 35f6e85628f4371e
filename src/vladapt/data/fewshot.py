"""Few-shot subsets drawn exactly as Dassl draws them, with a portable JSON cache.

Dassl seeds Python's global ``random`` with the run seed and, before anything else consumes it,
samples the train split with K shots and then the val split with ``min(K, 4)`` shots from the same
stream (spec/METHODS.md §5.3). Replaying that call sequence on one ``random.Random(seed)`` gives the
same subsets without touching global state.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from vladapt.data.base import DatasetSplits, Datum
from vladapt.data.splitfile import DataProblems, parse_entries, split_json_text
from vladapt.errors import DataError
from vladapt.io import WriteError, atomic_write_text

#: The val split is sampled with min(K, VAL_SHOTS_CAP) shots, as in the CoOp-family dataset classes.
VAL_SHOTS_CAP = 4


def sample_fewshot(
    items: Sequence[Datum], num_shots: int, rng: random.Random, repeat: bool = True
) -> list[Datum]:
    """Draw ``num_shots`` items per label, in Dassl's order.

    Labels are visited in order of first appearance in ``items``. A label with at least ``num_shots``
    items gets ``rng.sample(group, num_shots)``; a smaller group gets ``rng.choices(group,
    k=num_shots)`` (with replacement) when ``repeat``, else is kept whole. ``num_shots < 1`` returns
    all items.
    """
    if num_shots < 1:
        return list(items)
    groups: dict[int, list[Datum]] = {}
    for datum in items:
        groups.setdefault(datum.label, []).append(datum)
    drawn: list[Datum] = []
    for group in groups.values():
        if len(group) >= num_shots:
            drawn.extend(rng.sample(group, num_shots))
        elif repeat:
            drawn.extend(rng.choices(group, k=num_shots))
        else:
            drawn.extend(group)
    return drawn


def cache_path(cache_dir: str | os.PathLike[str], num_shots: int, seed: int) -> Path:
    """``<cache_dir>/shot_{K}-seed_{S}.json`` (Dassl's name scheme with a JSON suffix)."""
    return Path(cache_dir) / f"shot_{num_shots}-seed_{seed}.json"


def fewshot_splits(
    splits: DatasetSplits,
    num_shots: int | None,
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DatasetSplits:
    """The K-shot version of ``splits`` for run seed ``seed``; test stays complete.

    Train gets K shots per class, then val ``min(K, 4)`` from the same ``random.Random(seed)`` (an
    empty val, as for ImageNet, consumes nothing). ``num_shots`` of ``None`` or ``<= 0`` returns all
    data. With ``cache_dir`` (normally ``splits.fewshot_cache_dir``) the subset is read from, or
    written to, :func:`cache_path`: JSON ``{"dataset", "data", "num_shots", "seed", "train": [[path,
    label, classname], ...], "val": [...]}``. ``data`` is :func:`data_key` of the train and val
    splits it was drawn from, which holds only relative paths, labels and class names, so the cache
    stays valid when the dataset folder is renamed or moved; ``dataset`` is informational. A cache
    drawn from other data (or holding items that are not in ``splits``) raises :class:`DataError`.
    """
    if num_shots is None or num_shots <= 0:
        return replace(splits, train=list(splits.train), val=list(splits.val), test=list(splits.test))
    path = cache_path(cache_dir, num_shots, seed) if cache_dir is not None else None
    if path is not None and path.is_file():
        train, val = _read_cache(path, splits, num_shots, seed)
    else:
        rng = random.Random(seed)
        train = sample_fewshot(splits.train, num_shots, rng)
        val = sample_fewshot(splits.val, min(num_shots, VAL_SHOTS_CAP), rng)
        if path is not None:
            header = {"dataset": splits.name, "data": data_key(splits), "num_shots": num_shots, "seed": seed}
            try:
                atomic_write_text(path, split_json_text({"train": train, "val": val}, header))
            except WriteError as err:  # the cache only saves a draw that the seed repeats exactly
                warnings.warn(f"few-shot split cache {path} cannot be written ({err.reason}); continuing without "
                              "it (the same subset is drawn from the seed next time)", stacklevel=2)
    return replace(splits, train=train, val=val, test=list(splits.test))


def data_key(splits: DatasetSplits) -> str:
    """Fingerprint of the train and val items a few-shot subset is drawn from.

    Built from the relative paths, labels and class names in order (the draw depends on that order),
    never from the image root, so moving or renaming the dataset folder keeps it.
    """
    digest = hashlib.sha256()
    for split in ("train", "val"):
        text = "".join(f"{split}\t{d.path}\t{d.label}\t{d.classname}\n" for d in splits.split(split))
        digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def _read_cache(
    path: Path, splits: DatasetSplits, num_shots: int, seed: int
) -> tuple[list[Datum], list[Datum]]:
    hint = f"delete {path} to sample the subset again"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: bad JSON or a huge int
        raise DataError(f"cannot read few-shot cache {path}: {err}; {hint}") from err
    if not isinstance(raw, dict):
        raise DataProblems(
            path, ["expected a JSON object with keys dataset, num_shots, seed, train, val"], hint
        )
    # The dataset name is not compared: a custom folder's name changes when the folder is renamed.
    expected = {"num_shots": num_shots, "seed": seed}
    problems = [
        f"{key} is {raw.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if raw.get(key) != value
    ]
    # Caches written before the key existed are still checked item by item below.
    key = data_key(splits) if "data" in raw else None
    if key is not None and raw["data"] != key:
        problems.append(
            f"it was drawn from other train/val data (data key {raw['data']!r}, the dataset's is "
            f"{key!r}): images or classes were added, removed or relabelled since"
        )
    parts: dict[str, list[Datum]] = {}
    for split in ("train", "val"):
        parts[split], bad = parse_entries(raw.get(split), split)
        problems.extend(bad)
        known = set(splits.split(split))
        problems.extend(
            f"{split}[{i}]: {d.path!r} (label {d.label}, {d.classname!r}) "
            f"is not in the dataset's {split} split"
            for i, d in enumerate(parts[split])
            if d not in known
        )
    if problems:
        raise DataProblems(path, problems, hint)
    return parts["train"], parts["val"]
