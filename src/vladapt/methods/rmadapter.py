"""RMAdapter: Reconstruction-based Multi-Modal Adapter (Lin et al., AAAI-26), METHODS.md §2.

MMA (:mod:`vladapt.methods.mma`) plus, at every adapted block of both towers, a reconstruction
branch that shares the adaptation branch's down projection, and two extra losses::

    code      = act(down(h))                                   # shared with the adaptation branch
    base(h)   = up(act(shared(code)))                          # MMA's branch, added like MMA's (scale s)
    rec(h)    = up2(act(up1(code)))                            # dim -> dim -> d, reconstruction branch
    L_rec     = w_rec_visual * sum_layers mean((rec(t) - t)^2)  +  w_rec_text * (same, text tower)
    L_con     = w_con_image * mean|f_img - f_img^frozen|  +  w_con_text * mean|f_txt - f_txt^frozen|
    L         = CE + L_con + L_rec

``t`` is the tensor a layer reconstructs, **detached** (stop-gradient), so a layer's reconstruction
loss updates only that layer's down projection and reconstruction branch ("computed locally within
each layer"). The paper's supplementary, which fixes the remaining choices, is not available; each
one is a config value, and these defaults are assumptions (MMA's settings where the paper says it
follows MMA, PromptSRC's for the consistency term):

==========================  ======================  =================================================
choice                      default (assumed)       alternatives
==========================  ======================  =================================================
layers k..K, rank r, alpha  5..12, 32, 0.001 + GS    ``adapter_start``/``adapter_end``, ``dim``, ``scale``
MMA's shared layer          kept (``shared=true``)   ``shared=false``
activation sigma            ReLU (MMA's down)        ``activation=gelu`` (the paper's "typically GELU")
reconstructed tensor        the branch's input       ``reconstruct=output``: the block output
                            ``LN1(x)``               ``[c_i, E_i]``, as Eq. 11 writes it
reduction of L_rec          mean per layer (text:    -
                            up to each EOT), summed
                            over layers
lambda1, lambda2 (rec)      1.0, 1.0                 ``rec_visual_weight``, ``rec_text_weight``
consistency features        L2-normalized, mean |.|  ``consistency_normalize=false`` (raw features)
lambda3, lambda4 (con)      10 (image), 25 (text)    ``con_image_weight``, ``con_text_weight``
                            (PromptSRC's)
==========================  ======================  =================================================

A weight of 0 switches its term off: it is then not computed and contributes exactly zero.
Trainable parameters with the defaults on ViT-B/16: 674,560 (MMA) + 354,816 (reconstruction
branches) = 1,029,376 (the paper reports about 320 K for the reconstruction branches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import ForwardContext, InsertionPoint
from vladapt.methods.adapters import StepTensors
from vladapt.methods.classifier import ClassifierCache, weights_state
from vladapt.methods.mma import ACTIVATIONS, MMA, MMABranch, MMAConfig, kaiming_linear
from vladapt.methods.registry import register_method


@dataclass
class RMAdapterConfig(MMAConfig):
    reconstruct: str = field(default="input", metadata={
        "choices": ["input", "output"], "help": "the tensor each layer reconstructs: the branch input LN1(x) "
                                                "or the block output"})
    rec_visual_weight: float = field(default=1.0, metadata={"min": 0.0, "help": "lambda1 (assumed)"})
    rec_text_weight: float = field(default=1.0, metadata={"min": 0.0, "help": "lambda2 (assumed)"})
    con_image_weight: float = field(default=10.0, metadata={"min": 0.0, "help": "lambda3 (assumed, PromptSRC)"})
    con_text_weight: float = field(default=25.0, metadata={"min": 0.0, "help": "lambda4 (assumed, PromptSRC)"})
    consistency_normalize: bool = field(default=True, metadata={"help": "L1 between L2-normalized features"})


class RMABranch(MMABranch):
    """MMA's branch plus the reconstruction branch ``up2(act(up1(act(down(t)))))`` on the shared ``down``.

    With ``reconstruct="input"`` the branch adds the layer's reconstruction loss of its own
    (detached) input to the forward context in training; with ``"output"`` a :class:`OutputReconstruction`
    at the block's ``block_out`` point does it for the block output.
    """

    def __init__(self, point: InsertionPoint, dim: int, scale: float, shared: nn.Linear | None,
                 activation: str = "relu", reconstruct: str = "input", compute_loss: bool = True) -> None:
        super().__init__(point, dim, scale, shared, activation)
        self.up1 = kaiming_linear(dim, dim)
        self.up2 = kaiming_linear(dim, point.width)
        self.reconstruct = reconstruct
        self.compute_loss = compute_loss

    @property
    def tokenwise(self) -> bool:  # type: ignore[override]
        """The loss of its input is a mean over every token: all of them must be computed."""
        return not (self.training and self.compute_loss and self.reconstruct == "input")

    def reconstruction_loss(self, t: Tensor, valid: Tensor | None = None) -> Tensor:
        """``mean((rec(t) - t)^2)`` of a detached ``t [B, N, D]`` in fp32, over the positions where
        ``valid [B, N]`` is True (text: up to each prompt's EOT, so padding and the batch's longest
        prompt do not change a prompt's loss)."""
        t = t.detach()
        err = (self.up2(ACTIVATIONS[self.activation](self.up1(self.hidden(t)))).float() - t.float()) ** 2
        if valid is None:
            return err.mean()
        valid = valid[:, : t.shape[1]].to(err.dtype)
        return (err.sum(-1) * valid).sum() / (valid.sum() * t.shape[-1])

    def loss_of(self, t: Tensor, ctx: ForwardContext) -> Tensor:
        return self.reconstruction_loss(t, ctx.text_valid if self.point.tower == "text" else None)

    def forward(self, h: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        if self.training and self.compute_loss and self.reconstruct == "input" and ctx is not None:
            ctx.add_aux_loss(self.point, self.loss_of(h, ctx))
        return super().forward(h, ctx)


class OutputReconstruction(nn.Module):
    """At a ``block_out`` point: adds the reconstruction loss of the block output (through the
    block's :class:`RMABranch`) in training; returns the output unchanged."""

    def __init__(self, point: InsertionPoint, branch: RMABranch) -> None:
        super().__init__()
        self.point = point
        self._branch = [branch]  # a reference: the parameters belong to the branch

    @property
    def tokenwise(self) -> bool:
        """An identity on the tokens; in training its loss is a mean over every token of the block output."""
        branch = self._branch[0]
        return not (branch.training and branch.compute_loss)

    def forward(self, y: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        branch = self._branch[0]
        if branch.training and branch.compute_loss and ctx is not None:
            ctx.add_aux_loss(branch.point, branch.loss_of(y, ctx))
        return y


@register_method("rmadapter")
class RMAdapter(MMA):
    Config = RMAdapterConfig
    branch_class = RMABranch

    def __init__(self, backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        self._frozen_text = ClassifierCache()
        self._outputs = [OutputReconstruction(self.clip.insertion_points(b.point.tower, "block_out", [b.point.layer])[0], b)
                         for b in self.adapters.values()] if self.config.reconstruct == "output" else []

    def make_branch(self, point: InsertionPoint) -> RMABranch:
        cfg = self.config
        weight = cfg.rec_visual_weight if point.tower == "visual" else cfg.rec_text_weight
        shared = self.shared[str(point.layer)] if cfg.shared else None
        return RMABranch(point, cfg.dim, cfg.scale, shared, cfg.activation, cfg.reconstruct, weight > 0)

    def point_modules(self) -> list[nn.Module]:
        return super().point_modules() + self._outputs

    def _frozen_text_features(self) -> Tensor:
        """Frozen CLIP features ``[C, T, E]`` of every prompt of the bank (no adapters), cached."""
        def compute() -> Tensor:
            flat = self._tokens.flatten(0, 1)
            with torch.enable_grad():  # nothing requires grad: no graph, but the training step's attention path
                feats = torch.cat([self.clip.encode_text(flat[i:i + 256].to(self.device)).float()
                                   for i in range(0, len(flat), 256)])
            return feats.detach().view(*self._tokens.shape[:2], -1)

        return self._frozen_text.get((self._bank_version, weights_state([self.clip])), compute)

    def extra_losses(self, t: StepTensors) -> dict[str, Tensor]:
        cfg = self.config
        terms: dict[str, Tensor] = {}
        norm = F.normalize if cfg.consistency_normalize else (lambda x, dim: x)
        if cfg.con_image_weight > 0:
            # The frozen backbone needs no graph; computing it in the step's grad mode keeps the attention
            # path of the adapted forward, so an unadapted model's consistency loss is exactly zero.
            # Likewise the same last-block path (the CLS-only tail or all tokens) as the adapted pass.
            same_path = ForwardContext()
            same_path.cls_only_tail = bool(t.context.used_cls_only_tail)
            frozen = self.clip.encode_image(t.images, same_path).float().detach()
            image = t.image_features if cfg.consistency_normalize else t.raw_image_features
            terms["con_image"] = cfg.con_image_weight * F.l1_loss(image, norm(frozen, dim=-1))
        if cfg.con_text_weight > 0:
            frozen = self._frozen_text_features()[t.class_ids, t.templates]
            text = t.text_features if cfg.consistency_normalize else t.raw_text_features
            terms["con_text"] = cfg.con_text_weight * F.l1_loss(text, norm(frozen, dim=-1))
        for tower, name, weight in (("visual", "rec_visual", cfg.rec_visual_weight),
                                    ("text", "rec_text", cfg.rec_text_weight)):
            losses = [v.float() for p, v in t.context.aux_losses if p.tower == tower]
            if weight > 0 and losses:
                terms[name] = weight * torch.stack(losses).sum()
        return terms
