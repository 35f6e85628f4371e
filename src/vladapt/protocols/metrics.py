"""Accuracy, harmonic mean and the averages the protocols report (spec/METHODS.md §5.6-§5.8).

All values are percentages in [0, 100].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: Targets of cross-dataset transfer (trained on ImageNet); the reported average covers these only.
CROSS_DATASET_TARGETS = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)

#: Targets of domain generalization (trained on ImageNet); the reported average covers these only.
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")

#: Shot counts of the all-class few-shot protocol.
FEWSHOT_SHOTS = (1, 2, 4, 8, 16)


def accuracy(correct: int, total: int) -> float:
    """Micro accuracy in percent: ``100 * correct / total`` over a whole test split."""
    if total <= 0:
        raise ValueError(f"accuracy needs at least one test item, got total={total}")
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be in 0..total, got correct={correct}, total={total}")
    return 100.0 * correct / total


def harmonic_mean(base: float, new: float) -> float:
    """``2 * base * new / (base + new)``; 0 when both are 0."""
    if base < 0 or new < 0:
        raise ValueError(f"accuracies must be >= 0, got base={base}, new={new}")
    if base + new == 0:
        return 0.0
    return 2.0 * base * new / (base + new)


def average(values: Iterable[float]) -> float:
    """Arithmetic mean, e.g. over the 10 cross-dataset or the 4 DG targets."""
    values = list(values)
    if not values:
        raise ValueError("cannot average an empty list of accuracies")
    return sum(values) / len(values)


def average_base_new(rows: Iterable[Mapping[str, float] | tuple[float, float]]) -> dict[str, float]:
    """Dataset-average row of a base-to-new table.

    ``rows`` holds one ``{"base": B, "new": N}`` mapping or ``(B, N)`` pair per dataset. Returns
    ``{"base": mean B, "new": mean N, "hm_of_means": HM(mean B, mean N), "mean_of_hms": mean of the
    per-dataset HMs}``. ``hm_of_means`` is the CoCoOp convention and the number to compare with;
    ``mean_of_hms`` is what some papers print instead.
    """
    pairs = [(row["base"], row["new"]) if isinstance(row, Mapping) else tuple(row) for row in rows]
    if not pairs:
        raise ValueError("average_base_new needs at least one (base, new) row")
    base = average(b for b, _ in pairs)
    new = average(n for _, n in pairs)
    return {
        "base": base,
        "new": new,
        "hm_of_means": harmonic_mean(base, new),
        "mean_of_hms": average(harmonic_mean(b, n) for b, n in pairs),
    }
