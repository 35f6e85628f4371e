"""Evaluation protocols of the field: base-to-new, cross-dataset, domain generalization, few-shot."""

from __future__ import annotations

from vladapt.protocols.metrics import (
    CROSS_DATASET_TARGETS,
    DG_TARGETS,
    FEWSHOT_SHOTS,
    accuracy,
    average,
    average_base_new,
    harmonic_mean,
)

__all__ = [
    "CROSS_DATASET_TARGETS",
    "DG_TARGETS",
    "FEWSHOT_SHOTS",
    "accuracy",
    "average",
    "average_base_new",
    "harmonic_mean",
]
