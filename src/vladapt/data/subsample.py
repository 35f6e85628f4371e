"""Base/new class split of the base-to-new protocol (spec/METHODS.md §5.4)."""

from __future__ import annotations

import math
from dataclasses import replace

from vladapt.data.base import DatasetSplits, Datum
from vladapt.errors import ConfigError, DataError

SUBSETS = ("all", "base", "new")


def base_new_labels(train: list[Datum]) -> tuple[list[int], list[int]]:
    """``(base, new)`` original labels: the sorted train labels cut at ``ceil(n / 2)``."""
    labels = sorted({d.label for d in train})
    m = math.ceil(len(labels) / 2)
    return labels[:m], labels[m:]


def subsample_classes(splits: DatasetSplits, which: str) -> DatasetSplits:
    """Restrict every split to the base or new half of the classes and relabel it 0..|half|-1.

    The halves are computed from the labels present in ``splits.train`` (run this after few-shot
    sampling, as the reference does); base gets the extra class when their number is odd. Items of
    the other half are dropped from train, val and test; ``classnames`` keeps the chosen half in
    sorted label order. ``which="all"`` returns ``splits`` unchanged (as a copy).
    """
    if which not in SUBSETS:
        raise ConfigError(f"unknown class subset {which!r}; allowed: {', '.join(SUBSETS)}")
    if which == "all":
        return replace(splits, train=list(splits.train), val=list(splits.val), test=list(splits.test))
    if not splits.train:
        raise DataError(
            f"dataset {splits.name!r} has no train split, so it has no base/new classes; use 'all'"
        )
    base, new = base_new_labels(splits.train)
    chosen = base if which == "base" else new
    relabel = {old: new_label for new_label, old in enumerate(chosen)}

    def keep(items: list[Datum]) -> list[Datum]:
        return [Datum(d.path, relabel[d.label], d.classname) for d in items if d.label in relabel]

    return replace(
        splits,
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        classnames=[splits.classnames[label] for label in chosen],
    )
