"""Base/new class halves: ceil split of the sorted train labels and re-indexing."""

from __future__ import annotations

from pathlib import Path

import pytest

from vladapt.data import DatasetSplits, Datum, fewshot_splits, subsample_classes
from vladapt.errors import ConfigError, DataError

NAMES = ["ant", "bee", "cat", "dog", "eel"]


def five_classes() -> DatasetSplits:
    def items(prefix: str, labels: list[int]) -> list[Datum]:
        return [Datum(f"{prefix}/{NAMES[y]}{i}.jpg", y, NAMES[y]) for i in range(2) for y in labels]

    # Train lists the labels out of order; the halves must still follow sorted label order.
    return DatasetSplits("five", Path("."), items("tr", [4, 2, 0, 3, 1]), items("va", [0, 1, 2, 3, 4]),
                         items("te", [1, 3, 4, 0, 2]), list(NAMES))  # fmt: skip


def test_base_takes_the_first_ceil_half_and_relabels() -> None:
    base = subsample_classes(five_classes(), "base")
    assert base.classnames == ["ant", "bee", "cat"]
    for part in (base.train, base.val, base.test):
        assert {d.classname for d in part} == {"ant", "bee", "cat"}
        assert all(base.classnames[d.label] == d.classname for d in part)
    assert [d.label for d in base.train] == [2, 0, 1, 2, 0, 1]  # original order kept, labels remapped


def test_new_takes_the_rest_relabelled_from_zero() -> None:
    new = subsample_classes(five_classes(), "new")
    assert new.classnames == ["dog", "eel"]
    assert [(d.path, d.label) for d in new.test] == [("te/dog0.jpg", 0), ("te/eel0.jpg", 1),
                                                     ("te/dog1.jpg", 0), ("te/eel1.jpg", 1)]  # fmt: skip


def test_halves_come_from_train_labels_only() -> None:
    splits = five_classes()
    # Without class 4 ("eel") in train, the four remaining train labels split 2/2 and eel is dropped.
    splits.train = [d for d in splits.train if d.label != 4]
    new = subsample_classes(splits, "new")
    assert new.classnames == ["cat", "dog"]
    assert "eel" not in {d.classname for d in new.test}


def test_all_is_an_unchanged_copy() -> None:
    splits = five_classes()
    everything = subsample_classes(splits, "all")
    assert everything == splits and everything.train is not splits.train


def test_after_fewshot_sampling() -> None:
    shots = fewshot_splits(five_classes(), 1, seed=1)
    base = subsample_classes(shots, "base")
    assert len(base.train) == 3 and len(base.test) == 6


def test_bad_subset_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown class subset 'novel'; allowed: all, base, new"):
        subsample_classes(five_classes(), "novel")


def test_test_only_dataset_has_no_halves() -> None:
    splits = five_classes()
    splits.train = []
    with pytest.raises(DataError, match=r"'five' has no train split"):
        subsample_classes(splits, "base")
