"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a key-value cache of the few-shot images.

What it computes, for an image feature ``f`` (frozen CLIP image encoder, L2-normalized):

* **cache** (built once in :meth:`TipAdapter.prepare`): keys ``K [N*K, E]`` = the frozen features of
  the N*K few-shot training images, each the mean over ``augment_epoch`` (10) seeded training
  augmentations of the image (the reference's: random crops over ``cache_crop_scale`` = 50-100% of the
  area, bicubic, flip), then L2-normalized (``FeatureSource.image_features("train",
  augment_passes=10, crop_scale=(0.5, 1.0))``); values ``V [N*K, C]`` = their one-hot labels;
* **logits** = ``100 * f W^T + alpha * exp(-(beta - beta * f K^T)) V``: ``W [C, E]`` the frozen text
  classifier (the mean of the L2-normalized text features over the templates, normalized again), 100
  a literal (the reference writes ``100.``, not CLIP's learned scale; ``logit_scale: null`` uses the
  backbone's), the cache term multiplied by ``alpha`` and nothing else;
* **alpha, beta**: grid-searched for the best accuracy, ``beta`` in ``0.1 + i (search_scale[0] - 0.1) /
  search_step[0]`` for ``i < search_step[0]`` (the end point is not in the grid), ``alpha`` likewise
  with index 1, beta the outer loop; the first best pair wins (strictly better replaces it). Without
  a search the values are ``init_alpha`` and ``init_beta``.

**Tip-Adapter-F** (``tip_adapter_f``) makes the keys a parameter (``N*K*E`` numbers; the values stay
fixed) trained with cross-entropy on the same logits computed with ``init_alpha`` / ``init_beta``
(the run config: AdamW lr 1e-3, eps 1e-4, the reference's AdamW weight decay 0.01, a per-iteration
cosine over ``train_epoch * len(loader)`` steps, batch 256, 20 epochs), then alpha and beta are
searched with the trained keys.

Differences from the reference code (gaopengcuhk/Tip-Adapter, ``main.py`` / ``main_imagenet.py``):

* alpha and beta are searched **on the validation split only**: :func:`search_alpha_beta` receives
  validation features and labels, and :meth:`TipAdapter.prepare` only ever asks its feature source
  for the "train" and "val" splits. The reference's ImageNet script searches on the test set; ImageNet
  has no validation split here, so with ``search: true`` a dataset without one is an error
  (``method.search=false`` uses ``init_alpha`` / ``init_beta``). The validation split is the one the
  protocol gives (CoOp's few-shot val, ``min(K, 4)`` images per class), not the full val split the
  reference loads.
* Tip-Adapter-F keeps the keys of the **last epoch**. The reference evaluates on the test set after
  every epoch and keeps the epoch with the best test accuracy (and reports the larger of that and the
  post-search accuracy); vladapt never looks at the test set before the final evaluation.
* Tip-Adapter-F searches alpha/beta at the end of every epoch (:meth:`on_epoch_end`, on the stored
  validation features; training itself always uses ``init_alpha`` / ``init_beta``), so each epoch's
  checkpoint predicts with the values searched for its keys, and the last search is the reference's
  post-training search. It is cheap next to an epoch of image encoding.
* Computation in float32 (the reference runs fp16 weights and features); the reference's AdamW
  updates fp16 keys, vladapt's engine keeps fp32 master weights under autocast.
* The class vote uses the one-hot values of the classes the method was prepared on; asked to
  classify classes outside its cache (base-to-new's new classes, other datasets) it raises a
  :class:`~vladapt.errors.ConfigError`: Tip-Adapter cannot classify unseen classes. A subset or
  reordering of the cached classes (e.g. ImageNet-A/-R's 200 ImageNet classes) uses the matching
  columns of the cache.

Per-dataset values: ``init_alpha``, ``init_beta``, ``search_scale``, ``search_step`` left at ``null``
take the reference's value for the dataset (its ``configs/<dataset>.yaml``, :data:`REFERENCE_SETTINGS`;
unknown and custom datasets: ImageNet's). The templates ``tip`` are the reference's choice: CLIP's
seven-template ImageNet ensemble for the ImageNet family, CoOp's single template otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone
from vladapt.errors import ConfigError
from vladapt.methods.base import FeatureSource, Method, StepInfo, StepOutput
from vladapt.methods.classifier import ClassifierCache, build_text_classifier, weights_state
from vladapt.methods.registry import register_method
from vladapt.methods.templates import resolve_templates

# The reference's configs/<dataset>.yaml: init_beta, init_alpha, search_scale [beta, alpha],
# search_step [beta, alpha]. Its train_epoch is 20 everywhere except EuroSAT (100); lr 0.001,
# augment_epoch 10 and 16 shots everywhere.
REFERENCE_SETTINGS: dict[str, dict[str, Any]] = {
    "imagenet": {"init_beta": 1.0, "init_alpha": 1.17, "search_scale": [7.0, 3.0], "search_step": [200, 20]},
    "caltech101": {"init_beta": 1.0, "init_alpha": 3.0, "search_scale": [12.0, 5.0], "search_step": [200, 20]},
    "dtd": {"init_beta": 1.0, "init_alpha": 2.0, "search_scale": [13.0, 13.0], "search_step": [200, 20]},
    "eurosat": {"init_beta": 1.0, "init_alpha": 2.0, "search_scale": [12.0, 10.0], "search_step": [200, 20]},
    "fgvc_aircraft": {"init_beta": 1.0, "init_alpha": 5.0, "search_scale": [30.0, 30.0], "search_step": [200, 20]},
    "food101": {"init_beta": 1.0, "init_alpha": 1.17, "search_scale": [10.0, 10.0], "search_step": [200, 20]},
    "oxford_flowers": {"init_beta": 1.0, "init_alpha": 10.0, "search_scale": [50.0, 50.0], "search_step": [200, 20]},
    "oxford_pets": {"init_beta": 1.0, "init_alpha": 1.17, "search_scale": [7.0, 3.0], "search_step": [200, 20]},
    "stanford_cars": {"init_beta": 1.0, "init_alpha": 3.0, "search_scale": [20.0, 10.0], "search_step": [200, 20]},
    "sun397": {"init_beta": 1.0, "init_alpha": 1.17, "search_scale": [12.0, 10.0], "search_step": [200, 20]},
    "ucf101": {"init_beta": 1.0, "init_alpha": 3.0, "search_scale": [7.0, 3.0], "search_step": [200, 20]},
}
DEFAULT_SETTINGS = "imagenet"
IMAGENET_FAMILY = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")

UNSEEN = ("Tip-Adapter cannot classify unseen classes: its cache holds labelled images of the {n} classes it "
          "was prepared on only{detail}. Base-to-new (new classes) and cross-dataset evaluation do not apply "
          "to it; use the fewshot protocol (--protocol fewshot)")


def reference_settings(dataset: str | None) -> dict[str, Any]:
    """The reference's per-dataset init/search values (ImageNet's for datasets it has no config for)."""
    return REFERENCE_SETTINGS.get((dataset or "").lower(), REFERENCE_SETTINGS[DEFAULT_SETTINGS])


def tip_templates(spec: str | list[str], dataset: str | None) -> list[str]:
    """``tip``: the reference's templates (CLIP's 7 ImageNet templates for the ImageNet family, CoOp's
    template of the dataset otherwise); anything else as :func:`resolve_templates`."""
    if spec == "tip":
        spec = "simple_imagenet" if (dataset or "").lower() in IMAGENET_FAMILY else "dataset"
    return resolve_templates(spec, dataset)


def search_grid(scale: float, steps: int) -> list[float]:
    """The reference's grid: ``0.1 + i (scale - 0.1) / steps`` for ``i = 0 .. steps - 1`` (no end point)."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def cache_logits(affinity: Tensor, values: Tensor, beta: float | Tensor) -> Tensor:
    """``exp(-(beta - beta * affinity)) @ values`` (the reference's arrangement of exp(-beta (1 - A)))."""
    return (-(beta - beta * affinity)).exp() @ values


class SearchResult(NamedTuple):
    beta: float
    alpha: float
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.total, 1)


@torch.no_grad()
def search_alpha_beta(val_features: Tensor, val_labels: Tensor, keys: Tensor, values: Tensor, text_weights: Tensor,
                      search_scale: list[float], search_step: list[int], logit_scale: float = 100.0) -> SearchResult:
    """The (beta, alpha) of the grid with the best accuracy on ``val_features [M, E]`` / ``val_labels [M]``.

    ``keys [NK, E]``, ``values [NK, C]``, ``text_weights [C, E]``; the grid is :func:`search_grid` of
    ``search_scale[0]``, ``search_step[0]`` (beta, outer loop) and of index 1 (alpha, inner loop); the
    first best pair wins. It sees validation data only: the caller passes the validation split.
    """
    f = val_features.float()
    y = val_labels.to(f.device)
    clip_logits = logit_scale * f @ text_weights.float().t()
    affinity = f @ keys.float().t()
    values = values.float()
    betas, alphas = search_grid(search_scale[0], search_step[0]), search_grid(search_scale[1], search_step[1])
    best: SearchResult | None = None
    for beta in betas:
        cache = cache_logits(affinity, values, beta)
        for alpha in alphas:
            correct = int((torch.argmax(clip_logits + cache * alpha, dim=-1) == y).sum())
            if best is None or correct > best.correct:
                best = SearchResult(beta, alpha, correct, len(y))
    assert best is not None
    return best


@dataclass
class TipAdapterConfig:
    """Tip-Adapter's settings (the reference's configs/<dataset>.yaml; null = the dataset's value)."""

    templates: str | list[str] = field(default="tip", metadata={
        "help": "'tip' (the reference's: CLIP's 7 ImageNet templates for the ImageNet family, CoOp's template "
                "otherwise), 'dataset', an ensemble name, a template or a list"})
    dataset: str | None = field(default=None, metadata={"help": "whose templates and reference values null means"})
    logit_scale: float | None = field(default=100.0, metadata={
        "min": 0.0, "help": "scale of the CLIP logits (the reference's literal 100); null = the backbone's"})
    augment_epoch: int = field(default=10, metadata={"min": 1, "help": "augmented passes averaged into each cache key"})
    cache_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={
        "help": "area range of the random crops of the cache keys' augmented passes (the reference's "
                "RandomResizedCrop scale (0.5, 1))"})
    init_beta: float | None = field(default=None, metadata={
        "min": 0.0, "help": "beta before the search and in Tip-Adapter-F's training; null = the reference's for the dataset"})
    init_alpha: float | None = field(default=None, metadata={
        "min": 0.0, "help": "alpha before the search and in Tip-Adapter-F's training; null = the reference's"})
    search: bool = field(default=True, metadata={"help": "grid-search alpha and beta on the validation split"})
    search_scale: list[float] | None = field(default=None, metadata={
        "help": "[beta, alpha] grid ends (excluded), from 0.1; null = the reference's for the dataset"})
    search_step: list[int] | None = field(default=None, metadata={
        "help": "[beta, alpha] grid sizes; null = the reference's ([200, 20])"})
    text_batch_size: int = field(default=256, metadata={"min": 1})

    def validate(self) -> None:
        tip_templates(self.templates, self.dataset)
        if len(self.cache_crop_scale) != 2 or not 0.0 < self.cache_crop_scale[0] <= self.cache_crop_scale[1] <= 1.0:
            raise ConfigError(f"method.cache_crop_scale must be two area fractions 0 < low <= high <= 1, "
                              f"got {self.cache_crop_scale}")
        if self.search_scale is not None and (len(self.search_scale) != 2 or min(self.search_scale) <= 0):
            raise ConfigError(f"method.search_scale must be two positive numbers [beta, alpha], got {self.search_scale}")
        if self.search_step is not None and (len(self.search_step) != 2 or min(self.search_step) < 1):
            raise ConfigError(f"method.search_step must be two grid sizes >= 1 [beta, alpha], got {self.search_step}")


@register_method("tip_adapter")
class TipAdapter(Method):
    """Tip-Adapter (training-free): see the module docstring."""

    Config = TipAdapterConfig
    trainable = False
    # It classifies frozen features: the protocols evaluate it on cached test features.
    feature_level = True
    # The cache holds the training classes only: no base-to-new (new classes) nor cross-dataset.
    unseen_classes: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        self.dataset = self.config.dataset
        self.dim = self.clip.text_projection.shape[1]
        self.cache_classnames = list(classnames)
        self._init_keys(torch.zeros(0, self.dim))
        self.register_state_buffer("cache_values", torch.zeros(0, len(classnames)))
        s = self.settings()
        self.register_state_buffer("beta", torch.tensor(float(s["init_beta"])))
        self.register_state_buffer("alpha", torch.tensor(float(s["init_alpha"])))
        self._text_cache = ClassifierCache()
        self._columns_key: tuple | None = None
        self._columns_value: Tensor | None = None
        self.last_search: SearchResult | None = None
        self.to(self.device)

    def _init_keys(self, keys: Tensor) -> None:
        self.register_state_buffer("cache_keys", keys)

    def _set_keys(self, keys: Tensor) -> None:
        self._set_buffer("cache_keys", keys)

    # ------------------------------------------------------------------ settings and text
    def settings(self) -> dict[str, Any]:
        """init_beta, init_alpha, search_scale, search_step in effect (the config's, else the reference's)."""
        ref, cfg = reference_settings(self.dataset), self.config
        return {k: ref[k] if getattr(cfg, k) is None else getattr(cfg, k)
                for k in ("init_beta", "init_alpha", "search_scale", "search_step")}

    @property
    def templates(self) -> list[str]:
        key = (repr(self.config.templates), self.dataset)
        if getattr(self, "_resolved", (None, None))[0] != key:
            self._resolved = (key, tip_templates(self.config.templates, self.dataset))
        return self._resolved[1]

    def text_classifier(self) -> Tensor:
        """``[C, E]`` L2-normalized, over the current class names."""
        templates = self.templates
        key = (tuple(self.classnames), tuple(templates), weights_state([self.clip]))
        return self._text_cache.get(key, lambda: build_text_classifier(
            self.clip.encode_text, self.backbone.tokenizer, self.classnames, templates, self.device,
            self.config.text_batch_size, self.progress))

    def clip_logit_scale(self) -> float:
        s = self.config.logit_scale
        return float(self.clip.logit_scale.exp()) if s is None else s

    # ------------------------------------------------------------------ classes
    @property
    def cache_built(self) -> bool:
        return self.cache_keys.shape[0] > 0

    def set_classnames(self, classnames: list[str], dataset: str | None = None, split: str | None = None) -> None:
        if split == "new":
            raise ConfigError(UNSEEN.format(n=len(self.cache_classnames), detail=", and it was asked for new classes"))
        if self.cache_built:
            self._cache_columns(list(classnames))  # fail now, not at the first batch
        super().set_classnames(classnames, dataset, split)
        if not self.cache_built:
            self.cache_classnames = list(classnames)

    def _cache_columns(self, classnames: list[str]) -> Tensor | None:
        """Indices of ``classnames`` among the cached classes (``None``: the same list)."""
        if classnames == self.cache_classnames:
            return None
        key = (tuple(classnames), tuple(self.cache_classnames))
        if self._columns_key != key:
            index = {}
            for i, name in enumerate(self.cache_classnames):
                index.setdefault(name, i)
            missing = [c for c in classnames if c not in index]
            if missing:
                raise ConfigError(UNSEEN.format(
                    n=len(self.cache_classnames),
                    detail=f"; {len(missing)} of the {len(classnames)} requested classes are not among them "
                           f"(e.g. {missing[:3]})"))
            self._columns_key, self._columns_value = key, torch.tensor([index[c] for c in classnames])
        return self._columns_value

    # ------------------------------------------------------------------ cache and search
    def prepare(self, train: Any, features: FeatureSource | None = None) -> None:
        """Build the cache from the few-shot training images and search alpha/beta on the validation split."""
        if features is None:
            raise ConfigError(f"{type(self).__name__} builds its cache from frozen image features: prepare needs a "
                              "FeatureSource")
        names = list(getattr(train, "classnames", self.classnames))
        cfg = self.config
        val_items = getattr(train, "val", None)
        if cfg.search and val_items is not None and len(val_items) == 0:
            raise ConfigError(self._no_val_message(train))
        keys, labels = features.image_features("train", augment_passes=cfg.augment_epoch,
                                               crop_scale=tuple(cfg.cache_crop_scale))
        if len(keys) == 0:
            raise ConfigError("Tip-Adapter needs few-shot training images for its cache; the train split is empty")
        self.cache_classnames = names
        super().set_classnames(names, split="train")
        self._set_keys(keys.float().to(self.device))
        self._set_buffer("cache_values", F.one_hot(labels.long(), len(names)).float())
        s = self.settings()
        self.beta.fill_(float(s["init_beta"]))
        self.alpha.fill_(float(s["init_alpha"]))
        self._val: tuple[Tensor, Tensor] | None = None
        if cfg.search:
            val_features, val_labels = features.image_features("val")
            if len(val_features) == 0:
                raise ConfigError(self._no_val_message(train))
            self._val = (val_features.float().to(self.device), val_labels.to(self.device))
            self.search()

    def _no_val_message(self, train: Any) -> str:
        return (f"dataset {getattr(train, 'name', self.dataset)!r} has no validation split: Tip-Adapter searches "
                "alpha and beta on the validation split only (never on the test set). Run with "
                "method.search=false to use init_alpha and init_beta (the reference's values for the dataset "
                "unless set)")

    @torch.no_grad()
    def search(self) -> SearchResult:
        """Grid-search alpha and beta on the stored validation features; sets the ``alpha``/``beta`` buffers."""
        if getattr(self, "_val", None) is None:
            raise ConfigError("no validation features to search alpha and beta on: call prepare first")
        if self._cache_columns(self.classnames) is not None:
            raise ConfigError("the search needs the cached classes as the current class names")
        s = self.settings()
        result = search_alpha_beta(self._val[0], self._val[1], self.cache_keys.detach(), self.cache_values,
                                   self.text_classifier(), s["search_scale"], s["search_step"],
                                   self.clip_logit_scale())
        self.beta.fill_(result.beta)
        self.alpha.fill_(result.alpha)
        self.last_search = result
        return result

    # ------------------------------------------------------------------ logits
    def logits_from_features(self, features: Tensor, alpha: float | Tensor | None = None,
                             beta: float | Tensor | None = None) -> Tensor:
        """Tip-Adapter's logits over the current class names from L2-normalized image features ``[B, E]``."""
        f = features.to(self.device).float()
        columns = self._cache_columns(self.classnames)
        logits = self.clip_logit_scale() * f @ self.text_classifier().t()
        if not self.cache_built:
            return logits
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        cache = cache_logits(f @ self.cache_keys.t(), self.cache_values, beta)
        if columns is not None:
            cache = cache[:, columns.to(cache.device)]
        return logits + cache * alpha

    def feature_logits(self, features: Tensor) -> Tensor:
        return self.logits_from_features(features)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits_from_features(self.frozen_image_features(images))

    # ------------------------------------------------------------------ checkpoints and reports
    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        super().load_checkpoint_state(state)
        n, c = self.cache_values.shape
        if self.cache_keys.shape[0] != n or (n and c != len(self.cache_classnames)):
            raise ValueError(f"the cache has {self.cache_keys.shape[0]} keys, {n} values over {c} classes, but "
                             f"the method has {len(self.cache_classnames)} classes")

    def evaluation_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"templates": len(self.templates), "cache_size": int(self.cache_keys.shape[0]),
                                "alpha": round(float(self.alpha), 6), "beta": round(float(self.beta), 6),
                                "search": "val" if self.config.search else "off"}
        if self.last_search is not None:
            info["val_accuracy"] = self.last_search.accuracy
        return info

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "settings": self.settings(), "cache_size": int(self.cache_keys.shape[0])}


@register_method("tip_adapter_f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys are trained (N*K*E parameters), the values are fixed.

    Training uses ``init_alpha``/``init_beta``; alpha and beta are searched on the validation split
    after :meth:`prepare` (an untrained Tip-Adapter-F is Tip-Adapter) and after every epoch. The keys
    of the last epoch are kept (the reference keeps the epoch with the best test accuracy).
    """

    trainable = True
    feature_level = True

    def _init_keys(self, keys: Tensor) -> None:
        self.cache_keys = nn.Parameter(keys)

    def _set_keys(self, keys: Tensor) -> None:
        self.cache_keys = nn.Parameter(keys.detach().clone().to(self.device))

    def feature_step(self, features: Tensor, labels: Tensor, step: StepInfo | None = None) -> StepOutput:
        if not self.cache_built:
            raise ConfigError("Tip-Adapter-F trains the keys of its cache: call prepare first")
        s = self.settings()
        y = labels.to(self.device)
        logits = self.logits_from_features(features, alpha=float(s["init_alpha"]), beta=float(s["init_beta"]))
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss=loss, logits=logits, labels=y, extras={"ce": float(loss.detach())})

    def on_epoch_end(self, epoch: int) -> None:
        if self.config.search and getattr(self, "_val", None) is not None:
            self.search()

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        keys = state.get("cache_keys")
        if keys is not None and keys.shape != self.cache_keys.shape:  # a cache of another N*K
            self._set_keys(torch.zeros(keys.shape, dtype=self.cache_keys.dtype))
        super().load_checkpoint_state(state)
