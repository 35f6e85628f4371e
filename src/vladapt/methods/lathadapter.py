"""LatHAdapter (LatH-style, unofficial): a latent hierarchy category -> attribute -> image in hyperbolic space.

What the paper (Zhao et al., arXiv 2508.11176) establishes, from its abstract: an adapter aligns image
and category-text features of a frozen CLIP; learnable "attribute" prompts bridge categories and
images; the categories, attributes and images of each mini-batch are projected into a hyperbolic
space, where a hierarchical regularization models the one-to-many relation category -> attribute ->
image. Its method section and code are unavailable, so everything concrete below is the reference
design of LATHADAPTER.md (built on CLIP-Adapter, CoOp-style context tokens and MERU's Lorentz
operations), each choice a named config value (see the README's LatHAdapter table):

* **Features.** Frozen CLIP image features ``v`` and category text features ``t_c`` (the dataset's
  CoOp template, or an ensemble) are L2-normalized and scaled to norm ``sqrt(E)`` (the per-coordinate
  unit scale for which MERU's ``alpha = 1/sqrt(E)`` is made), then adapted by CLIP-Adapter residual
  bottlenecks ``x^ = ratio * ReLU(W2 ReLU(W1 x)) + (1 - ratio) * x`` (no biases), one per tower.
* **Classification** (training and the default inference): ``s * cos(v^, t^_c)`` over all classes,
  ``s`` CLIP's logit scale, cross-entropy.
* **Attributes.** Design A (``attributes: prompts``): K learnable context sequences ``P_k [M, W]``;
  the attribute node ``a_{c,k}`` is the frozen text encoder run on ``[P_k] [name of c] .``, then the
  text adapter. New classes get theirs by substituting their names. Design B (``attributes:
  vectors``): K free class-agnostic vectors (initialized from the text features of generic
  attribute words), passed through the text adapter; no text-encoder pass.
* **Hyperbolic nodes.** ``h_i = exp0(alpha_v H_v v^_i)``, ``g_c = exp0(alpha_t H_t t^_c)``,
  ``u_{c,k} = exp0(alpha_t H_t a^_{c,k})`` with ``H`` a learnable linear map (identity init),
  ``alpha`` a learnable scale (``1/sqrt(E)``, at most 1), a learnable curvature; the geometry is
  Lorentz (default), Poincaré or Euclidean (no exp map).
* **Losses.** ``CE + w_contrast * L_hc + w_entail * (L_ca + L_ai) + w_diversity * L_div``:
  ``L_hc`` cross-entropy of ``-s_h d(h_i, g_c)`` over the batch's classes; ``L_ca`` the entailment
  cone loss of each category over its K attributes; ``L_ai`` the cone loss of each image under its
  class's attributes weighted by the soft assignment ``softmax_k(-d(u_{y,k}, h)/tau)``; ``L_div`` the
  mean squared cosine between a class's attribute features. ``hierarchy: attribute_first`` reads
  the relation the other way (attribute -> category -> image).
* **Inference variants** (weights, 0 = off): zero-shot fusion, the hyperbolic branch
  ``-s_h d(h, g_c)``, the attribute branch (max or mean over k of ``s cos(v^, a^_{c,k})``).

Image features come from the frozen image encoder at every step (no gradient flows into it); only
Design A back-propagates through the frozen text encoder (K x |classes in the batch| short prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone
from vladapt.errors import ConfigError
from vladapt.geometry import Curvature, FeatureScale, LogScalar, Manifold, scalar_parameters
from vladapt.methods.base import Method, StepInfo, StepOutput
from vladapt.methods.classifier import ClassifierCache, build_text_classifier, weights_state
from vladapt.methods.clip_adapter import ResidualAdapter
from vladapt.methods.registry import register_method
from vladapt.methods.templates import resolve_templates

ATTRIBUTE_WORDS = ["color", "shape", "texture", "size", "pattern", "material", "part", "background"]
ORDERS = {
    # hierarchy: (parent, child) of the upper and of the lower entailment term
    "category_first": ("category", "attribute", "image"),
    "attribute_first": ("attribute", "category", "image"),
}


@dataclass
class LatHAdapterConfig:
    """LatHAdapter's settings (LATHADAPTER.md's reference design; every value an assumption)."""

    templates: str | list[str] = field(default="dataset", metadata={
        "help": "category prompts: 'dataset' (CoOp's template of the dataset), an ensemble name, a template or a list"})
    dataset: str | None = field(default=None, metadata={"help": "whose CoOp template 'dataset' means"})
    reduction: int = field(default=4, metadata={"min": 1, "help": "adapter bottleneck = E / reduction"})
    visual_ratio: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0, "help": "residual ratio of the image adapter (0: none)"})
    text_ratio: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0, "help": "residual ratio of the text adapter (0: none)"})
    attributes: str = field(default="prompts", metadata={
        "choices": ["prompts", "vectors"],
        "help": "prompts: K context sequences through the text encoder with the class name (design A); "
                "vectors: K free class-agnostic vectors (design B)"})
    num_attributes: int = field(default=4, metadata={"min": 1, "help": "K"})
    attribute_length: int = field(default=4, metadata={"min": 1, "help": "M, context tokens per attribute prompt"})
    attribute_init_std: float = field(default=0.02, metadata={"min": 0.0, "help": "N(0, std^2) init of the prompts"})
    attribute_words: list[str] = field(default_factory=lambda: list(ATTRIBUTE_WORDS), metadata={
        "help": "design B: the vectors start at these words' text features (cycled); [] = random directions"})
    hierarchy: str = field(default="category_first", metadata={
        "choices": list(ORDERS), "help": "category -> attribute -> image, or attribute -> category -> image"})
    geometry: str = field(default="lorentz", metadata={"choices": ["lorentz", "poincare", "euclidean"]})
    curvature: float = field(default=1.0, metadata={"min": 1e-6, "help": "initial c (curvature -c), kept in [c/10, 10c]"})
    learn_curvature: bool = True
    projection: bool = field(default=True, metadata={"help": "learnable linear map H (identity init) before the exp map"})
    clip_radius: float | None = field(default=None, metadata={"min": 1e-9, "help": "clip tangent norms before the exp map"})
    cone_min_radius: float = field(default=0.1, metadata={"min": 1e-9, "help": "K of the cone half-aperture asin(2K/|x|)"})
    assignment: str = field(default="soft", metadata={
        "choices": ["soft", "hard"], "help": "image -> attribute weights: softmax, or top-1 with a straight-through gradient"})
    assignment_temperature: float = field(default=0.1, metadata={"min": 1e-9})
    contrast_weight: float = field(default=0.5, metadata={"min": 0.0, "help": "lambda_h, hyperbolic image-category contrast"})
    entailment_weight: float = field(default=0.2, metadata={"min": 0.0, "help": "lambda_e, both entailment terms"})
    diversity_weight: float = field(default=0.1, metadata={"min": 0.0, "help": "lambda_d, attribute diversity"})
    hyperbolic_logit_scale: float = field(default=1 / 0.07, metadata={"min": 1e-6, "help": "initial s_h"})
    hyperbolic_logit_scale_max: float = field(default=100.0, metadata={"min": 1e-6})
    attribute_lr_scale: float = field(default=2.0, metadata={"min": 0.0, "help": "attribute lr / base lr"})
    zeroshot_weight: float = field(default=0.0, metadata={"min": 0.0, "help": "inference: + w * zero-shot CLIP logits"})
    hyperbolic_weight: float = field(default=0.0, metadata={"min": 0.0, "help": "inference: + w * (-s_h d(h, g_c))"})
    attribute_weight: float = field(default=0.0, metadata={"min": 0.0, "help": "inference: + w * pooled s cos(v^, a^_{c,k})"})
    attribute_pool: str = field(default="max", metadata={"choices": ["max", "mean"]})
    text_batch_size: int = field(default=256, metadata={"min": 1})

    def validate(self) -> None:
        resolve_templates(self.templates, self.dataset)
        if self.attributes == "vectors" and self.attribute_weight > 0:
            raise ConfigError("method.attribute_weight needs attributes=prompts: class-agnostic vectors "
                              "(attributes=vectors) give no per-class attribute branch")
        if self.hyperbolic_logit_scale > self.hyperbolic_logit_scale_max:
            raise ConfigError(f"method.hyperbolic_logit_scale ({self.hyperbolic_logit_scale}) exceeds "
                              f"method.hyperbolic_logit_scale_max ({self.hyperbolic_logit_scale_max})")


def _identity_linear(dim: int) -> nn.Linear:
    linear = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(dim))
    return linear


@dataclass
class HierarchyNodes:
    """One step's nodes: adapted features (Euclidean) and their hyperbolic points."""

    classes: Tensor          # [C_B] the batch's classes (indices into the class names), sorted
    position: Tensor         # [B] each image's class as an index into ``classes``
    attributes: Tensor       # [C_B, K, E] adapted attribute features a^
    image_points: Tensor     # [B, E] h
    category_points: Tensor  # [C_B, E] g
    attribute_points: Tensor  # [C_B, K, E] u


@register_method("lathadapter")
class LatHAdapter(Method):
    """LatHAdapter (LatH-style, unofficial): see the module docstring."""

    Config = LatHAdapterConfig
    trainable = True
    feature_level = True

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        self.dataset = cfg.dataset
        dim = self.clip.text_projection.shape[1]
        self.dim = dim
        self.visual_adapter = ResidualAdapter(dim, cfg.reduction, cfg.visual_ratio) if cfg.visual_ratio > 0 else None
        self.text_adapter = ResidualAdapter(dim, cfg.reduction, cfg.text_ratio) if cfg.text_ratio > 0 else None
        self.visual_projection = _identity_linear(dim) if cfg.projection else None
        self.text_projection = _identity_linear(dim) if cfg.projection else None
        self.visual_scale = FeatureScale(dim)
        self.text_scale = FeatureScale(dim)
        curvature = None if cfg.geometry == "euclidean" else Curvature(cfg.curvature, learnable=cfg.learn_curvature)
        self.manifold = Manifold(cfg.geometry, curvature, cfg.clip_radius, cfg.cone_min_radius)
        self.hyperbolic_logit_scale = LogScalar(cfg.hyperbolic_logit_scale, max_value=cfg.hyperbolic_logit_scale_max)
        k = cfg.num_attributes
        if cfg.attributes == "prompts":
            width = self.clip.token_embedding.embedding_dim
            self.attribute_context = nn.Parameter(torch.randn(k, cfg.attribute_length, width) * cfg.attribute_init_std)
        else:
            self.attribute_vectors = nn.Parameter(self._attribute_vector_init(k, cfg.attribute_words))
        self._category_cache = ClassifierCache()
        self._eval_cache = ClassifierCache()
        self._name_tokens: tuple[tuple[str, ...], Tensor] | None = None
        self.to(self.device)

    # ------------------------------------------------------------------ frozen inputs
    def _unit_scale(self, f: Tensor) -> Tensor:
        """L2-normalize and scale to norm sqrt(E)."""
        return F.normalize(f.float(), dim=-1) * math.sqrt(self.dim)

    @torch.no_grad()
    def _attribute_vector_init(self, k: int, words: list[str]) -> Tensor:
        if not words:
            return self._unit_scale(torch.randn(k, self.dim))
        names = [words[i % len(words)] for i in range(k)]
        return self._unit_scale(self.clip.encode_text(self.backbone.tokenizer(names).to(self.device))).cpu()

    @property
    def templates(self) -> list[str]:
        return resolve_templates(self.config.templates, self.dataset)

    def category_features(self) -> Tensor:
        """Frozen category text features ``[C, E]`` of the current class names (template-averaged), at norm sqrt(E)."""
        templates = self.templates
        key = (tuple(self.classnames), tuple(templates), weights_state([self.clip]))
        feats = self._category_cache.get(key, lambda: build_text_classifier(
            self.clip.encode_text, self.backbone.tokenizer, self.classnames, templates, self.device,
            self.config.text_batch_size, self.progress))
        return feats * math.sqrt(self.dim)

    def image_inputs(self, images: Tensor) -> Tensor:
        """Frozen image features ``[B, E]`` at norm sqrt(E) (no gradient into the image encoder)."""
        return self.frozen_image_features(images) * math.sqrt(self.dim)

    def _class_name_tokens(self) -> Tensor:
        names = tuple(self.classnames)
        if self._name_tokens is None or self._name_tokens[0] != names:
            self._name_tokens = (names, self.backbone.tokenizer([f"{n}." for n in names]))
        return self._name_tokens[1]

    # ------------------------------------------------------------------ adapted features and nodes
    def adapt_image(self, v: Tensor) -> Tensor:
        return v if self.visual_adapter is None else self.visual_adapter(v)

    def adapt_text(self, t: Tensor) -> Tensor:
        return t if self.text_adapter is None else self.text_adapter(t)

    def attribute_features(self, class_ids: Tensor) -> Tensor:
        """Adapted attribute features ``[len(class_ids), K, E]`` (design B: the same K for every class)."""
        k = self.config.num_attributes
        if self.config.attributes == "vectors":
            return self.adapt_text(self.attribute_vectors).unsqueeze(0).expand(len(class_ids), -1, -1)
        tokens = self._class_name_tokens()[class_ids.cpu()].to(self.device)  # [C, L]
        n = len(class_ids)
        context = self.attribute_context.unsqueeze(1).expand(-1, n, -1, -1).reshape(k * n, *self.attribute_context.shape[1:])
        encoded = self.clip.encode_text_with_context(tokens.repeat(k, 1), context.to(self.clip.dtype))  # [K*C, E], k-major
        return self.adapt_text(self._unit_scale(encoded).view(k, n, -1).transpose(0, 1))

    def lift_image(self, x: Tensor) -> Tensor:
        x = x if self.visual_projection is None else self.visual_projection(x)
        return self.manifold.project(self.visual_scale(x))

    def lift_text(self, x: Tensor) -> Tensor:
        x = x if self.text_projection is None else self.text_projection(x)
        return self.manifold.project(self.text_scale(x))

    def hierarchy_nodes(self, image_hat: Tensor, text_hat: Tensor, labels: Tensor, global_labels: Tensor) -> HierarchyNodes:
        """The batch's nodes; the classes come from the global batch so every process builds the same ones."""
        classes = torch.unique(global_labels.cpu())
        position = torch.searchsorted(classes, labels.cpu()).to(self.device)
        attributes = self.attribute_features(classes)
        return HierarchyNodes(classes, position, attributes, self.lift_image(image_hat),
                              self.lift_text(text_hat[classes.to(self.device)]), self.lift_text(attributes))

    def hierarchy_losses(self, nodes: HierarchyNodes) -> dict[str, Tensor]:
        """Unweighted regularization terms of LATHADAPTER.md §5.2 (the names say parent -> child)."""
        cfg, m = self.config, self.manifold
        g, u, h, pos = nodes.category_points, nodes.attribute_points, nodes.image_points, nodes.position
        terms: dict[str, Tensor] = {}
        if cfg.contrast_weight > 0:
            logits = -self.hyperbolic_logit_scale.value() * m.pairwise_dist(h, g)
            terms["contrast"] = F.cross_entropy(logits, pos)
        if cfg.entailment_weight > 0:
            u_img = u[pos]  # [B, K, E] the attributes of each image's class
            if cfg.hierarchy == "category_first":
                terms["entail_category_attribute"] = m.entailment_loss(g.unsqueeze(1), u).mean()
                w = self.assignment_weights(u_img, h)
                terms["entail_attribute_image"] = (w * m.entailment_loss(u_img, h.unsqueeze(1))).sum(1).mean()
            else:
                terms["entail_attribute_category"] = m.entailment_loss(u, g.unsqueeze(1)).mean()
                terms["entail_category_image"] = m.entailment_loss(g[pos], h).mean()
        if cfg.diversity_weight > 0 and cfg.num_attributes > 1:
            a = F.normalize(nodes.attributes, dim=-1)
            gram = a @ a.transpose(1, 2)  # [C_B, K, K]
            k = cfg.num_attributes
            off = ~torch.eye(k, dtype=torch.bool, device=gram.device)
            terms["diversity"] = (gram[:, off] ** 2).mean()
        return terms

    def assignment_weights(self, attribute_points: Tensor, image_points: Tensor) -> Tensor:
        """``w [B, K]``: each image's weights over its class's K attributes (rows sum to 1)."""
        d = self.manifold.dist(attribute_points, image_points.unsqueeze(1))
        w = torch.softmax(-d / self.config.assignment_temperature, dim=-1)
        if self.config.assignment == "hard":
            hard = F.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype)
            w = hard + w - w.detach()  # straight-through: forward top-1, backward the softmax's gradient
        return w

    def depths(self, nodes: HierarchyNodes) -> dict[str, float]:
        """Mean distance from the origin of each node type (the intended order: category < attribute < image)."""
        m = self.manifold
        with torch.no_grad():
            return {"depth_category": float(m.depth(nodes.category_points).mean()),
                    "depth_attribute": float(m.depth(nodes.attribute_points).mean()),
                    "depth_image": float(m.depth(nodes.image_points).mean())}

    # ------------------------------------------------------------------ training
    def param_groups(self) -> list[dict[str, Any]]:
        scalars = [p for p in scalar_parameters(self) if p.requires_grad]
        attrs = [p for p in (getattr(self, "attribute_context", None), getattr(self, "attribute_vectors", None))
                 if p is not None]
        taken = {id(p) for p in scalars + attrs}
        main = [p for p in self.trainable_parameters() if id(p) not in taken]
        groups = [{"params": main, "name": "adapters"},
                  {"params": attrs, "name": "attributes", "lr_scale": self.config.attribute_lr_scale},
                  {"params": scalars, "name": "scalars", "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def feature_step(self, features: Tensor, labels: Tensor, step: StepInfo | None = None) -> StepOutput:
        step = step if step is not None else StepInfo.single(labels)
        cfg = self.config
        y = labels.to(self.device)
        image_hat = self.adapt_image(features.to(self.device).float() * math.sqrt(self.dim))
        text_hat = self.adapt_text(self.category_features())
        logits = self.clip.logit_scale.exp().float() * F.normalize(image_hat, dim=-1) @ F.normalize(text_hat, dim=-1).t()
        ce = F.cross_entropy(logits, y)
        loss, extras = ce, {"ce": float(ce.detach())}
        if cfg.contrast_weight > 0 or cfg.entailment_weight > 0 or cfg.diversity_weight > 0:
            nodes = self.hierarchy_nodes(image_hat, text_hat, y, step.global_labels)
            weights = {"contrast": cfg.contrast_weight, "diversity": cfg.diversity_weight}
            for name, value in self.hierarchy_losses(nodes).items():
                loss = loss + weights.get(name, cfg.entailment_weight) * value
                extras[name] = float(value.detach())
            extras.update(self.depths(nodes))
        return StepOutput(loss=loss, logits=logits, labels=y, extras=extras)

    # ------------------------------------------------------------------ inference
    def _eval_text(self) -> dict[str, Tensor]:
        @torch.no_grad()
        def compute() -> dict[str, Tensor]:
            cfg = self.config
            t = self.category_features()
            out = {"text_hat": self.adapt_text(t), "text": t}
            if cfg.hyperbolic_weight > 0:
                out["category_points"] = self.lift_text(out["text_hat"])
            if cfg.attribute_weight > 0:
                ids = torch.arange(len(self.classnames))
                chunk = max(1, cfg.text_batch_size // cfg.num_attributes)
                out["attributes"] = torch.cat([self.attribute_features(ids[i:i + chunk])
                                               for i in range(0, len(ids), chunk)])
            return out

        key = (tuple(self.classnames), tuple(self.templates), weights_state([self]))
        return self._eval_cache.get(key, compute)

    def feature_logits(self, features: Tensor) -> Tensor:
        cfg = self.config
        text = self._eval_text()
        s = self.clip.logit_scale.exp().float()
        v = features.to(self.device).float() * math.sqrt(self.dim)
        v_hat = self.adapt_image(v)
        v_unit = F.normalize(v_hat, dim=-1)
        logits = s * v_unit @ F.normalize(text["text_hat"], dim=-1).t()
        if cfg.zeroshot_weight > 0:
            logits = logits + cfg.zeroshot_weight * s * F.normalize(v, dim=-1) @ F.normalize(text["text"], dim=-1).t()
        if cfg.hyperbolic_weight > 0:
            d = self.manifold.pairwise_dist(self.lift_image(v_hat), text["category_points"])
            logits = logits - cfg.hyperbolic_weight * self.hyperbolic_logit_scale.value() * d
        if cfg.attribute_weight > 0:
            sims = s * torch.einsum("be,cke->bck", v_unit, F.normalize(text["attributes"], dim=-1))
            pooled = sims.amax(-1) if cfg.attribute_pool == "max" else sims.mean(-1)
            logits = logits + cfg.attribute_weight * pooled
        return logits

    def evaluation_info(self) -> dict[str, Any]:
        cfg = self.config
        branches = ["adapter"] + [name for name, w in (("zeroshot", cfg.zeroshot_weight),
                                                         ("hyperbolic", cfg.hyperbolic_weight),
                                                         ("attribute", cfg.attribute_weight)) if w > 0]
        return {"templates": len(self.templates), "inference": "+".join(branches)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "variant": "LatH-style (unofficial reference design)"}
