"""CoCoOp: Conditional Context Optimization (Zhou et al., CVPR 2022), METHODS.md §4.3, as
``trainers/cocoop.py`` of KaiyangZhou/CoOp computes it.

CoOp's context (:mod:`vladapt.methods.coop`: 4 vectors from "a photo of a", class name at the end)
plus a Meta-Net that turns each image into a bias added to every context vector, so every image
gets its own prompts (instance-conditional context)::

    f_i      = normalize(ImageEncoder(x_i))                       frozen, normalized (as the reference)
    pi_i     = linear2(ReLU(linear1(f_i)))                        Linear(E -> E // 16), Linear(E // 16 -> D)
    prompt_ic = [SOT] (ctx_1 + pi_i) .. (ctx_n + pi_i) [name_c] . [EOT]
    t_ic     = normalize(TextEncoder(prompt_ic))                  recomputed for every image
    logits_ic = exp(logit_scale) * f_i . t_ic,                     loss = mean cross-entropy over the batch

The reference loops over the images of a batch; here one call covers the whole batch (the ``B x C``
prompts in chunks of ``text_batch_size``), with the same per-image result. The published batch size
is 1 (one optimizer step per image): a larger batch gives the same per-image forward computation
but fewer optimizer steps, each on the mean loss of its images.

The meta-net has PyTorch's default ``nn.Linear`` initialization (drawn from torch's global generator,
seeded by the run, as in the reference), so unlike CoOp the untrained model is not exactly zero-shot
CLIP. ``csc`` and ``class_token_position`` work as in CoOp (the reference CoCoOp has only the shared
context at the end, the defaults). Trainable parameters on ViT-B/16 with the defaults: 2,048
(context) + 33,312 (meta-net: 512 x 32 + 32 + 32 x 512 + 512) = 35,360.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vladapt.backbones import Backbone
from vladapt.errors import ConfigError
from vladapt.methods.coop import CoOp, CoOpConfig
from vladapt.methods.registry import register_method


@dataclass
class CoCoOpConfig(CoOpConfig):
    """CoCoOp's settings; the defaults are the base-to-new configuration (``vit_b16_c4_ep10_batch1_ctxv1``)."""

    meta_reduction: int = field(default=16, metadata={
        "min": 1, "help": "meta-net hidden width = image-feature width // meta_reduction (512 // 16 = 32)"})


@register_method("cocoop")
class CoCoOp(CoOp):
    """CoCoOp: CoOp's context shifted per image by a meta-net (see the module docstring)."""

    Config = CoCoOpConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        vis_dim, ctx_dim = self.clip.cfg.embed_dim, self.clip.cfg.text.width
        hidden = vis_dim // self.config.meta_reduction
        if hidden < 1:
            raise ConfigError(f"method.meta_reduction={self.config.meta_reduction} leaves no hidden unit for "
                              f"image features of width {vis_dim}")
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, ctx_dim)),
        ])).to(self.device)

    def instance_text_features(self, features: Tensor) -> Tensor:
        """``[B, C, E]`` L2-normalized text features of every class for each image, from its normalized
        frozen feature ``[B, E]``: the context shifted by the image's meta-net bias."""
        bias = self.meta_net(features)  # [B, D]
        ctx = self.ctx if self.ctx.ndim == 3 else self.ctx.unsqueeze(0)  # [C or 1, n, D]
        c = len(self.classnames)
        per = max(1, self.config.text_batch_size // c)  # images per chunk
        out = []
        for i in range(0, len(features), per):
            b = bias[i:i + per]
            shifted = (ctx.unsqueeze(0) + b[:, None, None, :]).expand(len(b), c, -1, -1)  # [b, C, n, D]
            out.append(self.encode_prompts(shifted.reshape(len(b) * c, *shifted.shape[2:]), repeat=len(b))
                       .view(len(b), c, -1))
        return torch.cat(out)

    def train_logits(self, features: Tensor) -> Tensor:
        text = self.instance_text_features(features)
        return self.logit_scale() * (text @ features.unsqueeze(-1).to(text.dtype)).squeeze(-1)

    def feature_logits(self, features: Tensor) -> Tensor:
        # nothing to cache: the prompts depend on the image
        return self.train_logits(features)

    def evaluation_info(self) -> dict:
        return {**super().evaluation_info(), "meta_net": "instance-conditional context"}
