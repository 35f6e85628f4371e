"""The contract every method implements, and the only one the engine and the protocols use.

Lifecycle of one run::

    method = create_method(name, backbone, classnames, config)   # build
    method.set_classnames(train classes, dataset=..., split="train")
    method.prepare(train_splits, features)    # fit training-free parts (caches, class statistics, ...)
    optimizer over method.param_groups()      # per-group lr scale / weight decay
    for each epoch:
        for each step: method.training_step(images, labels, StepInfo) -> StepOutput (loss, ...)
        method.on_epoch_end(epoch)
    method.checkpoint_state() -> tensors      # everything needed to predict, loaded back with
    method.load_checkpoint_state(tensors)     #   load_checkpoint_state
    method.set_classnames(eval classes, split="base" | "new" | "all"); method(images) -> logits

A method is trainable when it has trainable parameters after ``prepare`` (``Method.trainable`` says
whether it expects training at all: training-free methods only ``prepare``). Nothing outside the
method reads its backbone internals: what the engine needs (the run's storage dtype, the backbone's
name and fingerprint, the train transform) is on :class:`Method` and :class:`~vladapt.backbones.Backbone`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone
from vladapt.config import from_mapping, to_dict


@dataclass
class StepInfo:
    """What a method's training step may use besides its shard of the batch.

    ``generator`` is the only source of randomness a method should draw from (the engine derives it
    from (seed, epoch, step)); ``global_labels`` are the labels of the whole global batch (all
    processes), of which this process holds the slice ``local``: class subsets chosen from them are
    identical in every process. ``batch_size`` is the configured (global) batch size.
    """

    epoch: int
    step: int
    generator: torch.Generator
    global_labels: Tensor
    local: slice
    batch_size: int

    @classmethod
    def single(cls, labels: Tensor, seed: int = 0, epoch: int = 0, step: int = 0) -> "StepInfo":
        """A one-process step over ``labels`` with a generator seeded by ``seed`` (tests, scripts)."""
        return cls(epoch, step, torch.Generator().manual_seed(seed), labels.cpu(), slice(0, len(labels)),
                   len(labels))


@dataclass
class StepOutput:
    """What one training step returns: the loss to minimize, logits/labels for running accuracy,
    the values of the loss terms (``extras``) and the step's forward context (the scales drawn per
    (tower, block), auxiliary losses) for inspection."""

    loss: Tensor
    logits: Tensor | None = None
    labels: Tensor | None = None
    extras: dict[str, float] | None = None
    context: Any = None


class FeatureSource(Protocol):
    """Frozen-backbone image features of a split, given to :meth:`Method.prepare`."""

    def image_features(self, split: str = "train", augment_passes: int = 0, normalize: bool = True,
                       crop_scale: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
        """``(features [N, E] L2-normalized fp32, labels [N])``; ``augment_passes > 0`` averages the
        features of that many seeded training augmentations of each image (Tip-Adapter's cache), with
        random crops over ``crop_scale`` of the image area (default: the backbone's training transform,
        8-100%); ``normalize=False``: the image encoder's raw outputs (averaged over the passes)."""
        ...


class Method(nn.Module):
    """Base class: ``forward(images) -> logits [B, C]`` over the current class names.

    Subclasses set ``Config`` (a dataclass; ``config=None`` means its defaults, the method's
    base-to-new configuration) and ``trainable`` (whether the method is trained by the engine).
    """

    Config: ClassVar[type]
    trainable: ClassVar[bool] = False
    # A feature-level method learns from frozen image features only: its training step is
    # feature_step(frozen_image_features(images), ...), so the engine may hand it cached features.
    feature_level: ClassVar[bool] = False
    # False for methods whose classifier exists only for the classes they were fitted on (a cache, a
    # linear probe): they run the fewshot protocol; base-to-new and transfer need unseen classes.
    unseen_classes: ClassVar[bool] = True
    registry_name: ClassVar[str] = ""  # set by @register_method

    def __init__(self, backbone: Backbone, classnames: list[str], config: Any = None) -> None:
        super().__init__()
        if config is None or isinstance(config, dict):
            config = from_mapping(self.Config, config or {}, "method.")
        self.config = config
        self.backbone = backbone
        self.clip = backbone.model
        self.classnames = list(classnames)
        self.dataset: str | None = None
        self.split: str | None = None
        self.progress = False

    def train(self, mode: bool = True) -> "Method":
        """Train or eval mode for the method's own modules; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ facts for the engine
    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def backbone_dtype(self) -> torch.dtype:
        """Storage dtype of the frozen backbone (the engine's ``precision=auto`` follows it)."""
        return self.clip.dtype

    def set_classnames(self, classnames: list[str], dataset: str | None = None, split: str | None = None) -> None:
        """Work over ``classnames`` from now on. ``dataset`` names the data they come from (for methods
        whose prompts depend on it); ``split`` says what they are: "train", "base", "new" or "all"
        (e.g. for a method with a separate evaluation setting for new classes)."""
        self.classnames = list(classnames)
        if dataset is not None:
            self.dataset = dataset
        self.split = split

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, train: Any, features: FeatureSource | None = None) -> None:
        """Called once before training (and instead of it for training-free methods) with the
        training splits (``DatasetSplits``: few-shot train and val of the training classes) and a
        source of frozen image features. Default: nothing to fit."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups. Each is a dict with ``params`` and optionally ``lr_scale``
        (multiplies the scheduled learning rate) and ``weight_decay`` (overrides the configured one,
        e.g. 0 for scalars such as a curvature or a logit scale). Default: every trainable parameter
        in one group."""
        params = self.trainable_parameters()
        return [{"params": params}] if params else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def training_step(self, images: Tensor, labels: Tensor, step: StepInfo | None = None) -> StepOutput:
        """One step's loss on a batch ``images [B, 3, H, W]``, ``labels [B]`` indexing ``classnames``.

        Feature-level methods need not override it: it is :meth:`feature_step` on the frozen features."""
        if self.feature_level:
            return self.feature_step(self.frozen_image_features(images), labels, step)
        raise NotImplementedError(f"{type(self).__name__} is training-free")

    def frozen_image_features(self, images: Tensor) -> Tensor:
        """The frozen image encoder's features of ``images``, L2-normalized, fp32, without gradient
        (the same values :class:`~vladapt.engine.features.FrozenFeatures` caches)."""
        with torch.no_grad():
            return F.normalize(self.clip.encode_image(images.to(self.device)).float(), dim=-1)

    def feature_step(self, features: Tensor, labels: Tensor, step: StepInfo | None = None) -> StepOutput:
        """Feature-level methods: one step's loss on frozen image features ``[B, E]`` (L2-normalized, fp32)."""
        raise NotImplementedError(f"{type(self).__name__} does not train on frozen features")

    def feature_logits(self, features: Tensor) -> Tensor:
        """Feature-level methods: logits ``[B, C]`` from frozen image features ``[B, E]`` (L2-normalized, fp32)."""
        raise NotImplementedError(f"{type(self).__name__} does not classify frozen features")

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, C]`` over the current class names (feature-level methods: :meth:`feature_logits`
        of the frozen features)."""
        if self.feature_level:
            return self.feature_logits(self.frozen_image_features(images))
        raise NotImplementedError(f"{type(self).__name__} defines no forward")

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each training epoch (0-based ``epoch``), e.g. for running averages."""

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Everything needed to predict: the trainable weights and the buffers registered with
        :meth:`register_state_buffer` (a cache, a learned statistic), detached."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        names |= set(self._state_buffer_names())
        return {k: v.detach() for k, v in self.state_dict().items() if k in names}

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`checkpoint_state`; the key sets must be equal (``ValueError`` otherwise)."""
        own = self.checkpoint_state()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"missing {missing[:3]}, unexpected {extra[:3]}")
        for name in self._state_buffer_names():  # buffers may change shape (e.g. a cache of N images)
            self._set_buffer(name, state[name])
        result = self.load_state_dict(state, strict=False)
        assert not result.unexpected_keys

    def register_state_buffer(self, name: str, tensor: Tensor | None) -> None:
        """A buffer that belongs in the checkpoint (``name`` may not contain dots)."""
        self.register_buffer(name, tensor)
        self.__dict__.setdefault("_checkpoint_buffers", []).append(name)

    def _state_buffer_names(self) -> list[str]:
        return [n for n in self.__dict__.get("_checkpoint_buffers", []) if getattr(self, n) is not None]

    def _set_buffer(self, name: str, value: Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value.to(device=old.device if old is not None else self.device))

    # ------------------------------------------------------------------ compatibility and reports
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights (what a checkpoint holds besides registered state buffers)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach() for k, v in self.state_dict().items() if k in names}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def evaluation_info(self) -> dict[str, Any]:
        """Settings that produced the next evaluation's numbers (stored next to them in results)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"config": to_dict(self.config), "trainable_parameters": self.num_trainable_parameters()}

