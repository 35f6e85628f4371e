"""Zero-shot CLIP: a frozen backbone and a text classifier built from class names and templates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

from vladapt.backbones import Backbone
from vladapt.methods.base import Method
from vladapt.methods.classifier import ClassifierCache, build_text_classifier, weights_state
from vladapt.methods.registry import register_method
from vladapt.methods.templates import resolve_templates


@dataclass
class ZeroShotConfig:
    templates: str | list[str] = field(
        default="dataset",
        metadata={"help": "'dataset' (CoOp's template of the dataset), an ensemble name "
                          "(openai_imagenet, simple_imagenet), one template with {} or a list"})
    dataset: str | None = field(default=None, metadata={"help": "whose CoOp template 'dataset' means"})
    text_batch_size: int = field(default=256, metadata={"min": 1})

    def validate(self) -> None:
        resolve_templates(self.templates, self.dataset)


@register_method("zeroshot")
class ZeroShotCLIP(Method):
    """logits = exp(logit_scale) * normalize(f_img) @ W_text^T with the CLIP text classifier.

    The classifier is cached and recomputed only when the class names, the templates or the
    backbone's weights change.
    """

    Config = ZeroShotConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        self.dataset = self.config.dataset
        self._template_spec = self.config.templates
        self._cache = ClassifierCache()

    @property
    def templates(self) -> list[str]:
        # Resolved once per (spec, dataset), not on every evaluation batch.
        key = (repr(self._template_spec), self.dataset)
        if getattr(self, "_resolved", (None, None))[0] != key:
            self._resolved = (key, resolve_templates(self._template_spec, self.dataset))
        return self._resolved[1]

    def set_templates(self, templates: str | list[str]) -> None:
        resolve_templates(templates, self.dataset)  # fail now, not at the next evaluation
        self._template_spec = templates

    def text_classifier(self) -> Tensor:
        """``[C, E]`` L2-normalized."""
        templates = self.templates
        key = (tuple(self.classnames), tuple(templates), weights_state([self.clip]))
        return self._cache.get(key, lambda: build_text_classifier(
            self.clip.encode_text, self.backbone.tokenizer, self.classnames, templates,
            self.device, self.config.text_batch_size, self.progress,
        ))

    def forward(self, images: Tensor) -> Tensor:
        w = self.text_classifier()
        f = F.normalize(self.clip.encode_image(images.to(self.device)).float(), dim=-1)
        return self.clip.logit_scale.exp().float() * f @ w.t()
