"""LwEIB: Learning with Enriched Inductive Biases (Yang, Zhang, Chen, Xie; IJCV 2025), METHODS.md §4.9.

Three inductive biases on a frozen CLIP, as the authors' released code (``ZjjConan/VLM-LwEIB``,
``trainers/lweib.py`` and ``clip/model.py``) computes them:

* **Text level**: CuPL-enriched prompts ``"a photo of a {c}, {description}"`` (``descriptions``: a
  JSON ``{classname: [sentences]}``, 20 per class in the released files); one random description per
  class per training step, the average of the L2-normalized features over all descriptions at test.
* **Model level**: at the attention input (``LN1(x)``, width ``D``) and the MLP hidden pre-activation
  (width ``4D``) of every block (``adapter_start..adapter_end``, 1-based; all 12 on ViT-B/16) of both
  towers, a residual branch that is a single depthwise convolution, bias-free, with PyTorch's default
  initialization; nothing else (no projection, norm or activation)::

      h' = h + s * DWConv(h)        # inside the gradient-scale wrapper R_s of METHODS.md §0.1

  visual ("spatial adapter"): a 3x3 depthwise ``Conv2d`` on the patch grid, the CLS token passed
  through unchanged; text ("phrase adapter"): a kernel-3 depthwise ``Conv1d`` along the token axis
  over all context positions (SOT, words, EOT, padding), zero-padded on both sides.
* **Optimization level**: the slow-fast scale: per block and tower and per forward pass,
  ``s = scale * scale_factor`` with probability ``1 - slow_fast_ratio`` (0.2), else ``scale``
  (0.025, factor 2.5); ``s = scale`` at test, for base and new classes alike.

Training: negative class sampling (ratio 7: the batch's classes plus up to 7 absent classes per
present one, when there are more classes than the batch size), plain cross-entropy, SGD lr 0.28 for
25 epochs at batch 16. Trainable parameters on ViT-B/16: ``12 * (9 * (768 + 3072) + 3 * (512 + 2048))
= 506,880``.

Matching the released code (``tests/methods/test_parity.py`` compares logits, loss and every adapter
gradient with it); options and differences, none of which changes its numbers with the defaults:

* The text tower runs over the whole context (``truncate_text`` is False): the symmetric
  convolution mixes position ``t + 1`` into ``t``, so the EOT feature depends on the padding token
  after it, as in the released code. ``text_conv: causal`` (ours, not in the paper or the code)
  uses the positions ``t - 2, t - 1, t`` instead, which keeps the text transformer causal.
* ``eval_scale`` / ``new_eval_scale`` are options (default: ``scale`` for both, as released).
* A class without descriptions is an error (``strict_descriptions``; the released code raises a
  ``KeyError``); with ``strict_descriptions: false`` it gets ``"a photo of a {c}."``, and classes
  with fewer descriptions are padded with their first prompt (the released code needs equal counts).
  Without a description bank every class gets ``"a photo of a {c}."``.
* Negative sampling draws from the step's generator; the released code's condition
  ``C > image.size(0)`` reads the per-GPU batch under DataParallel, vladapt the configured batch.

Defects of the released code worth knowing (none is reached by its configurations):
``update_adapter_scale`` is never called; the test-time text classifier is cached without
invalidation (fine for Dassl's single final test); with ``PREC = "fp16"`` the token ids are cast to
fp16 before the EOT ``argmax``: ids from 49,392 up round to 49,408, the SOT token (49,406) at
position 0 ties with the EOT (49,407) and wins, so every prompt would be read at its SOT position
(``amp``, the released setting, and ``fp32`` keep the ids exact); ``DWConvNormAct`` has neither a
norm nor an activation. By design, the last visual block's MLP adapter changes only patch tokens
that nothing reads afterwards (the image feature is the CLS token's): its weights get no loss
gradient, only weight decay (27,648 of the 506,880 parameters on ViT-B/16), in the released code as here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones import Backbone, InsertionPoint
from vladapt.errors import ConfigError
from vladapt.methods.adapters import AdapterMethod, SlowFastScale, block_range, build_point_modules, check_towers
from vladapt.methods.heba_modules import HEBA_POSITIONS, PointResidual
from vladapt.methods.registry import register_method

__all__ = ["LWEIB_POSITIONS", "DepthwiseConvBranch", "LwEIB", "LwEIBConfig", "LwEIBPointAdapter"]

LWEIB_POSITIONS: tuple[str, ...] = HEBA_POSITIONS  # ("attn_in", "mlp_hidden"): HeBA inherited LwEIB's points
TEXT_CONVS: tuple[str, ...] = ("symmetric", "causal")


class DepthwiseConvBranch(nn.Module):
    """LwEIB's adapter branch (the released ``DWConvNormAct``): one bias-free depthwise convolution of width ``D``.

    * spatial (visual): ``z [B, H*W, D]`` with ``grid=(H, W)`` -> ``Conv2d(D, D, k, padding=k//2,
      groups=D)`` on the ``[B, D, H, W]`` grid (zero padding at the border) -> ``[B, H*W, D]``;
    * along the tokens (text): ``z [B, L, D]`` -> ``Conv1d(D, D, k, groups=D)`` over the ``L`` axis,
      zero-padded by ``k // 2`` on both sides (``causal=False``, the released code) or by ``k - 1``
      on the left (``causal=True``: position ``t`` sees ``t-k+1..t``).

    Initialization: PyTorch's default for convolutions (Kaiming-uniform with ``a = sqrt(5)``, i.e.
    ``U(+-1/sqrt(fan_in))`` with ``fan_in = k*k`` or ``k``), drawn from ``generator`` when given.
    The output is not small at initialization; the scale of the surrounding residual keeps the
    adapted feature close to the frozen one.

    Outside autocast the input is cast to the weight's dtype and the output back to the input's.
    """

    def __init__(self, width: int, *, spatial: bool, kernel_size: int = 3, causal: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"LwEIB's kernel size must be a positive odd number; got {kernel_size}")
        if spatial and causal:
            raise ConfigError("a causal convolution is only defined along the text tokens")
        self.width = width
        self.spatial = spatial
        self.kernel_size = kernel_size
        self.causal = causal
        conv = nn.Conv2d if spatial else nn.Conv1d
        self.conv = conv(width, width, kernel_size, padding=0 if causal else kernel_size // 2, groups=width,
                         bias=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # PyTorch's Conv default, re-drawn so that a seeded generator can drive it.
        nn.init.kaiming_uniform_(self.conv.weight, a=math.sqrt(5), generator=generator)

    def forward(self, z: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """``[B, H*W, D]`` with ``grid=(H, W)`` (spatial) or ``[B, L, D]`` (tokens) -> same shape and dtype."""
        zw = z if torch.is_autocast_enabled(z.device.type) else z.to(self.conv.weight.dtype)
        b, n, d = zw.shape
        if self.spatial:
            if grid is None:
                raise ValueError("the spatial LwEIB branch needs the patch grid (H, W)")
            # channels-last view of the token-major tensor: no copy before the convolution
            y = self.conv(zw.view(b, grid[0], grid[1], d).permute(0, 3, 1, 2))
            y = y.permute(0, 2, 3, 1).reshape(b, n, d)
        else:
            t = zw.transpose(1, 2)  # [B, D, L]
            if self.causal:
                t = F.pad(t, (self.kernel_size - 1, 0))
            y = self.conv(t).transpose(1, 2)
        return y.to(z.dtype)

    def extra_repr(self) -> str:
        return f"width={self.width}, spatial={self.spatial}, kernel_size={self.kernel_size}, causal={self.causal}"


class LwEIBPointAdapter(PointResidual):
    """What LwEIB attaches at one point: :class:`~vladapt.methods.heba_modules.PointResidual`,
    ``R_s(h) = h + s * DWConv(h)``, with a :class:`DepthwiseConvBranch` (the same wrapper as HeBA's
    around another branch: visual points adapt the patch tokens on their grid and pass the CLS tokens
    through bit-identically; text points adapt every position)."""

    def __init__(self, point: InsertionPoint, scale: float = 0.025, kernel_size: int = 3, text_conv: str = "symmetric",
                 generator: torch.Generator | None = None) -> None:
        if point.kind not in LWEIB_POSITIONS:
            raise ConfigError(f"LwEIB adapters go at {list(LWEIB_POSITIONS)} points, not at {point.name}")
        if text_conv not in TEXT_CONVS:
            raise ConfigError(f"text_conv must be one of {list(TEXT_CONVS)}; got {text_conv!r}")
        super().__init__(point, lambda spatial: DepthwiseConvBranch(
            point.width, spatial=spatial, kernel_size=kernel_size, causal=not spatial and text_conv == "causal",
            generator=generator), scale)


@dataclass
class LwEIBConfig:
    """LwEIB's settings; the defaults are the released ``configs/trainers/LwEIB/base2new.yaml``."""

    adapter_start: int = field(default=1, metadata={"min": 1, "help": "first adapted block (1-based)"})
    adapter_end: int | None = field(default=None, metadata={"min": 1, "help": "last adapted block; none = the last"})
    towers: list[str] = field(default_factory=lambda: ["visual", "text"])
    positions: list[str] = field(default_factory=lambda: ["attn_in", "mlp_hidden"])
    kernel_size: int = field(default=3, metadata={"min": 1, "help": "depthwise kernel (odd): k x k visual, k text"})
    text_conv: str = field(default="symmetric", metadata={
        "choices": list(TEXT_CONVS),
        "help": "symmetric: the text kernel sees t-1, t, t+1 (released code); causal: t-2, t-1, t (ours)"})
    scale: float = field(default=0.025, metadata={"min": 0.0, "help": "base adapter scale"})
    scale_factor: float = field(default=2.5, metadata={"min": 0.0, "help": "fast scale = scale * scale_factor"})
    slow_fast_ratio: float = field(default=0.8, metadata={"min": 0.0, "max": 1.0, "help": "P(fast) = 1 - ratio"})
    eval_scale: float | None = field(default=None, metadata={"min": 0.0, "help": "test scale; none = scale"})
    new_eval_scale: float | None = field(
        default=None, metadata={"min": 0.0, "help": "test scale on new classes; none = eval_scale"})
    neg_sampling_ratio: int = field(default=7, metadata={"help": "negatives per positive class; <0 = all classes"})
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    text_prefix: str = "a photo of a"
    descriptions: str | None = field(default=None, metadata={"help": "CuPL JSON {classname: [sentences]}"})
    strict_descriptions: bool = True
    text_batch_size: int = field(default=256, metadata={"min": 1})

    def validate(self) -> None:
        if self.adapter_end is not None and self.adapter_end < self.adapter_start:
            raise ConfigError(f"method.adapter_end ({self.adapter_end}) is below method.adapter_start "
                              f"({self.adapter_start})")
        check_towers(self.towers)
        for p in self.positions:
            if p not in LWEIB_POSITIONS:
                raise ConfigError(f"method.positions: {p!r} is not allowed; choose from {list(LWEIB_POSITIONS)}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"method.kernel_size must be odd; got {self.kernel_size}")


@register_method("lweib")
class LwEIB(AdapterMethod):
    Config = LwEIBConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config=None) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        layers = {t: block_range(self.clip, t, cfg.adapter_start, cfg.adapter_end, "LwEIB") for t in cfg.towers}
        self.adapters = build_point_modules(self.clip, cfg.towers, layers, cfg.positions, self.make_adapter)
        self.adapters.to(device=self.device, dtype=torch.float32)  # fp32 master weights, whatever the backbone's

    def make_adapter(self, point: InsertionPoint) -> LwEIBPointAdapter:
        cfg = self.config
        return LwEIBPointAdapter(point, cfg.scale, cfg.kernel_size, cfg.text_conv)

    @property
    def truncate_text(self) -> bool:  # type: ignore[override]
        """The symmetric text convolution looks one position ahead: run the whole context then."""
        return "text" not in self.config.towers or self.config.text_conv == "causal"

    def train_scale_fn(self, generator):
        cfg = self.config
        return SlowFastScale(cfg.scale, cfg.scale_factor, cfg.slow_fast_ratio, generator=generator)

    def eval_scale(self) -> float:
        cfg = self.config
        scale = cfg.eval_scale if cfg.eval_scale is not None else cfg.scale
        if self.split == "new" and cfg.new_eval_scale is not None:
            scale = cfg.new_eval_scale
        return scale
