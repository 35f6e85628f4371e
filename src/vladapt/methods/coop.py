"""CoOp: Context Optimization (Zhou et al., IJCV 2022), METHODS.md §4.2, as ``trainers/coop.py`` of
KaiyangZhou/CoOp computes it.

The class prompts of a frozen CLIP get ``n`` learnable context vectors in place of hand-written
words; the image encoder is frozen and the text encoder is frozen too, but gradients flow through it
into the context::

    prompt_c = [SOT] ctx_1 .. ctx_n [name_c] . [EOT]            (class_token_position "end")
    t_c      = normalize(TextEncoder(prompt_c))                  all classes every step
    logits   = exp(logit_scale) * normalize(ImageEncoder(x)) @ t^T,   loss = cross-entropy

* **Context.** Initialized from the token embeddings of ``ctx_init`` ("a photo of a": 4 vectors, so
  the untrained model is exactly zero-shot CLIP with "a photo of a {c}."), or, with ``ctx_init: ""``,
  drawn from N(0, ``init_std``^2) (``n_ctx`` vectors). One context shared by all classes, or one per
  class (``csc``, class-specific context).
* **Class-token position** ("end", "middle", "front"): where the class name sits relative to the
  context, as the reference's ``CLASS_TOKEN_POSITION``; the name's length in tokens is that of the
  name tokenized alone, as the reference counts it.
* **New classes** get the same learned context with their own names (nothing else changes at test
  time). A class-specific context exists only for the classes it was trained on.

The prompt learner lives here once; CoCoOp (:mod:`vladapt.methods.cocoop`) subclasses :class:`CoOp`
and only adds its meta-net and the per-image prompts. Both are feature-level methods: their training
step sees the image only through the frozen encoder's normalized feature.

Differences from the released code: with ``csc`` and ``ctx_init`` both set, every class's context
starts from the words (the reference ignores ``CSC`` when ``CTX_INIT`` is given); ``n_ctx`` must
equal the number of *tokens* of ``ctx_init`` (the reference counts words and silently ignores
``N_CTX``); underscores in class names and in ``ctx_init`` become spaces, as in the reference.
Trainable parameters on ViT-B/16 with the defaults: 4 x 512 = 2,048.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone
from vladapt.errors import ConfigError
from vladapt.methods.base import Method, StepInfo, StepOutput
from vladapt.methods.classifier import ClassifierCache, weights_state
from vladapt.methods.registry import register_method

CLASS_POSITIONS = ("end", "middle", "front")


@dataclass
class CoOpConfig:
    """CoOp's settings; the defaults are the base-to-new configuration (``vit_b16_ctxv1``)."""

    n_ctx: int = field(default=4, metadata={
        "min": 1, "help": "context vectors; with ctx_init it must equal ctx_init's token count"})
    ctx_init: str = field(default="a photo of a", metadata={
        "help": "words whose token embeddings initialize the context; '' = random N(0, init_std^2)"})
    init_std: float = field(default=0.02, metadata={"min": 0.0, "help": "std of the random initialization"})
    class_token_position: str = field(default="end", metadata={"choices": list(CLASS_POSITIONS)})
    csc: bool = field(default=False, metadata={
        "help": "class-specific context: one context per training class (cannot predict other classes)"})
    text_batch_size: int = field(default=256, metadata={"min": 1, "help": "prompts per text-encoder call"})


@register_method("coop")
class CoOp(Method):
    """CoOp: learned context vectors in the class prompts of a frozen CLIP (see the module docstring)."""

    Config = CoOpConfig
    trainable = True
    feature_level = True

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        self._context_classnames = list(classnames)  # the classes a class-specific context belongs to
        self.ctx = nn.Parameter(self._initial_context(len(classnames)))
        self._prompts: tuple[tuple[str, ...], Tensor, Tensor] | None = None
        self._cache = ClassifierCache()
        self.to(self.device)

    # ------------------------------------------------------------------ context and prompts
    def _initial_context(self, num_classes: int) -> Tensor:
        """``[n_ctx, D]`` (or ``[C, n_ctx, D]`` with ``csc``), fp32: the words' embeddings or N(0, std^2)."""
        cfg = self.config
        width = self.clip.cfg.text.width
        words = cfg.ctx_init.replace("_", " ").strip()
        if words:
            ctx = self.clip.context_from_text(self.backbone.tokenizer(words).to(self.device)).float().cpu()
            if len(ctx) != cfg.n_ctx:
                raise ConfigError(f"method.ctx_init={cfg.ctx_init!r} gives {len(ctx)} context tokens but "
                                  f"method.n_ctx={cfg.n_ctx}: set n_ctx to {len(ctx)}, or ctx_init to '' for "
                                  "a random initialization")
            return ctx.unsqueeze(0).repeat(num_classes, 1, 1) if cfg.csc else ctx
        shape = (num_classes, cfg.n_ctx, width) if cfg.csc else (cfg.n_ctx, width)
        ctx = torch.empty(shape)
        nn.init.normal_(ctx, std=cfg.init_std)  # torch's global generator, seeded by the run (as the reference)
        return ctx

    def prompt_tokens(self) -> tuple[Tensor, Tensor]:
        """``(tokens [C, L], name_lengths [C])`` of the current classes: the ids of ``"{name}."`` (the
        context goes in after SOT) and each name's token count alone (for "middle" / "front")."""
        names = tuple(self.classnames)
        if self._prompts is None or self._prompts[0] != names:
            clean = [n.replace("_", " ") for n in names]
            tok = self.backbone.tokenizer
            tokens = tok([f"{n}." for n in clean]).to(self.device)
            lengths = (tok(clean).argmax(dim=-1) - 1).to(self.device)
            self._prompts = (names, tokens, lengths)
        return self._prompts[1], self._prompts[2]

    def encode_prompts(self, context: Tensor, repeat: int = 1) -> Tensor:
        """L2-normalized fp32 text features ``[repeat * C, E]`` of the class prompts (repeated ``repeat``
        times, class-minor) with ``context`` inserted: ``[n, D]`` for every prompt, or ``[repeat * C, n, D]``
        one per prompt. Gradients flow through the frozen text encoder into ``context``."""
        tokens, lengths = self.prompt_tokens()
        if repeat > 1:
            tokens, lengths = tokens.repeat(repeat, 1), lengths.repeat(repeat)
        step = self.config.text_batch_size
        feats = [
            self.clip.encode_text_with_context(tokens[i:i + step], context if context.ndim == 2 else context[i:i + step],
                                               class_position=self.config.class_token_position,
                                               name_lengths=lengths[i:i + step]).float()
            for i in range(0, len(tokens), step)
        ]
        return F.normalize(torch.cat(feats), dim=-1)

    def text_features(self) -> Tensor:
        """``[C, E]`` L2-normalized text features of the current classes with the current context."""
        return self.encode_prompts(self.ctx)

    def text_classifier(self) -> Tensor:
        """:meth:`text_features` without gradient, cached until the classes or the weights change."""
        key = (tuple(self.classnames), weights_state([self]))

        def compute() -> Tensor:
            with torch.no_grad():
                return self.text_features()

        return self._cache.get(key, compute)

    def set_classnames(self, classnames: list[str], dataset: str | None = None, split: str | None = None) -> None:
        if self.config.csc and list(classnames) != self._context_classnames:
            raise ConfigError(
                f"method.csc=true learned one context per training class ({len(self._context_classnames)} classes); "
                f"it cannot classify other classes (here {len(classnames)}: base-to-new's new classes, transfer "
                "targets). Use csc=false, or a protocol that evaluates the training classes (fewshot)")
        super().set_classnames(classnames, dataset, split)

    # ------------------------------------------------------------------ logits
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp().float()

    def train_logits(self, features: Tensor) -> Tensor:
        """Training logits ``[B, C]`` from normalized frozen image features ``[B, E]`` (with gradient)."""
        return self.logit_scale() * features @ self.text_features().t()

    def feature_logits(self, features: Tensor) -> Tensor:
        """Inference logits ``[B, C]`` from normalized frozen image features ``[B, E]``."""
        return self.logit_scale() * features @ self.text_classifier().t()

    def feature_step(self, features: Tensor, labels: Tensor, step: StepInfo | None = None) -> StepOutput:
        y = labels.to(self.device)
        logits = self.train_logits(features.to(self.device).float())
        return StepOutput(loss=F.cross_entropy(logits, y), logits=logits, labels=y)

    def forward(self, images: Tensor) -> Tensor:
        return self.feature_logits(self.frozen_image_features(images))

    def evaluation_info(self) -> dict[str, Any]:
        cfg = self.config
        init = repr(cfg.ctx_init) if cfg.ctx_init.strip() else f"N(0, {cfg.init_std}^2)"
        return {"context": f"{cfg.n_ctx} learned tokens{' per class' if cfg.csc else ''}, init {init}",
                "class_token_position": cfg.class_token_position}
