"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024), as its authors' code computes it (METHODS.md §4.10).

Low-rank updates of the attention projections of both towers. At every selected linear map
``W`` (default: the query, key and value slices of the fused in-projection in every block of the
visual and the text tower; insertion points ``attn_q``/``attn_k``/``attn_v``, ``attn_out`` for ``o``)
the map becomes::

    y = W x + b + scaling * B A drop(x)        A: [r, d_in], B: [d_out, r]

``drop`` is inverted dropout (rate 0.25) on the input of the LoRA path only, in training mode
only; its masks come from the step's generator (one independent mask per map, as each of the
reference's q/k/v layers has its own ``nn.Dropout``). ``A`` is initialised like ``nn.Linear``'s
weight (``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))) and ``B`` to zeros,
so the initial model is exactly the frozen CLIP. Rank 2, alpha 1.

**Scaling**: the reference's ``loralib/layers.py`` uses ``scaling = alpha / sqrt(r)`` (the usual
``alpha / r`` is commented out there), 1/sqrt(2) for the published r = 2, alpha = 1; that is the
default here (``scaling: alpha_over_sqrt_r``); ``scaling: alpha_over_r`` gives the LoRA paper's.

Text side: one prompt per class from a single template. The released code uses
``"a photo of a {}."`` for **every** dataset (in each ``datasets/*.py`` CoOp's per-dataset template,
e.g. ``"{} texture."`` for DTD, sits inside a disabled string literal and ``template = ['a photo of
a {}.']`` follows; ImageNet likewise), so that is the default here; ``template: dataset`` gives CoOp's
template of the dataset (as ``zeroshot`` resolves it), or give any one template with ``{}``.
The text encoder carries LoRA too, so the text features of
**all** classes are recomputed at every step; at evaluation the classifier (same template, no
dropout) is cached until the weights or the classes change. Loss: cross-entropy on
``logit_scale * cos(image, text)`` with the reference's fixed ``logit_scale = 100`` (``main.py``;
``logit_scale: null`` uses ``exp`` of the backbone's learned scale instead, 100 for OpenAI CLIP).

Training as published (``main.py``/``lora.py``): AdamW lr 2e-4, weight decay 1e-2 on every LoRA
matrix, betas (0.9, 0.999), a per-iteration cosine to 1e-6 over ``500 * shots`` iterations, batch
32, RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip, fp16 autocast; the model at the
last iteration is evaluated (their validation is switched off).

Differences from the reference code (none change the function computed):

* the delta is computed as ``(drop(x) A^T) B^T`` (two rank-r products) instead of
  ``drop(x) (B A)^T``; at evaluation the reference merges ``B A`` into ``W``; both are equal up
  to rounding;
* the reference rebuilds the q/k/v projections as separate fp32 ``nn.Linear`` copies of the
  (fp16) CLIP weights; here the backbone's fused projection is untouched and the delta is added;
* dropout masks are drawn from the step's generator (reproducible), not torch's global RNG.
* their ``--position`` presets are contiguous 1-based block ranges here (``layer_start``..``layer_end``):
  bottom 1..4, mid 5..8, up 9..12, half-bottom 1..6, half-up 7..12, top3 10..12, all 1..12.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone, ForwardContext, InsertionPoint
from vladapt.errors import ConfigError
from vladapt.methods.adapters import (
    attach_modules,
    block_range,
    build_point_modules,
    check_towers,
    detach_modules,
)
from vladapt.methods.base import Method, StepInfo, StepOutput
from vladapt.methods.classifier import ClassifierCache, encode_tokens, weights_state
from vladapt.methods.registry import register_method
from vladapt.methods.templates import format_prompts, resolve_templates

# Their --params names -> the backbone's linear-map insertion points.
TARGET_POINTS: dict[str, str] = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_out"}
SCALINGS = ("alpha_over_sqrt_r", "alpha_over_r")


@dataclass
class CLIPLoRAConfig:
    """CLIP-LoRA's settings; the defaults are the paper's (``run_utils.py`` defaults)."""

    towers: list[str] = field(default_factory=lambda: ["visual", "text"],
                              metadata={"help": "their --encoder both"})
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v"],
                               metadata={"help": "attention maps with LoRA: q, k, v, o (their --params)"})
    layer_start: int = field(default=1, metadata={"min": 1, "help": "first block with LoRA (1-based)"})
    layer_end: int | None = field(default=None, metadata={"min": 1, "help": "last block; none = the last"})
    rank: int = field(default=2, metadata={"min": 1, "help": "r"})
    alpha: float = field(default=1.0, metadata={"min": 0.0})
    scaling: str = field(default="alpha_over_sqrt_r", metadata={
        "choices": list(SCALINGS), "help": "alpha_over_sqrt_r: the reference loralib; alpha_over_r: the LoRA paper"})
    dropout: float = field(default=0.25, metadata={"min": 0.0, "help": "on the LoRA path's input, training only"})
    logit_scale: float | None = field(default=100.0, metadata={
        "min": 0.0, "help": "fixed logit scale (reference: 100); none = exp(the backbone's logit_scale)"})
    template: str = field(default="a photo of a {}.", metadata={
        "help": "one template with {} (the reference: 'a photo of a {}.' for every dataset) or 'dataset' "
                "(CoOp's template of the dataset)"})
    dataset: str | None = field(default=None, metadata={"help": "whose template 'dataset' means (default: the run's)"})
    text_batch_size: int = field(default=256, metadata={"min": 1})

    def validate(self) -> None:
        check_towers(self.towers)
        if not self.towers:
            raise ConfigError("method.towers: choose at least one of ['visual', 'text']")
        unknown = [t for t in self.targets if t not in TARGET_POINTS]
        if unknown or not self.targets:
            raise ConfigError(f"method.targets: unknown {unknown}; choose from {list(TARGET_POINTS)}"
                              if unknown else "method.targets: choose at least one of ['q', 'k', 'v', 'o']")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"method.targets: {self.targets} repeats a target")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")
        if self.layer_end is not None and self.layer_end < self.layer_start:
            raise ConfigError(f"method.layer_end ({self.layer_end}) is below layer_start ({self.layer_start})")
        templates = resolve_templates(self.template, self.dataset)
        if len(templates) != 1:
            raise ConfigError(f"method.template: CLIP-LoRA uses one template, {self.template!r} gives {len(templates)}")


class DropoutSource:
    """Where the LoRA modules of one method draw their dropout masks from during a step
    (``None``: torch's global RNG)."""

    def __init__(self) -> None:
        self.generator: torch.Generator | None = None


class LoRADelta(nn.Module):
    """``x [B, N, d_in] -> scaling * drop(x) A^T B^T [B, N, d_out]`` at one linear-map point."""

    def __init__(self, point: InsertionPoint, rank: int, scaling: float, dropout: float,
                 source: DropoutSource | None = None) -> None:
        super().__init__()
        self.point = point
        self.rank = rank
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self._source = [source or DropoutSource()]  # shared with the method, not a submodule
        self.lora_A = nn.Parameter(torch.empty(rank, point.in_width))
        self.lora_B = nn.Parameter(torch.zeros(point.width, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default; B = 0

    @property
    def tokenwise(self) -> bool:
        """Each token alone, except that training-time dropout draws one mask over all tokens (their
        number must not change the random stream)."""
        return not self.training or self.dropout == 0.0

    def delta_weight(self) -> Tensor:
        """``scaling * B A`` ``[d_out, d_in]``: what LoRA adds to the map's weight."""
        return self.scaling * self.lora_B @ self.lora_A

    def drop(self, x: Tensor) -> Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        g = self._source[0].generator
        keep = torch.rand(x.shape, generator=g, device=x.device) >= self.dropout
        return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - self.dropout)

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return (f"point={self.point.name}, rank={self.rank}, scaling={self.scaling:.4g}, dropout={self.dropout}, "
                f"in={self.point.in_width}, out={self.point.width}")


@register_method("clip_lora")
class CLIPLoRA(Method):
    """CLIP-LoRA: LoRA on the attention projections of both towers, trained with cross-entropy on
    ``100 * cos`` against the text features of every class (single dataset template)."""

    Config = CLIPLoRAConfig
    trainable = True

    def __init__(self, backbone: Backbone, classnames: list[str], config: Any = None) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        if cfg.dataset is not None:
            self.dataset = cfg.dataset
        self.scaling = cfg.alpha / (math.sqrt(cfg.rank) if cfg.scaling == "alpha_over_sqrt_r" else cfg.rank)
        self._dropout_source = DropoutSource()
        layers = {t: block_range(self.clip, t, cfg.layer_start, cfg.layer_end, "CLIP-LoRA") for t in cfg.towers}
        kinds = [TARGET_POINTS[t] for t in cfg.targets]
        self.lora = build_point_modules(
            self.clip, cfg.towers, layers, kinds,
            lambda p: LoRADelta(p, cfg.rank, self.scaling, cfg.dropout, self._dropout_source))
        self._cache = ClassifierCache()
        self._tokens_key: tuple | None = None
        self.to(self.device)

    # ------------------------------------------------------------------ attachment
    @contextmanager
    def attached(self):
        """The LoRA modules sit at their points only while this method computes."""
        modules = list(self.lora.values())
        attach_modules(self.clip, modules)
        try:
            yield
        finally:
            detach_modules(self.clip, modules)

    @contextmanager
    def dropout_from(self, generator: torch.Generator | None):
        old = self._dropout_source.generator
        self._dropout_source.generator = generator
        try:
            yield
        finally:
            self._dropout_source.generator = old

    # ------------------------------------------------------------------ text side
    @property
    def template(self) -> str:
        return resolve_templates(self.config.template, self.config.dataset or self.dataset)[0]

    def class_tokens(self) -> Tensor:
        """``[C, L]`` token ids of ``template.format(classname)`` for every class."""
        key = (tuple(self.classnames), self.template)
        if self._tokens_key != key:
            self._tokens = self.backbone.tokenizer(format_prompts(self.template, self.classnames))
            self._tokens_key = key
        return self._tokens

    def logit_scale(self) -> Tensor | float:
        s = self.config.logit_scale
        return self.clip.logit_scale.exp().float() if s is None else float(s)

    def _compute_text_classifier(self) -> Tensor:
        with self.attached():
            return encode_tokens(self.clip.encode_text, self.class_tokens(), self.device, self.config.text_batch_size)

    def text_classifier(self) -> Tensor:
        """``[C, E]`` L2-normalized text features of the LoRA-adapted text encoder (no dropout)."""
        key = (tuple(self.classnames), self.template, self.training, weights_state([self]))
        return self._cache.get(key, self._compute_text_classifier)

    # ------------------------------------------------------------------ training
    def training_step(self, images: Tensor, labels: Tensor, step: StepInfo | None = None) -> StepOutput:
        gen = step.generator if step is not None else None
        dev_gen = None
        if self.training and self.config.dropout > 0:
            seed = int(torch.randint(2**62, (), generator=gen))
            dev_gen = torch.Generator(device=self.device).manual_seed(seed)
        images = images.to(self.device)
        y = labels.to(self.device)
        # Without LoRA in the text tower its features are the cached classifier (computed with
        # the modules attached, so outside the block below).
        text = None if "text" in self.config.towers else self.text_classifier()
        with self.attached(), self.dropout_from(dev_gen):
            if text is None:
                text = F.normalize(self.clip.encode_text(self.class_tokens().to(self.device)).float(), dim=-1)
            if "visual" in self.config.towers:
                image = self.clip.encode_image(images).float()
            else:
                with torch.no_grad():
                    image = self.clip.encode_image(images).float()
        logits = self.logit_scale() * F.normalize(image, dim=-1) @ text.t()
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss=loss, logits=logits, labels=y)

    # ------------------------------------------------------------------ inference
    def image_features(self, images: Tensor) -> Tensor:
        with self.attached():
            return F.normalize(self.clip.encode_image(images.to(self.device)).float(), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        w = self.text_classifier()
        return self.logit_scale() * self.image_features(images) @ w.t()

    def evaluation_info(self) -> dict[str, Any]:
        return {"template": self.template, "scaling": self.scaling}
