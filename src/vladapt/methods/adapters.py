"""Shared plumbing of the methods whose trainable modules sit at the backbone's insertion points.

HeBA, MMA, RMAdapter and LwEIB differ only in the module they put at each point, the scale they use
and their loss. Everything else lives here once:

* building one module per selected insertion point (:func:`build_point_modules`, keyed by
  :func:`adapter_key`) and attaching them only while the method computes (:meth:`AdapterMethod.attached`),
  so other methods built on the same backbone see the frozen CLIP;
* per-forward, per-(tower, block) scales: a fixed evaluation scale or the slow/fast stochastic scale
  (:class:`SlowFastScale`) drawn from the step's generator;
* the text side: a per-class prompt bank (one prompt per class, or CuPL descriptions), the step's
  class subset (negative sampling) with one random prompt per class, and the evaluation classifier
  (template-averaged adapted text features) cached until the classes, the weights or the scale change;
* the standard training step: ``exp(logit_scale) * cos(image, text)`` logits, cross-entropy with
  optional label smoothing, plus whatever extra loss terms a method adds (:meth:`AdapterMethod.extra_losses`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import CLIPModel, ForwardContext, InsertionPoint
from vladapt.errors import ConfigError
from vladapt.methods.base import Method, StepInfo, StepOutput
from vladapt.methods.classifier import ClassifierCache, template_averaged_classifier, weights_state
from vladapt.methods.negatives import sample_step_classes
from vladapt.methods.prompts import PromptBank, load_description_bank

TOWER_NAMES: tuple[str, ...] = ("visual", "text")


# --------------------------------------------------------------------------- point modules
def adapter_key(point: InsertionPoint) -> str:
    """ModuleDict key of a point (dots are not allowed in module names): ``visual_blocks_0_attn_in``."""
    return point.name.replace(".", "_")


def check_towers(towers: Iterable[str]) -> None:
    for tower in towers:
        if tower not in TOWER_NAMES:
            raise ConfigError(f"unknown tower {tower!r}; choose from {list(TOWER_NAMES)}")


def block_range(model: CLIPModel, tower: str, start: int, end: int | None, what: str) -> list[int]:
    """0-based block indices of the **1-based** inclusive range ``start..end`` (``end=None``: the
    tower's last block), checked against the tower's depth."""
    n = model.num_layers(tower)
    end = n if end is None else end
    if not 1 <= start <= end <= n:
        raise ConfigError(f"{what} layers are 1-based block indices; the {tower} tower has blocks 1..{n}, "
                          f"not {start}..{end}")
    return list(range(start - 1, end))


def build_point_modules(model: CLIPModel, towers: Sequence[str], layers: dict[str, list[int]],
                        kinds: Sequence[str], make: Callable[[InsertionPoint], nn.Module]) -> nn.ModuleDict:
    """One ``make(point)`` per insertion point of ``kinds`` in the 0-based ``layers[tower]`` blocks,
    keyed by :func:`adapter_key`, in tower / block / kind order. Each module must keep its point as
    ``module.point`` (that is where :func:`attach_modules` puts it)."""
    check_towers(towers)
    modules = nn.ModuleDict()
    for tower in dict.fromkeys(towers):
        for point in model.insertion_points(tower, layers=layers[tower]):
            if point.kind in kinds:
                module = make(point)
                module.point = point
                modules[adapter_key(point)] = module
    return modules


def attach_modules(model: CLIPModel, modules: Iterable[nn.Module]) -> None:
    """Attach every module at its ``module.point``; all or nothing (on a conflict nothing stays attached)."""
    done: list[InsertionPoint] = []
    modules = modules.values() if isinstance(modules, nn.ModuleDict) else modules
    try:
        for module in modules:
            model.attach(module.point, module)
            done.append(module.point)
    except Exception:
        for point in done:
            model.detach(point)
        raise


def detach_modules(model: CLIPModel, modules: Iterable[nn.Module]) -> None:
    """Detach these modules; modules other methods attached at other (or the same) points stay."""
    attached = model.attached_modules()
    modules = modules.values() if isinstance(modules, nn.ModuleDict) else modules
    for module in modules:
        if attached.get(module.point.name) is module:
            model.detach(module.point)


# --------------------------------------------------------------------------- scales
class SlowFastScale:
    """HeBA/LwEIB's stochastic scale, a ``scale_fn(tower, layer) -> float`` for :class:`ForwardContext`.

    In training every call draws ``u ~ U(0, 1)`` and returns ``base * factor`` ("fast") if
    ``u > ratio`` else ``base`` ("slow"), so ``P(fast) = 1 - ratio``. :class:`ForwardContext` calls it
    once per (tower, block) per forward pass, so both adapters of a block share the draw. With
    ``training = False`` it returns ``base`` without drawing.

    ``generator`` is a ``torch.Generator`` (CPU) or a ``random.Random``; ``None`` uses torch's global RNG.
    """

    def __init__(self, base: float = 0.025, factor: float = 2.25, ratio: float = 0.8,
                 generator: torch.Generator | random.Random | None = None, training: bool = True) -> None:
        if base < 0 or factor <= 0 or not 0.0 <= ratio <= 1.0:
            raise ConfigError(
                f"slow-fast scale needs base >= 0, factor > 0 and 0 <= ratio <= 1; got base={base}, "
                f"factor={factor}, ratio={ratio}"
            )
        self.base = float(base)
        self.factor = float(factor)
        self.ratio = float(ratio)
        self.generator = generator
        self.training = training

    def draw(self) -> float:
        """One ``u ~ U(0, 1)`` from the generator."""
        if isinstance(self.generator, random.Random):
            return self.generator.random()
        return float(torch.rand((), generator=self.generator))

    def __call__(self, tower: str, layer: int) -> float:
        if not self.training:
            return self.base
        return self.base * self.factor if self.draw() > self.ratio else self.base

    def __repr__(self) -> str:
        return (f"SlowFastScale(base={self.base}, factor={self.factor}, ratio={self.ratio}, "
                f"training={self.training})")


def fixed_scale(scale: float) -> Callable[[str, int], float]:
    return lambda tower, layer: scale


# --------------------------------------------------------------------------- the method base
@dataclass
class StepTensors:
    """What :meth:`AdapterMethod.extra_losses` may use: the step's inputs and adapted features."""

    images: Tensor              # [B, 3, H, W]
    tokens: Tensor              # [K, L] the prompt of each class of the step
    class_ids: Tensor           # [K] indices into the method's class names
    templates: Tensor           # [K] the prompt (template) index of each class
    image_features: Tensor      # [B, E] L2-normalized, fp32
    text_features: Tensor       # [K, E] L2-normalized, fp32
    raw_image_features: Tensor  # [B, E] before normalization, fp32
    raw_text_features: Tensor   # [K, E] before normalization, fp32
    context: ForwardContext


class AdapterMethod(Method):
    """A method made of modules at insertion points plus the adapted text encoder as classifier.

    Subclasses build ``self.adapters`` (:func:`build_point_modules`) in ``__init__`` and may override:

    * :meth:`train_scale_fn` (default: ``None``, every module uses its own scale),
    * :meth:`eval_scale` (default: ``None``, idem),
    * :meth:`extra_losses` (default: none) for loss terms beyond the cross-entropy,
    * :attr:`truncate_text` (default: ``True``) when its text modules mix later token positions into
      earlier ones.

    Config fields read when present (with these defaults otherwise): ``neg_sampling_ratio`` (-1: all
    classes), ``label_smoothing`` (0), ``text_prefix`` ("a photo of a"), ``descriptions`` (None),
    ``strict_descriptions`` (True), ``reference_prompts`` (False), ``text_batch_size`` (256).
    """

    trainable = True
    adapters: nn.ModuleDict
    # The text tower may run only up to the longest prompt's EOT: exact as long as no attached module
    # mixes a later token position into an earlier one. A method whose text modules look ahead
    # (LwEIB's symmetric 1-D convolution along the tokens) sets it to False.
    truncate_text: bool = True

    def __init__(self, backbone, classnames: list[str], config: Any = None) -> None:
        super().__init__(backbone, classnames, config)
        path = self._cfg("descriptions", None)
        self._descriptions = load_description_bank(path) if path else None
        self._cache = ClassifierCache()
        self._build_bank()

    def _cfg(self, name: str, default: Any) -> Any:
        return getattr(self.config, name, default)

    def point_modules(self) -> list[nn.Module]:
        """Every module this method attaches (default: ``self.adapters``)."""
        return list(self.adapters.values())

    @contextmanager
    def attached(self):
        """The modules sit at their insertion points only while this method computes."""
        modules = self.point_modules()
        attach_modules(self.clip, modules)
        try:
            yield
        finally:
            detach_modules(self.clip, modules)

    # ------------------------------------------------------------------ prompts
    def _build_bank(self) -> None:
        self.bank = PromptBank.build(self.classnames, self._descriptions, prefix=self._cfg("text_prefix", "a photo of a"),
                                     reference_fallback=self._cfg("reference_prompts", False),
                                     strict=self._cfg("strict_descriptions", True))
        self._bank_version = getattr(self, "_bank_version", 0) + 1  # the classifier caches' key
        flat = [p for per_class in self.bank.prompts for p in per_class]
        tokens = self.backbone.tokenizer(flat)
        self._tokens = tokens.view(self.bank.num_classes, self.bank.num_templates, -1)  # [C, T, L]

    def set_classnames(self, classnames: list[str], dataset: str | None = None, split: str | None = None) -> None:
        changed = list(classnames) != self.classnames
        super().set_classnames(classnames, dataset, split)
        if changed:
            self._build_bank()

    def prompt_source(self) -> str:
        return ("descriptions" if self._descriptions is not None
                else "reference fallback prompt" if self._cfg("reference_prompts", False) else "single prompt")

    # ------------------------------------------------------------------ scales
    def train_scale_fn(self, generator: torch.Generator | None) -> Callable[[str, int], float] | None:
        return None

    def eval_scale(self) -> float | None:
        return None

    def eval_context(self) -> ForwardContext:
        scale = self.eval_scale()
        return ForwardContext(None if scale is None else fixed_scale(scale))

    # ------------------------------------------------------------------ training
    def step_classes(self, step: StepInfo) -> tuple[Tensor, Tensor]:
        """``(class_ids [K], labels of the global batch re-indexed into class_ids)``."""
        return sample_step_classes(step.global_labels.cpu(), len(self.classnames),
                                   self._cfg("neg_sampling_ratio", -1), step.batch_size, step.generator)

    def training_step(self, images: Tensor, labels: Tensor, step: StepInfo | None = None) -> StepOutput:
        step = step if step is not None else StepInfo(0, 0, None, labels.cpu(), slice(0, len(labels)), len(labels))
        gen = step.generator
        class_ids, remapped = self.step_classes(step)
        y = remapped[step.local].to(self.device)
        templates = torch.randint(self.bank.num_templates, (len(class_ids),), generator=gen)
        tokens = self._tokens[class_ids, templates].to(self.device)
        ctx = ForwardContext(self.train_scale_fn(gen))
        with self.attached():
            raw_text = self.clip.encode_text(tokens, ctx, truncate=self.truncate_text).float()
            raw_image = self.clip.encode_image(images, ctx).float()
        text, image = F.normalize(raw_text, dim=-1), F.normalize(raw_image, dim=-1)
        logits = self.clip.logit_scale.exp().float() * image @ text.t()
        ce = F.cross_entropy(logits, y, label_smoothing=self._cfg("label_smoothing", 0.0))
        terms = self.extra_losses(StepTensors(images, tokens, class_ids, templates, image, text, raw_image, raw_text,
                                              ctx))
        loss = ce
        for value in terms.values():
            loss = loss + value
        extras = {"ce": float(ce.detach()), **{k: float(v.detach()) for k, v in terms.items()}} if terms else None
        return StepOutput(loss=loss, logits=logits, labels=y, extras=extras, context=ctx)

    def extra_losses(self, t: StepTensors) -> dict[str, Tensor]:
        """Weighted loss terms added to the cross-entropy (names -> scalar tensors)."""
        return {}

    # ------------------------------------------------------------------ inference
    def _compute_text_classifier(self) -> Tensor:
        ctx = self.eval_context()
        token_sets = (self._tokens[:, t] for t in range(self.bank.num_templates))
        truncate = self.truncate_text
        with self.attached():
            return template_averaged_classifier(lambda tokens: self.clip.encode_text(tokens, ctx, truncate=truncate),
                                                token_sets, self.device, self._cfg("text_batch_size", 256),
                                                self.progress, total=self.bank.num_templates)

    def text_classifier(self) -> Tensor:
        """``[C, E]``: per template the adapted text features, L2-normalized, averaged, normalized."""
        key = (self._bank_version, self.eval_scale(), weights_state([self]))
        return self._cache.get(key, self._compute_text_classifier)

    def image_features(self, images: Tensor) -> Tensor:
        """Adapted image features ``[B, E]``, L2-normalized, fp32."""
        with self.attached():
            return F.normalize(self.clip.encode_image(images.to(self.device), self.eval_context()).float(), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        w = self.text_classifier()
        return self.clip.logit_scale.exp().float() * self.image_features(images) @ w.t()

    def evaluation_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"templates": self.bank.num_templates, "prompts": self.prompt_source()}
        if self.eval_scale() is not None:
            info = {"eval_scale": self.eval_scale(), **info}
        return info
