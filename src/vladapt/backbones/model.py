"""A compact CLIP (ViT image tower + causal text transformer) with insertion points.

Why not wrap open_clip's blocks: they use ``nn.MultiheadAttention``, which with frozen weights under
bf16 re-materializes its fused input projection for a non-contiguous input in every block and runs
several times slower than fp32 on CPU. This implementation keeps everything batch-first, uses one
fused q/k/v projection on a contiguous input and ``scaled_dot_product_attention``.

Parameter names equal open_clip's (and OpenAI's) state-dict keys for the standard CLIP ViT, so
checkpoints of either load with ``load_state_dict`` unchanged; ``tests/test_backbone_identity.py``
checks that the outputs match open_clip's own ``encode_image`` / ``encode_text``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vladapt.backbones.points import POINT_KINDS, TOWERS, ForwardContext, InsertionPoint, TokenLayout
from vladapt.errors import BackboneError


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // self.patch_size, self.image_size // self.patch_size)


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        return cls(
            embed_dim=int(d["embed_dim"]),
            vision=VisionConfig(**d["vision"]),
            text=TextConfig(**d["text"]),
            quick_gelu=bool(d.get("quick_gelu", False)),
        )

    @classmethod
    def from_open_clip(cls, name: str, cfg: dict[str, Any], quick_gelu: bool | None = None) -> "CLIPConfig":
        """Translate an open_clip model config; features this implementation lacks are an error."""
        v, t = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
        unsupported = []
        if cfg.get("custom_text") or t.get("hf_model_name"):
            unsupported.append("Hugging Face / custom text tower")
        if v.get("timm_model_name") or not isinstance(v.get("layers", 12), int):
            unsupported.append("timm or ResNet image tower")
        for key, ok in (
            ("ls_init_value", None), ("attentional_pool", False), ("no_ln_pre", False),
            ("final_ln_after_pool", False), ("qk_norm", False), ("scaled_cosine_attn", False),
            ("scale_heads", False), ("scale_attn_inner", False), ("scale_attn", False), ("scale_fc", False),
            ("act_kwargs", None), ("norm_kwargs", None),
        ):
            if v.get(key, ok) != ok:
                unsupported.append(f"vision_cfg.{key}={v[key]!r}")
            if t.get(key, ok) != ok:
                unsupported.append(f"text_cfg.{key}={t[key]!r}")
        if v.get("pool_type", "tok") != "tok":
            unsupported.append(f"vision_cfg.pool_type={v['pool_type']!r}")
        if v.get("pos_embed_type", "learnable") != "learnable":
            unsupported.append(f"vision_cfg.pos_embed_type={v['pos_embed_type']!r}")
        if t.get("pool_type", "argmax") != "argmax" or t.get("embed_cls") or t.get("no_causal_mask"):
            unsupported.append("text pooling other than the causal EOT (argmax) token")
        if t.get("proj_bias") or t.get("proj_type", "linear") != "linear":
            unsupported.append("text projection with bias or of another type")
        if "init_logit_bias" in cfg:
            unsupported.append("logit bias (SigLIP)")
        image_size, patch_size = v.get("image_size", 224), v.get("patch_size", 16)
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            unsupported.append("non-square image or patch size")
        if unsupported:
            raise BackboneError(
                f"open_clip model {name!r} uses features vladapt's CLIP does not implement: "
                + "; ".join(unsupported)
                + ". Supported: standard CLIP ViT image towers (CLS token, patch grid) with a causal text transformer, "
                "e.g. ViT-B-16, ViT-B-16-quickgelu, ViT-B-32, ViT-L-14."
            )
        return cls(
            embed_dim=int(cfg["embed_dim"]),
            vision=VisionConfig(
                image_size=image_size,
                patch_size=patch_size,
                width=int(v.get("width", 768)),
                layers=int(v.get("layers", 12)),
                head_width=int(v.get("head_width", 64)),
                mlp_ratio=float(v.get("mlp_ratio", 4.0)),
            ),
            text=TextConfig(
                context_length=int(t.get("context_length", 77)),
                vocab_size=int(t.get("vocab_size", 49408)),
                width=int(t.get("width", 512)),
                heads=int(t.get("heads", 8)),
                layers=int(t.get("layers", 12)),
                mlp_ratio=float(t.get("mlp_ratio", 4.0)),
            ),
            quick_gelu=bool(cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu),
        )


class LayerNorm(nn.LayerNorm):
    """LayerNorm in the input's dtype, outside autocast.

    PyTorch's CPU and CUDA kernels accumulate the statistics of bf16/fp16 inputs in fp32, which is
    what OpenAI's fp32 cast was for; keeping the output (and the tensor saved for backward) in the
    input's dtype halves the activation memory of a bf16 run, and autocast's fp32 policy for
    layer_norm would otherwise double it again.
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight.to(x.dtype) if self.weight is not None else None
            b = self.bias.to(x.dtype) if self.bias is not None else None
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class _QuickGELU(torch.autograd.Function):
    """``x * sigmoid(1.702 x)`` that saves only ``x`` for its backward: the derivative is SiLU's at
    ``1.702 x`` (``d/dx [silu(1.702 x) / 1.702]``), one fused kernel, where autograd through the
    three-op expression keeps ``x`` and the sigmoid and runs five passes over the MLP-wide tensor."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return _quick_gelu(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, 1.702 * x)


def _quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 x)``, the same values as that expression, in one new tensor (no temporaries)."""
    y = torch.mul(x, 1.702)
    return y.sigmoid_().mul_(x)


class QuickGELU(nn.Module):
    """CLIP's activation ``x * sigmoid(1.702 x)`` (the same forward values either way)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELU.apply(x)
        return _quick_gelu(x)


@functools.lru_cache(maxsize=8)
def _causal_mask(n: int, device: torch.device) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class Attention(nn.Module):
    """Multi-head self-attention, batch-first, parameters named like ``nn.MultiheadAttention``'s."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise BackboneError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool = False, attached: Mapping[str, nn.Module] | None = None,
                ctx: ForwardContext | None = None, queries: int | None = None) -> Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``; ``attached`` may hold the block's ``attn_q``/``attn_k``/
        ``attn_v``/``attn_out`` modules, whose deltas are added to those projections' outputs.
        ``queries = q``: only the outputs of the first ``q`` positions (``[B, q, D]``; keys and values
        still come from all ``N``)."""
        b, n, d = x.shape
        x = x.contiguous()
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if attached:
            # Deltas are added per head after the fused projection: the frozen path stays one
            # matmul, and nothing is added (bit-identical outputs) where no module is attached.
            q, k, v = (
                t + attached[key](x, ctx).to(t.dtype).reshape(b, n, self.heads, -1).transpose(1, 2)
                if key in attached else t
                for key, t in (("attn_q", q), ("attn_k", k), ("attn_v", v))
            )
        if queries is not None and queries < n:
            if causal:
                raise BackboneError("attention over a subset of queries is for the non-causal image tower")
            q, n = q[:, :, :queries], queries
        if x.device.type == "cpu" and torch.is_grad_enabled() and k.shape[2] <= 256:
            # Training through the block on a CPU: for CLIP's short sequences, explicit attention
            # runs forward + backward ~1.5x faster than the flash kernel.
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            if causal:
                scores = scores.masked_fill(_causal_mask(n, x.device), float("-inf"))
            # For bf16/fp16 scores the softmax kernel computes in fp32 and rounds its output once: no fp32
            # copy of the [B, H, N, N] probabilities (nor of their gradient) is made.
            out = scores.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        merged = out.transpose(1, 2).reshape(b, n, d)
        y = self.out_proj(merged)
        if attached and "attn_out" in attached:
            y = y + attached["attn_out"](merged, ctx).to(y.dtype)
        return y


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)


class Block(nn.Module):
    """Pre-LN transformer block with the ``attn_in``, ``mlp_hidden``, ``block``, ``block_ln1`` and ``block_out``
    points and the linear-map points ``attn_q``, ``attn_k``, ``attn_v``, ``attn_out``, ``mlp_fc``, ``mlp_proj``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool,
                 tower: str, index: int, layout: TokenLayout) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = MLP(width, hidden)
        self.act: nn.Module = QuickGELU() if quick_gelu else nn.GELU()
        self.causal = tower == "text"
        self.points = {
            "attn_in": InsertionPoint(tower, "attn_in", index, width, layout),
            "mlp_hidden": InsertionPoint(tower, "mlp_hidden", index, hidden, layout),
            "block": InsertionPoint(tower, "block", index, width, layout),
            "block_ln1": InsertionPoint(tower, "block_ln1", index, width, layout),
            "block_out": InsertionPoint(tower, "block_out", index, width, layout),
            **{k: InsertionPoint(tower, k, index, width, layout) for k in ("attn_q", "attn_k", "attn_v", "attn_out")},
            "mlp_fc": InsertionPoint(tower, "mlp_fc", index, hidden, layout, in_width=width),
            "mlp_proj": InsertionPoint(tower, "mlp_proj", index, width, layout, in_width=hidden),
        }
        # Attached modules are owned (and registered) by the method, not by the backbone: the
        # backbone's state dict and parameter list stay exactly those of the frozen CLIP.
        self.attached: dict[str, nn.Module] = {}

    # Points whose modules see the block's token-wise path after attention; with ``queries`` set
    # they get only the kept positions (see :meth:`keeps_prefix`).
    _AFTER_ATTENTION = ("block_ln1", "attn_out", "mlp_fc", "mlp_hidden", "mlp_proj", "block", "block_out")

    def keeps_prefix(self) -> bool:
        """Whether the block may compute only its first positions' outputs (``forward(queries=q)``)
        with its attached modules: each module after the attention declares that it acts on every
        token alone (``tokenwise = True``: a linear map, a LoRA delta) or passes the prefix (CLS)
        tokens through unchanged (``prefix_passthrough = True``: HeBA's spatial adapters). A module
        that mixes tokens or records something over all of them (RMAdapter's reconstruction loss)
        declares neither, and the block then computes every position."""
        return all(getattr(m, "tokenwise", False) or getattr(m, "prefix_passthrough", False)
                   for k, m in self.attached.items() if k in self._AFTER_ATTENTION)

    def forward(self, x: Tensor, ctx: ForwardContext, queries: int | None = None) -> Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``; ``queries = q``: only the first ``q`` positions' outputs
        ``[B, q, D]`` (the caller checks :meth:`keeps_prefix`; attention still reads all ``N``)."""
        attached = self.attached
        h = self.ln_1(x)
        xq = x if queries is None else x[:, :queries]
        # the parallel branch fed with LN1(x) sees the unmodified attention input
        parallel = (attached["block_ln1"](h if queries is None else h[:, :queries], ctx)
                    if "block_ln1" in attached else None)
        if "attn_in" in attached:
            h = attached["attn_in"](h, ctx).to(h.dtype)
        y = xq + self.attn(h, causal=self.causal, attached=attached, ctx=ctx, queries=queries)
        h = self.ln_2(y)
        u = self.mlp.c_fc(h)
        if "mlp_fc" in attached:
            u = u + attached["mlp_fc"](h, ctx).to(u.dtype)
        if "mlp_hidden" in attached:
            u = attached["mlp_hidden"](u, ctx).to(u.dtype)
        a = self.act(u)
        m = self.mlp.c_proj(a)
        if "mlp_proj" in attached:
            m = m + attached["mlp_proj"](a, ctx).to(m.dtype)
        y = y + m
        if "block" in attached:
            y = y + attached["block"](xq, ctx).to(y.dtype)
        if parallel is not None:
            y = y + parallel.to(y.dtype)
        if "block_out" in attached:
            y = attached["block_out"](y, ctx).to(y.dtype)
        return y


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool,
                 tower: str, layout: TokenLayout) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio, quick_gelu, tower, i, layout) for i in range(layers)]
        )

    def forward(self, x: Tensor, ctx: ForwardContext, start: int = 0, end: int | None = None,
                keep: int | None = None) -> Tensor:
        """Run blocks ``start..end-1`` (0-based; default: all) on the token states ``x``.

        ``keep = q``: the caller reads only the first ``q`` positions of the output (the image
        tower's CLS token), so the last block computes only theirs when its modules allow it
        (:meth:`Block.keeps_prefix`): the MLP and the attention queries of the other positions
        affect nothing downstream. The result is ``[B, q, D]`` then, else ``[B, N, D]``."""
        last = len(self.resblocks) - 1
        end = len(self.resblocks) if end is None else end
        for i in range(start, end):
            block = self.resblocks[i]
            if i == last and keep is not None and block.keeps_prefix():
                return block(x, ctx, queries=keep)
            x = block(x, ctx)
        return x

    def first_adapted(self) -> int:
        """The lowest 0-based index of a block with a module attached (the number of blocks if none)."""
        return next((i for i, block in enumerate(self.resblocks) if block.attached), len(self.resblocks))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise BackboneError(f"image size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}")
        self.cfg = cfg
        self.layout = TokenLayout(num_prefix=1, grid=cfg.grid)
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid[0] * cfg.grid[1] + 1, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu, "visual", self.layout)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, embed_dim))
        self.output_point = InsertionPoint("visual", "output", None, embed_dim, None)
        self.attached: dict[str, nn.Module] = {}
        # Shared-prefix evaluation (see :meth:`start_at`): the block the forward starts at, the
        # token states it accepts there, and the recorders of :meth:`record_first_adapted`.
        self._start: tuple[int, Tensor] | None = None
        self._recorders: list[list[int]] = []

    def embed(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> tokens ``[B, 1 + H*W/p^2, D]`` after ``ln_pre``."""
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise BackboneError(
                f"expected images of shape [B, 3, {size}, {size}], got {list(images.shape)}; "
                "use the backbone's transforms to resize"
            )
        x = self.conv1(images.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    @torch.no_grad()
    def prefix_states(self, images: Tensor, block: int, states: Tensor | None = None, start: int = 0) -> Tensor:
        """The frozen token states ``[B, N, D]`` entering 0-based block ``block``: the patch embedding
        and blocks ``0..block-1`` of ``images``, without gradient. With ``states`` (the states entering
        block ``start``, e.g. a previous call's result) only blocks ``start..block-1`` run.

        This is the frozen CLIP's computation: a module attached to one of these blocks is an error
        (:class:`BackboneError`), not part of the result.
        """
        if not 0 <= start <= block <= self.num_layers:
            raise BackboneError(f"prefix_states: need 0 <= start ({start}) <= block ({block}) <= "
                                f"{self.num_layers} (the image tower's blocks)")
        adapted = [i for i in range(start, block) if self.transformer.resblocks[i].attached]
        if adapted:
            names = sorted(self.transformer.resblocks[adapted[0]].attached)
            raise BackboneError(
                f"prefix_states computes the frozen blocks {start + 1}..{block} (1-based), but block {adapted[0] + 1} "
                f"has modules attached at {names}; detach them (methods attach their modules only inside "
                "their forward) before computing a shared prefix")
        x = self.embed(images) if states is None else states
        return self.transformer(x, ForwardContext(), start, block)

    @contextlib.contextmanager
    def start_at(self, block: int, states: Tensor) -> Iterator[None]:
        """Within this context, the forward starts at 0-based block ``block`` from ``states``, the
        token states entering it (:meth:`prefix_states`), instead of embedding images: call the
        method (or ``encode_image``) with ``states`` in place of the images.

        Exact as long as nothing acts before block ``block``, which is checked at every call: a module
        attached to a block below ``block``, or an input other than ``states`` itself (a method that
        transforms its images before the tower), is a :class:`BackboneError`.
        """
        if not 0 <= block <= self.num_layers:
            raise BackboneError(f"start_at: block {block} is outside the image tower's 0..{self.num_layers}")
        n = self.layout.num_tokens
        if states.ndim != 3 or states.shape[1:] != (n, self.cfg.width):
            raise BackboneError(f"start_at: expected token states [B, {n}, {self.cfg.width}] (prefix_states), "
                                f"got {list(states.shape)}")
        saved, self._start = self._start, (block, states)
        try:
            yield
        finally:
            self._start = saved

    @contextlib.contextmanager
    def record_first_adapted(self) -> Iterator[list[int]]:
        """Collect, for every forward inside this context, the 0-based index of the lowest block that
        had a module attached (the number of blocks if none): the block a shared prefix may end at."""
        seen: list[int] = []
        self._recorders.append(seen)
        try:
            yield seen
        finally:
            self._recorders.remove(seen)

    def _start_block(self, x: Tensor) -> tuple[Tensor, int]:
        """(token states entering the first block to run, its index) for the forward's input ``x``."""
        if self._start is None:
            return self.embed(x), 0
        block, states = self._start
        if not (x.shape == states.shape and x.dtype == states.dtype and x.device == states.device
                and x.data_ptr() == states.data_ptr()):
            raise BackboneError(
                f"the image tower starts at block {block + 1} (shared-prefix evaluation) and expects the prefix's "
                f"token states {list(states.shape)} as given, but got a tensor {list(x.shape)} of other storage: the "
                "method changes its input before the image tower; evaluate it without a shared prefix")
        first = self.transformer.first_adapted()
        if first < block:
            names = sorted(self.transformer.resblocks[first].attached)
            raise BackboneError(
                f"the image tower starts at block {block + 1} (1-based; blocks 1..{block} come from a shared frozen "
                f"prefix), but block {first + 1} has modules attached at {names}, which the prefix did not run; "
                f"start the suffix at block {first + 1} or lower, or evaluate this method without a shared prefix")
        return x, block

    def forward(self, images: Tensor, ctx: ForwardContext) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, E]``; within :meth:`start_at`, the token states given there.

        Only the CLS token is pooled: the last block computes the other tokens' keys and values but
        not their outputs (when its attached modules allow it and ``ctx.cls_only_tail``)."""
        for seen in self._recorders:
            seen.append(self.transformer.first_adapted())
        x, start = self._start_block(images)
        x = self.transformer(x, ctx, start, keep=1 if ctx.cls_only_tail else None)
        ctx.used_cls_only_tail = x.shape[1] == 1
        # LN is per token, so normalizing only the CLS token equals open_clip's LN-all-then-pool.
        feats = self.ln_post(x[:, 0]) @ self.proj
        if "output" in self.attached:
            feats = self.attached["output"](feats, ctx).to(feats.dtype)
        return feats


class CLIPModel(nn.Module):
    """CLIP with a ViT image tower and a causal text transformer; all methods are batch-first.

    The text tower's modules sit directly on the model (``token_embedding``, ``transformer``, ...)
    so that the state-dict keys are those of OpenAI's and open_clip's checkpoints.
    """

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        t = cfg.text
        self.text_layout = TokenLayout(num_prefix=0, grid=None)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.quick_gelu, "text", self.text_layout)
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.text_output_point = InsertionPoint("text", "output", None, cfg.embed_dim, None)
        self.text_attached: dict[str, nn.Module] = {}

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def init_random(self, seed: int = 0) -> "CLIPModel":
        """Seeded random weights with CLIP's initialization scheme (for tests and pretraining)."""
        g = torch.Generator().manual_seed(seed)

        def normal_(p: Tensor, std: float) -> None:
            p.copy_(torch.randn(p.shape, generator=g) * std)

        for tower in (self.visual.transformer, self.transformer):
            w, n = tower.width, len(tower.resblocks)
            proj_std, attn_std, fc_std = (w ** -0.5) * ((2 * n) ** -0.5), w ** -0.5, (2 * w) ** -0.5
            for blk in tower.resblocks:
                normal_(blk.attn.in_proj_weight, attn_std)
                normal_(blk.attn.out_proj.weight, proj_std)
                normal_(blk.mlp.c_fc.weight, fc_std)
                normal_(blk.mlp.c_proj.weight, proj_std)
                for lin in (blk.attn.out_proj, blk.mlp.c_fc, blk.mlp.c_proj):
                    lin.bias.zero_()
                blk.attn.in_proj_bias.zero_()
                for ln in (blk.ln_1, blk.ln_2):
                    ln.weight.fill_(1.0)
                    ln.bias.zero_()
        v = self.visual
        vw = v.cfg.width
        normal_(v.conv1.weight, (3 * v.cfg.patch_size ** 2) ** -0.5)
        normal_(v.class_embedding, vw ** -0.5)
        normal_(v.positional_embedding, vw ** -0.5)
        normal_(v.proj, vw ** -0.5)
        normal_(self.token_embedding.weight, 0.02)
        normal_(self.positional_embedding, 0.01)
        normal_(self.text_projection, self.cfg.text.width ** -0.5)
        for ln in (v.ln_pre, v.ln_post, self.ln_final):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        self.logit_scale.fill_(math.log(1 / 0.07))
        return self

    # ------------------------------------------------------------- encoders
    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def context_length(self) -> int:
        return self.cfg.text.context_length

    def encode_image(self, images: Tensor, ctx: ForwardContext | None = None, normalize: bool = False) -> Tensor:
        """``[B, 3, H, W]`` -> image embeddings ``[B, E]``."""
        feats = self.visual(images, ctx if ctx is not None else ForwardContext())
        return F.normalize(feats, dim=-1) if normalize else feats

    def embed_text(self, tokens: Tensor) -> Tensor:
        """Token ids ``[B, L]`` -> token embeddings ``[B, L, D]`` (before positional embeddings)."""
        return self.token_embedding(tokens)

    def encode_text(self, tokens: Tensor, ctx: ForwardContext | None = None, normalize: bool = False,
                    truncate: bool = True) -> Tensor:
        """Token ids ``[B, L]`` -> text embeddings ``[B, E]``, read at the EOT (highest id) position."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise BackboneError(
                f"expected token ids of shape [B, {self.context_length}], got {list(tokens.shape)}; "
                "use the backbone's tokenizer"
            )
        return self.encode_text_embeddings(self.embed_text(tokens), tokens.argmax(dim=-1), ctx, normalize, truncate)

    def encode_text_embeddings(self, x: Tensor, eot_index: Tensor, ctx: ForwardContext | None = None,
                               normalize: bool = False, truncate: bool = True) -> Tensor:
        """Token embeddings ``[B, L, D]`` (e.g. with learned prompt vectors) -> ``[B, E]``.

        ``truncate``: run the transformer only over positions ``0..max(eot_index)``. Exact for the
        causal text transformer with token-wise modules attached (a position never sees later ones,
        so the EOT feature ignores the padding after it) and several times faster for short prompts.
        Pass ``False`` when an attached module mixes tokens along the sequence axis non-causally.
        """
        ctx = ctx if ctx is not None else ForwardContext()
        dtype = self.positional_embedding.dtype
        length = int(eot_index.max()) + 1 if truncate and len(eot_index) else x.shape[1]
        x = x[:, :length].to(dtype) + self.positional_embedding[:length].to(dtype)
        ctx.text_valid = torch.arange(length, device=x.device)[None] <= eot_index.to(x.device)[:, None]
        x = self.transformer(x, ctx)
        pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot_index])
        feats = pooled @ self.text_projection
        if "output" in self.text_attached:
            feats = self.text_attached["output"](feats, ctx).to(feats.dtype)
        return F.normalize(feats, dim=-1) if normalize else feats

    # ------------------------------------------------- learned text context
    def context_from_text(self, tokens: Tensor) -> Tensor:
        """Token ids of one text, ``[L]`` or ``[1, L]`` (the tokenizer's output, e.g. for "a photo of a")
        -> the embeddings of its tokens between SOT (position 0) and EOT (the highest id), ``[n, D]``.

        CoOp's ``ctx_init``: a detached copy, ready to become the method's learnable context.
        """
        ids = tokens[0] if tokens.ndim == 2 and tokens.shape[0] == 1 else tokens
        if ids.ndim != 1:
            raise BackboneError(f"expected the token ids of one text, [L] or [1, L]; got {list(tokens.shape)}")
        eot = int(ids.argmax())
        if eot < 2:
            raise BackboneError("the text has no tokens between SOT and EOT to initialize context vectors from")
        return self.embed_text(ids[1:eot]).detach().clone()

    def context_prompt_embeddings(self, tokens: Tensor, context: Tensor, class_position: str = "end",
                                  name_lengths: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Insert learned context vectors into class-name prompts (CoOp) -> (embeddings ``[C, L, D]``,
        EOT index ``[C]``), to feed :meth:`encode_text_embeddings`.

        ``tokens`` ``[C, L]``: the tokenizer's ids of the prompts *without* context, e.g. "red star."
        -> ``[SOT] red star . [EOT] 0 ...``. ``context``: ``[n, D]`` shared by all classes or
        ``[C, n, D]`` class-specific. The ``n`` vectors are inserted and the tokens after them move
        right by ``n`` (EOT included; only padding drops off the end). ``class_position`` as CoOp's
        ``CLASS_TOKEN_POSITION``::

            "end":     [SOT] ctx_1..ctx_n [name] . [EOT]
            "middle":  [SOT] ctx_1..ctx_{n//2} [name] ctx_{n//2+1}..ctx_n . [EOT]
            "front":   [SOT] [name] ctx_1..ctx_n . [EOT]

        "middle" and "front" need each class name's length in tokens: ``name_lengths`` ``[C]``, or by
        default every token between SOT and EOT except the last one (``EOT index - 2``), which is
        right for CoOp's prompts ``"{name}."`` ("." is one token). For prompts without that single
        closing token, pass ``name_lengths`` (e.g. the token count of each name tokenized alone).
        "end" ignores ``name_lengths``.

        Gradients flow into ``context``. A prompt whose EOT would be pushed past the context length
        is a :class:`BackboneError`, never a silent truncation.
        """
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise BackboneError(
                f"expected token ids of shape [C, {self.context_length}], got {list(tokens.shape)}; "
                "use the backbone's tokenizer"
            )
        c, length = tokens.shape
        width = self.cfg.text.width
        if context.ndim not in (2, 3) or context.shape[-1] != width or (context.ndim == 3 and context.shape[0] != c):
            raise BackboneError(
                f"expected context vectors [n_ctx, {width}] or [{c}, n_ctx, {width}] for {c} prompts, "
                f"got {list(context.shape)}"
            )
        if class_position not in ("end", "middle", "front"):
            raise BackboneError(f"unknown class_position {class_position!r}; choose 'end', 'middle' or 'front'")
        n = context.shape[-2]
        eot = tokens.argmax(dim=-1)
        too_long = (eot + n >= length).nonzero().flatten().tolist()
        if too_long:
            i, more = too_long[0], too_long[1:]
            raise BackboneError(
                f"with {n} context tokens the prompt of class {i} (EOT at position {int(eot[i])}) needs "
                f"{int(eot[i]) + n + 1} positions, more than the context length {length}"
                + (f"; also classes {more[:10]}{' and more' if len(more) > 10 else ''}" if more else "")
                + ": shorten the class names or use fewer context tokens"
            )
        if class_position == "end":
            k = torch.zeros_like(eot)  # with all context before the name, its length is irrelevant
        else:
            k = eot - 2 if name_lengths is None else torch.as_tensor(name_lengths, device=tokens.device).long()
            if k.shape != eot.shape:
                raise BackboneError(f"name_lengths: expected one length per prompt ({c}), got shape {list(k.shape)}")
            bad = ((k < 0) | (k > eot - 1)).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise BackboneError(
                    f"class {i}: a name of {int(k[i])} tokens does not fit between SOT and EOT (at position "
                    f"{int(eot[i])}); pass name_lengths, the number of tokens of each class name"
                )
        # Output position j holds [SOT], the first h context vectors, the k name tokens, the other
        # n - h context vectors, then the remaining tokens shifted by n. One gather per source keeps
        # every class in one batched op and copies values exactly.
        h = {"end": n, "middle": n // 2, "front": 0}[class_position]
        j = torch.arange(length, device=tokens.device).unsqueeze(0)
        k = k.unsqueeze(1)
        first, second = (j >= 1) & (j <= h), (j > h + k) & (j <= n + k)
        tok_idx = torch.where(j <= h + k, j - h, j - n).clamp(min=0).expand(c, length)
        x = self.embed_text(tokens.gather(1, tok_idx))
        if n:
            ctx_idx = torch.where(first, j - 1, j - k - 1).clamp(0, n - 1).expand(c, length)
            shared = context.unsqueeze(0).expand(c, -1, -1) if context.ndim == 2 else context
            vecs = shared.to(x.dtype).gather(1, ctx_idx.unsqueeze(-1).expand(-1, -1, width))
            x = torch.where((first | second).unsqueeze(-1), vecs, x)
        return x, eot + n

    def encode_text_with_context(self, tokens: Tensor, context: Tensor, ctx: ForwardContext | None = None,
                                 class_position: str = "end", normalize: bool = False, *,
                                 name_lengths: Sequence[int] | Tensor | None = None, truncate: bool = True) -> Tensor:
        """Class-name prompts ``[C, L]`` with learned context ``[n, D]`` / ``[C, n, D]`` -> ``[C, E]``:
        :meth:`context_prompt_embeddings` followed by :meth:`encode_text_embeddings`."""
        x, eot = self.context_prompt_embeddings(tokens, context, class_position, name_lengths)
        return self.encode_text_embeddings(x, eot, ctx, normalize, truncate)

    # ------------------------------------------------------- insertion API
    def _blocks(self, tower: str) -> nn.ModuleList:
        if tower == "visual":
            return self.visual.transformer.resblocks
        if tower == "text":
            return self.transformer.resblocks
        raise BackboneError(f"unknown tower {tower!r}; choose one of {list(TOWERS)}")

    def num_layers(self, tower: str) -> int:
        return len(self._blocks(tower))

    def insertion_points(self, tower: str | None = None, kind: str | None = None,
                         layers: Iterable[int] | None = None) -> list[InsertionPoint]:
        """All insertion points, optionally filtered by tower, kind and 0-based block indices."""
        if kind is not None and kind not in POINT_KINDS:
            raise BackboneError(f"unknown insertion point kind {kind!r}; choose one of {list(POINT_KINDS)}")
        towers = TOWERS if tower is None else (tower,)
        wanted = None if layers is None else set(layers)
        points: list[InsertionPoint] = []
        for t in towers:
            blocks = self._blocks(t)
            if wanted is not None:
                bad = sorted(i for i in wanted if not 0 <= i < len(blocks))
                if bad:
                    raise BackboneError(f"{t} tower has blocks 0..{len(blocks) - 1}; no block {bad}")
            for i, blk in enumerate(blocks):
                if wanted is None or i in wanted:
                    points += [p for k, p in blk.points.items() if kind in (None, k)]
            if kind in (None, "output"):
                points.append(self.visual.output_point if t == "visual" else self.text_output_point)
        return points

    def _slot(self, point: InsertionPoint) -> tuple[dict[str, nn.Module], str]:
        if point.kind == "output":
            return (self.visual.attached if point.tower == "visual" else self.text_attached), "output"
        blocks = self._blocks(point.tower)
        if point.layer is None or not 0 <= point.layer < len(blocks) or point.kind not in blocks[point.layer].points:
            raise BackboneError(f"this backbone has no insertion point {point.name}")
        return blocks[point.layer].attached, point.kind

    def attach(self, point: InsertionPoint, module: nn.Module) -> None:
        """Attach ``module`` (called as ``module(x, ctx)``) at ``point``; one module per point."""
        slot, key = self._slot(point)
        if key in slot:
            raise BackboneError(f"insertion point {point.name} already has a module; detach it first")
        slot[key] = module

    def detach(self, point: InsertionPoint) -> nn.Module | None:
        slot, key = self._slot(point)
        return slot.pop(key, None)

    def detach_all(self) -> None:
        for p in self.insertion_points():
            self.detach(p)

    def attached_modules(self) -> dict[str, nn.Module]:
        """``{point name: module}`` of everything currently attached."""
        out = {}
        for p in self.insertion_points():
            slot, key = self._slot(p)
            if key in slot:
                out[p.name] = slot[key]
        return out

    def freeze(self) -> "CLIPModel":
        for p in self.parameters():
            p.requires_grad_(False)
        return self
