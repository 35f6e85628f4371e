"""HeBA: Heterogeneous Bottleneck Adapters (Islam, arXiv 2603.16653), as specified in METHODS.md §1.

Depthwise-conv bottleneck adapters on the visual patch grid and linear bottleneck adapters on the
text tokens, at the attention input and the MLP hidden positions of blocks
``adapter_start..adapter_end`` (1-based) of both towers, each inside the scaled residual R_s with
gradient-scale layers; slow/fast stochastic scales in training; negative class sampling; one random
prompt per class per step and template averaging at test; label-smoothed cross-entropy.

Differences from the released reference code (each reproducible where it matters):

* Description banks (CuPL JSON ``{classname: [sentences]}``) really load from ``descriptions``; a
  class missing from the bank is an error (``strict_descriptions``) instead of a silent fallback.
  Without a bank each class gets one prompt, ``"a photo of a {c}."``; ``reference_prompts=true``
  gives the prompt every class gets in the released code, whose description loader always fails:
  ``"a photo of a {c}, a photo of a {c}."``.
* ``eval_scale`` / ``new_eval_scale`` are real options. Default: the training base scale for both,
  which is what the released code does (its ADAPTER_SCALE_NOVEL = 0.010 is never read); the result
  record stores the scale used for each number.
* The negative-sampling corner case with exactly one negative class works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vladapt.backbones import Backbone
from vladapt.errors import ConfigError
from vladapt.methods.adapters import AdapterMethod, SlowFastScale
from vladapt.methods.heba_modules import build_heba_adapters
from vladapt.methods.registry import register_method


@dataclass
class HeBAConfig:
    """HeBA's settings; the defaults are the base-to-new configuration of the paper's code."""

    adapter_start: int = field(default=1, metadata={"min": 1, "help": "first adapted block (1-based)"})
    adapter_end: int | None = field(default=None, metadata={"min": 1, "help": "last adapted block; none = the last"})
    towers: list[str] = field(default_factory=lambda: ["visual", "text"])
    positions: list[str] = field(default_factory=lambda: ["attn_in", "mlp_hidden"])
    reduction: int = field(default=4, metadata={"min": 1})
    scale: float = field(default=0.025, metadata={"min": 0.0, "help": "base adapter scale s_base"})
    scale_factor: float = field(default=2.25, metadata={"min": 0.0, "help": "fast scale = scale * scale_factor"})
    slow_fast_ratio: float = field(default=0.8, metadata={"min": 0.0, "max": 1.0, "help": "P(fast) = 1 - ratio"})
    eval_scale: float | None = field(default=None, metadata={"min": 0.0, "help": "test scale; none = scale"})
    new_eval_scale: float | None = field(
        default=None, metadata={"min": 0.0, "help": "test scale on new classes; none = eval_scale"})
    neg_sampling_ratio: int = field(default=5, metadata={"help": "negatives per positive class; <0 = all classes"})
    label_smoothing: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    text_prefix: str = "a photo of a"
    descriptions: str | None = field(default=None, metadata={"help": "CuPL JSON {classname: [sentences]}"})
    strict_descriptions: bool = True
    reference_prompts: bool = False
    text_batch_size: int = field(default=256, metadata={"min": 1})

    def validate(self) -> None:
        if self.adapter_end is not None and self.adapter_end < self.adapter_start:
            raise ConfigError(f"method.adapter_end ({self.adapter_end}) is below method.adapter_start "
                              f"({self.adapter_start})")
        for t in self.towers:
            if t not in ("visual", "text"):
                raise ConfigError(f"method.towers: {t!r} is not allowed; choose from ['visual', 'text']")
        for p in self.positions:
            if p not in ("attn_in", "mlp_hidden"):
                raise ConfigError(f"method.positions: {p!r} is not allowed; choose from ['attn_in', 'mlp_hidden']")


@register_method("heba")
class HeBA(AdapterMethod):
    Config = HeBAConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        self.adapters = torch.nn.ModuleDict()
        for tower in cfg.towers:  # towers may differ in depth (e.g. ViT-L: 24 visual, 12 text blocks)
            end = cfg.adapter_end if cfg.adapter_end is not None else self.clip.num_layers(tower)
            self.adapters.update(build_heba_adapters(self.clip, range(cfg.adapter_start, end + 1), [tower],
                                                     cfg.positions, cfg.reduction, cfg.scale))

    def train_scale_fn(self, generator):
        cfg = self.config
        return SlowFastScale(cfg.scale, cfg.scale_factor, cfg.slow_fast_ratio, generator=generator)

    def eval_scale(self) -> float:
        cfg = self.config
        scale = cfg.eval_scale if cfg.eval_scale is not None else cfg.scale
        if self.split == "new" and cfg.new_eval_scale is not None:
            scale = cfg.new_eval_scale
        return scale

    current_eval_scale = eval_scale  # the name of earlier releases
