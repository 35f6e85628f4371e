"""Accuracy evaluation of a classifier over a data loader."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vladapt.engine.workers import unwrapped


@dataclass
class EvalResult:
    """Micro accuracy in percent (the field's headline number), plus macro-F1 and per-class counts."""

    accuracy: float
    correct: int
    total: int
    macro_f1: float
    per_class_correct: list[int] = field(default_factory=list)
    per_class_total: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _macro_f1(confusion: Tensor) -> float:
    tp = confusion.diag().float()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = confusion.sum(1) > 0
    return float(100.0 * f1[present].mean()) if present.any() else 0.0


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], loader: Iterable, num_classes: int,
             device: str | torch.device = "cpu", progress: bool = True, desc: str = "eval") -> EvalResult:
    """Run ``predict(images) -> logits [B, C]`` over ``loader`` yielding ``(images, labels)``."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    bar = tqdm(unwrapped(loader), desc=desc, disable=not progress, leave=False,
               total=len(loader) if hasattr(loader, "__len__") else None)
    correct = total = 0
    for images, labels in bar:
        logits = predict(images.to(device))
        if logits.shape[-1] != num_classes:
            raise ValueError(f"classifier gives {logits.shape[-1]} logits for {num_classes} classes")
        pred = logits.argmax(dim=-1).cpu()
        labels = labels.cpu()
        confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        correct += int((pred == labels).sum())
        total += int(labels.numel())
        bar.set_postfix(acc=f"{100.0 * correct / max(total, 1):.1f}")
    return EvalResult(
        accuracy=100.0 * correct / total if total else 0.0,
        correct=correct,
        total=total,
        macro_f1=_macro_f1(confusion),
        per_class_correct=confusion.diag().tolist(),
        per_class_total=confusion.sum(1).tolist(),
    )
