"""Training-step class subsets ("negative sampling", METHODS.md §1.6 and §1.9).

Instead of a classifier over all ``C`` training classes, a step uses the classes present in the
batch plus a random set of absent ("negative") classes, and the batch labels are re-indexed into
that subset.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_step_classes(labels: Tensor, num_classes: int, ratio: int, batch_size: int,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Pick the classes of one training step and re-index the labels.

    Active only if ``ratio >= 0`` and ``num_classes > batch_size`` (the configured batch size);
    otherwise all classes are used and the labels are returned unchanged. When active:

    * ``P`` = the sorted unique labels of the batch;
    * negatives = a uniformly random subset, without replacement and in random order, of the
      classes not in ``P``, of size ``min(num_classes - |P|, ratio * |P|)`` (none for ``ratio == 0``);
    * ``class_ids = cat(P, negatives)`` and each label becomes its index in ``P``.

    Args:
        labels: ``LongTensor [B]`` of class ids in ``0..num_classes-1``.
        generator: a CPU ``torch.Generator`` for the negative draw; ``None`` uses the global RNG.

    Returns:
        ``(class_ids LongTensor [K], remapped_labels LongTensor [B])`` on ``labels``' device, with
        ``class_ids[remapped_labels] == labels``.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor, got shape {list(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    if ratio < 0 or num_classes <= batch_size:
        return torch.arange(num_classes, device=labels.device), labels
    positives = torch.unique(labels, sorted=True)
    absent = torch.ones(num_classes, dtype=torch.bool)
    absent[positives.cpu()] = False
    candidates = absent.nonzero().flatten()
    # A 1-D index keeps the single-candidate case a vector (the reference squeezes it to 0-d and crashes).
    order = torch.randperm(candidates.numel(), generator=generator)[: min(candidates.numel(), ratio * positives.numel())]
    class_ids = torch.cat([positives, candidates[order].to(labels.device)])
    return class_ids, torch.searchsorted(positives, labels)
