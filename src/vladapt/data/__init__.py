"""Datasets, split files, few-shot sampling, base/new subsets and the dataset checker.

Entry point: ``load_dataset(name, root)`` with a name from ``list_datasets()``: the 15 benchmark
datasets of the CoOp protocol (spec/METHODS.md §5.1) and the custom readers ``folder``, ``csv`` and
``json`` (see :mod:`vladapt.data.custom`). ``ImageDataset`` is imported lazily so that listing or
checking data does not import torch.
"""

from __future__ import annotations

# Importing the reader modules registers their datasets.
from vladapt.data import imagenet, readers  # noqa: F401
from vladapt.data.base import (
    DatasetSplits,
    Datum,
    list_datasets,
    load_dataset,
    register_dataset,
)
from vladapt.data.check import CheckReport, check_dataset, format_report, require_images
from vladapt.data.custom import CUSTOM_DATASETS, load_custom
from vladapt.data.fewshot import fewshot_splits, sample_fewshot
from vladapt.data.subsample import subsample_classes

__all__ = [
    "CUSTOM_DATASETS",
    "CheckReport",
    "DatasetSplits",
    "Datum",
    "ImageDataset",
    "check_dataset",
    "fewshot_splits",
    "format_report",
    "list_datasets",
    "load_custom",
    "load_dataset",
    "register_dataset",
    "require_images",
    "sample_fewshot",
    "subsample_classes",
]


def __getattr__(name: str) -> object:
    if name == "ImageDataset":
        from vladapt.data.dataset import ImageDataset

        return ImageDataset
    raise AttributeError(f"module 'vladapt.data' has no attribute {name!r}")
