"""The interface every method implements.

A method owns its trainable modules (attached to the frozen backbone's insertion points), its
training step and its inference classifier. Protocols and the engine only use this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vladapt.backbones import Backbone
from vladapt.config import from_mapping, to_dict


@dataclass
class StepOutput:
    """What one training step returns: the loss to minimize, and logits/labels for running accuracy."""

    loss: Tensor
    logits: Tensor | None = None
    labels: Tensor | None = None
    extras: dict[str, float] | None = None
    # The forward context of the step (the scales drawn per (tower, block), auxiliary losses),
    # for inspection and tests.
    context: Any = None


class Method(nn.Module):
    """Base class: ``forward(images) -> logits [B, C]`` over the current class names.

    Subclasses set ``Config`` (a dataclass; ``config=None`` means its defaults, the method's
    base-to-new configuration) and ``trainable``.
    """

    Config: ClassVar[type]
    trainable: ClassVar[bool] = False
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

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def set_classnames(self, classnames: list[str], dataset: str | None = None, split: str | None = None) -> None:
        """Work over ``classnames`` from now on. ``dataset`` names the data they come from (for methods
        whose prompts depend on it); ``split`` says what they are: "train", "base", "new" or "all"
        (e.g. for a method with a separate evaluation setting for new classes)."""
        self.classnames = list(classnames)
        if dataset is not None:
            self.dataset = dataset
        self.split = split

    def evaluation_info(self) -> dict[str, Any]:
        """Settings that produced the next evaluation's numbers (stored next to them in results)."""
        return {}

    def training_step(self, images: Tensor, labels: Tensor, step: Any = None) -> StepOutput:
        """One step's loss on a batch ``images [B, 3, H, W]``, ``labels [B]`` indexing ``classnames``;
        ``step`` is the engine's :class:`~vladapt.engine.train.StepInfo` (randomness, global labels)."""
        raise NotImplementedError(f"{type(self).__name__} is training-free")

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trainable weights (what a checkpoint holds)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach() for k, v in self.state_dict().items() if k in names}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def describe(self) -> dict[str, Any]:
        return {"config": to_dict(self.config), "trainable_parameters": self.num_trainable_parameters()}
