"""Accuracy evaluation of a classifier over a data loader, of one method or of several at once.

:func:`evaluate_many` evaluates several methods (checkpoints) on one test set and computes the frozen
blocks in front of each method's first adapted block of the image tower once per image, not once per
method (a shared prefix): MMA and RMAdapter adapt blocks 5..12 of ViT-B/16, so four of them share
blocks 1..4. Each method still runs its own adapted suffix, with the numbers :func:`evaluate` gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vladapt.data.workers import unwrapped
from vladapt.errors import BackboneError


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


class _Tally:
    """Confusion counts of one classifier over the batches seen so far."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.correct = self.total = 0

    def add(self, logits: Tensor, labels: Tensor, name: str | None = None) -> None:
        if logits.shape[-1] != self.num_classes:
            who = f"{name!r} " if name is not None else ""
            raise ValueError(f"classifier {who}gives {logits.shape[-1]} logits for {self.num_classes} classes")
        pred = logits.argmax(dim=-1).cpu()
        labels = labels.cpu()
        self.confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        self.correct += int((pred == labels).sum())
        self.total += int(labels.numel())

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0

    def result(self) -> EvalResult:
        return EvalResult(
            accuracy=self.accuracy,
            correct=self.correct,
            total=self.total,
            macro_f1=_macro_f1(self.confusion),
            per_class_correct=self.confusion.diag().tolist(),
            per_class_total=self.confusion.sum(1).tolist(),
        )


def _bar(loader: Iterable, desc: str, progress: bool):
    return tqdm(unwrapped(loader), desc=desc, disable=not progress, leave=False,
                total=len(loader) if hasattr(loader, "__len__") else None)


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], loader: Iterable, num_classes: int,
             device: str | torch.device = "cpu", progress: bool = True, desc: str = "eval") -> EvalResult:
    """Run ``predict(images) -> logits [B, C]`` over ``loader`` yielding ``(images, labels)``."""
    tally = _Tally(num_classes)
    bar = _bar(loader, desc, progress)
    for images, labels in bar:
        tally.add(predict(images.to(device)), labels)
        bar.set_postfix(acc=f"{tally.accuracy:.1f}")
    return tally.result()


# --------------------------------------------------------------------------- shared frozen prefix
def _image_tower(method: Callable) -> torch.nn.Module | None:
    """The image tower a method runs on (its ``clip.visual``), or None for a callable without one."""
    clip = getattr(method, "clip", None)
    visual = getattr(clip, "visual", None)
    return visual if hasattr(visual, "start_at") else None


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def prefix_plan(methods: Mapping[str, Callable[[Tensor], Tensor]], images: Tensor) -> dict[str, int]:
    """The 0-based image-tower block at which each method's own computation starts (0: no shared prefix).

    Each method is probed with one forward on ``images[:1]`` (already on its device): the block is
    the lowest one that had a module attached during its forwards (the number of blocks when the
    method adapts none: the whole frozen tower can be shared). The probe then runs the method again
    from the frozen states entering that block and compares the logits; a method the shared prefix
    does not reproduce (it changes its input before the tower, calls the tower on other images, its
    modules act before the block) gets 0 and a warning, and is evaluated on images. A method without
    an image tower (a callable without ``clip``) gets 0.
    """
    plan: dict[str, int] = {}
    one = images[:1]
    for name, method in methods.items():
        visual = _image_tower(method)
        if visual is None:
            plan[name] = 0
            continue
        with visual.record_first_adapted() as seen:
            plain = method(one)
        # at most the last block: it runs in the suffix, where it computes only the CLS token
        block = min(min(seen), visual.num_layers - 1) if seen else 0
        if block > 0:
            reason = None
            try:
                states = visual.prefix_states(one, block)
                with visual.start_at(block, states):
                    shared = method(states)
                if not _same(plain, shared):
                    reason = "its logits from the shared prefix differ from its plain logits"
            except BackboneError as err:
                reason = str(err)
            if reason is not None:
                warnings.warn(f"evaluate_many: method {name!r} is evaluated without a shared prefix: {reason}",
                              stacklevel=2)
                block = 0
        plan[name] = block
    return plan


@torch.no_grad()
def predict_many(methods: Mapping[str, Callable[[Tensor], Tensor]], images: Tensor,
                 plan: Mapping[str, int]) -> dict[str, Tensor]:
    """Logits ``[B, C]`` of every method on ``images``, computing frozen image-tower blocks once.

    ``plan`` (:func:`prefix_plan`) gives each method's start block. Methods on one backbone share
    its frozen blocks: the states are advanced block range by block range, from the lowest start
    to the highest, and each method runs from its own start block (so a method starting at block 8
    reuses the states a method starting at block 4 was given, plus blocks 4..7). Start 0: the method
    is called on the images.
    """
    out: dict[str, Tensor] = {}
    groups: dict[int, list[str]] = {}
    for name, method in methods.items():
        if plan.get(name, 0) > 0:
            groups.setdefault(id(_image_tower(method)), []).append(name)
        else:
            out[name] = method(images)
    for names in groups.values():
        visual = _image_tower(methods[names[0]])
        states, reached = None, 0
        for name in sorted(names, key=lambda n: plan[n]):  # stable: methods of equal start keep their order
            block = plan[name]
            if block != reached or states is None:
                states = visual.prefix_states(images, block, states, reached)
                reached = block
            with visual.start_at(block, states):
                out[name] = methods[name](states)
    return {name: out[name] for name in methods}


@torch.no_grad()
def evaluate_many(methods: Mapping[str, Callable[[Tensor], Tensor]], loader: Iterable, num_classes: int,
                  device: str | torch.device = "cpu", progress: bool = True, desc: str = "eval",
                  plan: Mapping[str, int] | None = None) -> dict[str, EvalResult]:
    """:func:`evaluate` of every method in ``methods`` (name -> ``method(images) -> logits``) over one
    pass of ``loader``, with the frozen image-tower blocks in front of each method's first adapted
    block computed once per image (:func:`predict_many`). Returns ``{name: EvalResult}``, the results
    :func:`evaluate` gives per method.

    ``plan`` (name -> start block, :func:`prefix_plan`) is probed on the first batch when not given.
    Methods attach their modules only inside their forward (every vladapt method does), so several
    live on one backbone; methods on different backbones share within each backbone.
    """
    if not methods:
        raise ValueError("evaluate_many needs at least one method")
    tallies = {name: _Tally(num_classes) for name in methods}
    bar = _bar(loader, desc, progress)
    for images, labels in bar:
        images = images.to(device)
        if plan is None:
            plan = prefix_plan(methods, images)
        for name, logits in predict_many(methods, images, plan).items():
            tallies[name].add(logits, labels, name)
        bar.set_postfix(acc="/".join(f"{t.accuracy:.1f}" for t in tallies.values()))
    return {name: tally.result() for name, tally in tallies.items()}
