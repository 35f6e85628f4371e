"""Accuracy, harmonic mean and protocol averages, checked against published numbers."""

from __future__ import annotations

import pytest

from vladapt.protocols import (
    CROSS_DATASET_TARGETS,
    DG_TARGETS,
    FEWSHOT_SHOTS,
    accuracy,
    average,
    average_base_new,
    harmonic_mean,
)

# CoOp's per-dataset Base/New (spec/METHODS.md §4.13), ImageNet first.
COOP_BASE_NEW = [
    (76.47, 67.88), (98.00, 89.81), (93.67, 95.29), (78.12, 60.40), (97.60, 59.67), (88.33, 82.26),
    (40.44, 22.30), (80.60, 65.89), (79.44, 41.18), (92.19, 54.74), (84.69, 56.05),
]  # fmt: skip


def test_accuracy_is_micro_percent() -> None:
    assert accuracy(3, 4) == 75.0
    assert accuracy(0, 7) == 0.0
    with pytest.raises(ValueError, match="at least one test item"):
        accuracy(0, 0)
    with pytest.raises(ValueError, match=r"correct must be in 0\.\.total"):
        accuracy(5, 4)


def test_harmonic_mean() -> None:
    assert round(harmonic_mean(84.52, 77.36), 2) == 80.78
    assert harmonic_mean(50.0, 50.0) == 50.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(80.0, 0.0) == 0.0


def test_base_new_average_reports_both_conventions() -> None:
    result = average_base_new(COOP_BASE_NEW)
    # CoOp's average row as published: 82.69 / 63.22 / 71.66 (HM of the means).
    assert {k: round(v, 2) for k, v in result.items()} == {
        "base": 82.69, "new": 63.22, "hm_of_means": 71.66, "mean_of_hms": 70.83
    }  # fmt: skip
    as_dicts = average_base_new([{"base": b, "new": n} for b, n in COOP_BASE_NEW])
    assert as_dicts == result


def test_cross_dataset_and_dg_averages() -> None:
    coop_xd = [93.70, 89.14, 64.51, 68.71, 85.30, 18.47, 64.15, 41.92, 46.39, 66.55]
    assert len(coop_xd) == len(CROSS_DATASET_TARGETS) == 10
    assert round(average(coop_xd), 2) == 63.88
    coop_dg = [64.20, 47.99, 49.71, 75.21]
    assert len(coop_dg) == len(DG_TARGETS) == 4
    assert round(average(coop_dg), 2) == 59.28
    with pytest.raises(ValueError, match="empty"):
        average([])


def test_protocol_constants() -> None:
    assert "imagenet" not in CROSS_DATASET_TARGETS
    assert DG_TARGETS == ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert FEWSHOT_SHOTS == (1, 2, 4, 8, 16)
