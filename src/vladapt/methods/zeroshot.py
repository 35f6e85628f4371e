"""Zero-shot CLIP: a frozen backbone and a text classifier built from class names and templates."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone
from vladapt.methods.classifier import ClassifierCache, build_text_classifier, weights_state
from vladapt.methods.registry import register_method
from vladapt.methods.templates import resolve_templates


@register_method("zeroshot", trainable=False)
class ZeroShotCLIP(nn.Module):
    """logits = exp(logit_scale) * normalize(f_img) @ W_text^T with the CLIP text classifier.

    Config keys: ``templates`` (``"dataset"`` = CoOp's per-dataset template (default), an ensemble
    name such as ``openai_imagenet``, a template string or a list) and ``dataset`` (which dataset's
    CoOp template to use).
    """

    defaults: dict[str, Any] = {"templates": "dataset", "dataset": None, "text_batch_size": 256}

    def __init__(self, backbone: Backbone, classnames: list[str], config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = {**self.defaults, **(config or {})}
        self.backbone = backbone
        self.clip = backbone.model
        self.templates = resolve_templates(self.config["templates"], self.config["dataset"])
        self.classnames = list(classnames)
        self._cache = ClassifierCache()
        self.progress = False

    def set_classnames(self, classnames: list[str]) -> None:
        self.classnames = list(classnames)

    def set_templates(self, templates: str | list[str]) -> None:
        self.templates = resolve_templates(templates, self.config["dataset"])

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def text_classifier(self) -> Tensor:
        """``[C, E]`` L2-normalized; recomputed only when class names, templates or weights change."""
        key = (tuple(self.classnames), tuple(self.templates), weights_state([self.clip]))
        return self._cache.get(key, lambda: build_text_classifier(
            self.clip.encode_text, self.backbone.tokenizer, self.classnames, self.templates,
            self.device, self.config["text_batch_size"], self.progress,
        ))

    def forward(self, images: Tensor) -> Tensor:
        w = self.text_classifier()
        f = F.normalize(self.clip.encode_image(images.to(self.device)).float(), dim=-1)
        return self.clip.logit_scale.exp().float() * f @ w.t()
