"""Pretraining vladapt's tiny CLIP on the synthetic image-text world (the bundled ``vladapt-tiny``).

    >>> from vladapt.synth.pretrain import PretrainConfig, pretrain
    >>> result = pretrain(PretrainConfig(steps=1000, seed=0), "vladapt-tiny.safetensors", log_path="pretrain.jsonl")

What it does:

* builds ``CLIPModel(TINY_CONFIGS["vladapt-tiny"]).init_random(seed)``, all parameters trainable;
* step ``k`` trains on samples ``[k * B, (k + 1) * B)`` of the world's stream ``seed``
  (:func:`vladapt.synth.world.sample_batch`), drawn from :func:`~vladapt.synth.world.pretrain_style_mix`
  (mostly clean images plus ``shifted_fraction`` of *mild* versions of every domain shift);
* symmetric CLIP contrastive loss with the learnable temperature (``logit_scale`` clamped at
  ``ln 100``), AdamW (weight decay on matrices only), linear warm-up then cosine decay;
* every ``eval_every`` steps it logs one JSON line with the loss, the learning rate, the temperature
  and zero-shot accuracy on *probe sets* ("a photo of a {}."): a clean in-distribution set of 20
  colour-shape classes, each downstream dataset's classes drawn in that dataset's STRONG style, and
  the same scenes drawn clean (``<dataset>@clean``), so the in-distribution and the shifted curve can
  be watched side by side. The probes are generated with their own seeds, never the downstream
  datasets' splits, so choosing a step count with them does not look at any test image
  (``benchmarks/pretrain_curves.py`` prints the curves of a log);
* saves the weights as fp16 safetensors (the state-dict keys of :class:`CLIPModel`) plus a sidecar
  JSON (same name, ``.json``) with the architecture, the fingerprint :func:`load_clip` checks, the
  configuration, the final probe accuracies and the command that reproduces the file.

Determinism: the data is a pure function of ``(seed, index)``, the initial weights come from their
own seeded generator and nothing in training draws random numbers, so the same configuration gives
bit-identical losses and weights on the same kind of machine (CPU instruction set, torch build).
CPU kernels, bf16 autocast included, are deterministic there, but the number of threads changes how
reductions are split and hence the last bits: ``threads`` is part of the configuration, and its
default of 1 makes the result independent of how many cores a machine has. One thread is also the
robust choice on a shared machine: a 2-thread team on 2 busy cores ran 2-3x slower per step than a
single thread, because every parallel region waits for the descheduled thread.

Precision: ``"fp32"`` is the default because on CPUs without native bf16 instructions (no AVX512-BF16
or AMX) bf16 autocast is emulated and runs 2-3x slower than fp32; ``"bf16"`` is faster where it is native.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vladapt.backbones.loader import (
    TINY_CONFIGS,
    Tokenizer,
    load_state_dict_into,
    read_checkpoint,
    weights_fingerprint,
)
from vladapt.backbones.model import CLIPModel
from vladapt.backbones.transforms import CLIP_MEAN, CLIP_STD
from vladapt.errors import ConfigError
from vladapt.io import atomic_write_bytes, atomic_write_json
from vladapt.synth.datasets import DATASETS
from vladapt.synth.render import CLEAN, MILD, Style, render
from vladapt.synth.scene import sample_scene
from vladapt.synth.world import GENERATOR_VERSION, pretrain_style_mix, sample_batch

__all__ = [
    "CLEAN_PROBE_CLASSES",
    "MODEL_NAME",
    "PROBE_TEMPLATE",
    "PretrainConfig",
    "ProbeSet",
    "build_probes",
    "clip_loss",
    "images_to_tensor",
    "lr_at",
    "pretrain",
    "reproduce_command",
    "save_pretrained",
    "stream_batch",
    "zero_shot_eval",
]

MODEL_NAME = "vladapt-tiny"
PROBE_TEMPLATE = "a photo of a {}."
MAX_LOGIT_SCALE = math.log(100.0)

# The clean in-distribution probe: every colour with two shapes and every shape with two colours,
# so neither attribute alone names the class.
_PROBE_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black")
_PROBE_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon", "ring", "arrow")
CLEAN_PROBE_CLASSES: tuple[str, ...] = tuple(sorted(
    {f"{_PROBE_COLORS[i]} {_PROBE_SHAPES[i]}" for i in range(10)}
    | {f"{_PROBE_COLORS[(i + 3) % 10]} {_PROBE_SHAPES[i]}" for i in range(10)}
))

# Probe images are drawn from default_rng([_PROBE_SEED, set key, label, i]): a seed sequence of a
# different length from the pretraining stream's ([seed, index]) and write_dataset's
# ([seed, dataset key, split, label, i]), so a probe image is never one of theirs.
_PROBE_SEED = 0x50524F4245  # "PROBE"
CLEAN_PROBE = "clean"
CLEAN_SUFFIX = "@clean"

_PRECISIONS = ("fp32", "bf16")


@dataclass
class PretrainConfig:
    """Everything that decides the pretrained weights (plus evaluation and threading settings).

    CLI flags are the field names with dashes: ``--batch-size``, ``--warmup-steps``, ...
    ``eval_every`` and ``probe_per_class`` only decide what is measured, never the weights;
    ``threads`` (None: keep torch's setting) decides the last bits of the weights (see the module doc).
    The defaults are the bundled ``vladapt-tiny``'s configuration.
    """

    seed: int = 0
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: str = "fp32"
    shifted_fraction: float = 0.2
    shift_strength: float = MILD
    eval_every: int = 100
    probe_per_class: int = 20
    threads: int | None = 1

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"PretrainConfig.{name}={getattr(self, name)!r} {why}")

        if self.steps < 0:
            raise bad("steps", "must be >= 0")
        if self.batch_size < 2:
            raise bad("batch_size", "must be >= 2 (the contrastive loss needs negatives)")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if self.grad_clip < 0:
            raise bad("grad_clip", "must be >= 0 (0 switches clipping off)")
        if self.precision not in _PRECISIONS:
            raise bad("precision", f"must be one of {list(_PRECISIONS)}")
        if not 0.0 <= self.shifted_fraction <= 1.0:
            raise bad("shifted_fraction", "must be in [0, 1]")
        if not 0.0 < self.shift_strength <= 1.0:
            raise bad("shift_strength", "must be in (0, 1]")
        if self.eval_every < 0:
            raise bad("eval_every", "must be >= 0 (0: evaluate only at the start and the end)")
        if self.probe_per_class < 0:
            raise bad("probe_per_class", "must be >= 0 (0: no probe evaluation)")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", "must be >= 1, or None to keep torch's setting")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- data
def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` normalized with CLIP's mean and std.

    The same numbers ``backbone.test_transform`` gives for a PNG of the image at the model's size.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def stream_batch(seed: int, step: int, batch_size: int, style_mix: Iterable[tuple[Style, float]],
                 tokenizer: Tokenizer) -> tuple[Tensor, Tensor]:
    """Batch ``step`` of stream ``seed``: normalized images and caption tokens of samples
    ``[step * batch_size, (step + 1) * batch_size)``."""
    images, captions, _ = sample_batch(seed, batch_size, tuple(style_mix), start=step * batch_size)
    return images_to_tensor(images), tokenizer(captions)


# ------------------------------------------------------------------------------------- loss
def clip_loss(model: CLIPModel, images: Tensor, tokens: Tensor, precision: str = "fp32") -> Tensor:
    """Symmetric InfoNCE of matching (image, caption) pairs, in fp32 after the towers."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        image_features = model.encode_image(images)
        text_features = model.encode_text(tokens)
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = model.logit_scale.float().exp() * image_features @ text_features.t()
    labels = torch.arange(len(images))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then cosine from ``lr`` to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: CLIPModel, cfg: PretrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases, LayerNorm gains, class token, temperature
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )


# ----------------------------------------------------------------------------------- probes
@dataclass
class ProbeSet:
    """An in-memory zero-shot probe: uint8 images, labels into sorted ``classnames``, a style name."""

    name: str
    classnames: list[str]
    images: np.ndarray
    labels: np.ndarray
    style: str

    @property
    def num_base(self) -> int:
        """Base classes are the first ``ceil(n / 2)`` in label order, new classes the rest."""
        return math.ceil(len(self.classnames) / 2)


def _render_probe(name: str, classnames: list[str], draw, per_class: int, style: Style) -> ProbeSet:
    key = zlib.crc32(name.encode("utf-8"))
    images, labels = [], []
    for label, cname in enumerate(classnames):
        for i in range(per_class):
            rng = np.random.default_rng([_PROBE_SEED, key, label, i])
            images.append(render(draw(cname, rng), style, rng))
            labels.append(label)
    stacked = np.stack(images) if images else np.zeros((0, 64, 64, 3), np.uint8)
    return ProbeSet(name, classnames, stacked, np.array(labels, dtype=np.int64), style.name)


def build_probes(per_class: int = 20, datasets: Iterable[str] | None = None,
                 clean_variants: bool = True) -> dict[str, ProbeSet]:
    """``{"clean": ..., "<dataset>": ..., "<dataset>@clean": ...}``: the clean colour-shape probe and,
    per downstream dataset, its classes drawn in its STRONG style (and, with ``clean_variants``, the
    same scenes drawn clean, which separates "does not know the concept" from "the shift breaks it");
    ``per_class`` images per class, fixed probe seeds."""

    def clean_scene(cname: str, rng: np.random.Generator):
        color, shape = cname.split()
        return sample_scene(rng, color=color, shape=shape)

    probes = {CLEAN_PROBE: _render_probe(CLEAN_PROBE, list(CLEAN_PROBE_CLASSES), clean_scene, per_class, CLEAN)}
    for name in (DATASETS if datasets is None else datasets):
        spec = DATASETS[name]
        probes[name] = _render_probe(name, spec.classnames, spec.scene, per_class, spec.style)
        if clean_variants:
            # Same seeds, so the same scenes (the layout may differ: styles draw from the generator too).
            probes[f"{name}{CLEAN_SUFFIX}"] = _render_probe(name, spec.classnames, spec.scene, per_class, CLEAN)
            probes[f"{name}{CLEAN_SUFFIX}"].name = f"{name}{CLEAN_SUFFIX}"
    return probes


@torch.no_grad()
def zero_shot_eval(model: CLIPModel, tokenizer: Tokenizer, probes: dict[str, ProbeSet],
                   template: str = PROBE_TEMPLATE, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy (%) per probe: over all classes, and base / new halves each classified
    among its own classes only (the base-to-new protocol). Runs in fp32."""
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    for name, probe in probes.items():
        tokens = tokenizer([template.format(c) for c in probe.classnames])
        text = F.normalize(model.encode_text(tokens).float(), dim=-1)
        feats = []
        for i in range(0, len(probe.images), batch_size):
            x = images_to_tensor(probe.images[i : i + batch_size])
            feats.append(F.normalize(model.encode_image(x).float(), dim=-1))
        if not feats:
            continue
        sims = torch.cat(feats) @ text.t()
        labels = torch.from_numpy(probe.labels)
        nb = probe.num_base
        base, new = labels < nb, labels >= nb

        def acc(pred: Tensor, truth: Tensor) -> float:
            return round(100.0 * (pred == truth).float().mean().item(), 2) if len(truth) else float("nan")

        out[name] = {
            "all": acc(sims.argmax(1), labels),
            "base": acc(sims[base][:, :nb].argmax(1), labels[base]),
            "new": acc(sims[new][:, nb:].argmax(1) + nb, labels[new]),
        }
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------- saving
def reproduce_command(cfg: PretrainConfig, out_name: str = f"{MODEL_NAME}.safetensors") -> str:
    """The ``vladapt synth pretrain`` command that recreates the weights of ``cfg``.

    Steps, batch size and seed always; any other weight-deciding field only when it is not the default.
    """
    parts = ["vladapt synth pretrain", f"--steps {cfg.steps}", f"--batch-size {cfg.batch_size}", f"--seed {cfg.seed}"]
    default = PretrainConfig()
    for f in fields(cfg):
        if f.name in ("steps", "batch_size", "seed", "eval_every", "probe_per_class"):
            continue
        value = getattr(cfg, f.name)
        if f.name == "threads" and value is None:
            value = torch.get_num_threads()  # what the run used
        if value != getattr(default, f.name):
            parts.append(f"--{f.name.replace('_', '-')} {value}")
    parts.append(f"--out {out_name}")
    return " ".join(parts)


def _fp16_bytes(model: CLIPModel) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors writes the metadata map in hash order, so several keys would
    # make the file bytes differ between processes (the name is in the sidecar).
    return save(tensors, metadata={"format": "pt"})


def _reload(path: Path) -> CLIPModel:
    """A fresh fp32 model with the saved file's weights, loaded exactly as ``load_clip`` does."""
    model = CLIPModel(TINY_CONFIGS[MODEL_NAME])
    sd, _ = read_checkpoint(path)
    load_state_dict_into(model, sd, f"file {path.name!r}")
    return model.freeze().eval()


def _short(evaluation: dict[str, dict[str, float]]) -> dict[str, float]:
    """Progress-bar summary: overall accuracy of the clean probe and of each shifted probe."""
    return {k.removeprefix("synth_"): v["all"] for k, v in evaluation.items() if not k.endswith(CLEAN_SUFFIX)}


def save_pretrained(model: CLIPModel, cfg: PretrainConfig, out_path: str | os.PathLike, *, seconds: float,
                    final_loss: float | None = None, probes: dict[str, ProbeSet] | None = None) -> dict[str, Any]:
    """Write ``model`` (trained per ``cfg``) as fp16 safetensors at ``out_path`` plus its ``.json`` sidecar.

    The fingerprint is computed the way :func:`load_clip` checks it: on a fresh fp32 model loaded from
    the written file. ``probes`` (default: :func:`build_probes` with ``cfg.probe_per_class``) are
    evaluated on that reloaded model for the sidecar's ``final_eval``. Both files are written
    atomically (the weights first). Returns ``{"fingerprint", "final_eval", "command", "sidecar_path"}``.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ConfigError(f"out_path {str(out_path)!r} must end in .safetensors (the sidecar gets .json)")
    arch = TINY_CONFIGS[MODEL_NAME]
    if probes is None:
        probes = build_probes(cfg.probe_per_class) if cfg.probe_per_class else {}
    atomic_write_bytes(out_path, _fp16_bytes(model))
    saved = _reload(out_path)
    fingerprint = weights_fingerprint(saved.state_dict())
    final_eval = zero_shot_eval(saved, Tokenizer(arch.text.context_length), probes) if probes else {}
    command = reproduce_command(cfg, out_path.name)
    sidecar = out_path.with_suffix(".json")
    atomic_write_json(sidecar, {
        "name": MODEL_NAME,
        "architecture": arch.to_dict(),
        "fingerprint": fingerprint,
        "dtype": "float16",
        "pretrain_config": cfg.to_dict(),
        "steps": cfg.steps,
        "samples_seen": cfg.steps * cfg.batch_size,
        "seconds": round(seconds, 1),
        "final_loss": None if final_loss is None else round(final_loss, 5),
        "final_eval": final_eval,
        "final_eval_protocol": (
            f"zero-shot accuracy (%) of the saved weights, template {PROBE_TEMPLATE!r}, "
            f"{cfg.probe_per_class} probe images per class (probe seeds, not the datasets' splits); "
            "'clean': 20 colour-shape classes drawn clean; '<dataset>': its classes in its STRONG style; "
            "'<dataset>@clean': the same scenes drawn clean; base/new: the first ceil(n/2) classes in "
            "label order / the rest, each classified among its own classes"
        ),
        "generator_version": GENERATOR_VERSION,
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "command": command,
    })
    return {"fingerprint": fingerprint, "final_eval": final_eval, "command": command, "sidecar_path": sidecar}


# ---------------------------------------------------------------------------------- training
def pretrain(cfg: PretrainConfig, out_path: str | os.PathLike, log_path: str | os.PathLike | None = None,
             progress: bool = True, on_eval: Callable[[dict[str, Any], CLIPModel], None] | None = None,
             ) -> dict[str, Any]:
    """Pretrain the tiny CLIP per ``cfg`` and write ``out_path`` (fp16 safetensors) and its ``.json`` sidecar.

    Returns ``{"out_path", "sidecar_path", "fingerprint", "steps", "seconds", "losses", "history",
    "final_eval", "command"}``: ``losses`` has every step's loss, ``history`` the logged records
    (also written as JSON lines to ``log_path``), ``final_eval`` the probe accuracies of the saved
    (fp16-rounded) weights. ``on_eval(record, model)`` is called after every logged evaluation (e.g. to
    keep checkpoints); it must not modify the model.
    """
    cfg.validate()
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ConfigError(f"out_path {str(out_path)!r} must end in .safetensors (the sidecar gets .json)")
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    log = None
    try:
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return _pretrain(cfg, out_path, log, progress, on_eval)
    finally:
        if log is not None:
            log.close()
        torch.set_num_threads(previous_threads)


def _pretrain(cfg: PretrainConfig, out_path: Path, log, progress: bool,
              on_eval: Callable[[dict[str, Any], CLIPModel], None] | None) -> dict[str, Any]:
    from tqdm import tqdm

    arch = TINY_CONFIGS[MODEL_NAME]
    tokenizer = Tokenizer(arch.text.context_length)
    style_mix = pretrain_style_mix(cfg.shifted_fraction, cfg.shift_strength)
    probes = build_probes(cfg.probe_per_class) if cfg.probe_per_class else {}

    model = CLIPModel(arch).init_random(cfg.seed)
    model.requires_grad_(True).train()
    optimizer = _optimizer(model, cfg)
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    begin = time.perf_counter()

    def record(step: int, lr: float | None) -> dict[str, Any]:
        since = losses[len(losses) - (step - (history[-1]["step"] if history else 0)):] if step else []
        entry: dict[str, Any] = {
            "step": step,
            "loss": round(float(np.mean(since)), 5) if since else None,
            "lr": lr,
            "logit_scale": round(model.logit_scale.exp().item(), 4),
            "seconds": round(time.perf_counter() - begin, 1),
        }
        if probes:
            entry["zeroshot"] = zero_shot_eval(model, tokenizer, probes)
        history.append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()
        if on_eval is not None:
            on_eval(entry, model)
        return entry

    record(0, None)
    bar = tqdm(total=cfg.steps, desc="pretrain", disable=not progress, dynamic_ncols=True)
    lr = cfg.lr
    for step in range(cfg.steps):
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, tokens = stream_batch(cfg.seed, step, cfg.batch_size, style_mix, tokenizer)
        loss = clip_loss(model, images, tokens, cfg.precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        bar.update(1)
        postfix: dict[str, Any] = {"loss": f"{losses[-1]:.3f}"}
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            entry = record(done, lr)
            postfix.update({k: f"{v:.0f}" for k, v in _short(entry.get("zeroshot", {})).items()})
            bar.set_postfix(postfix, refresh=False)
        elif done % 10 == 0:
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    seconds = time.perf_counter() - begin

    final_loss = float(np.mean(losses[-min(len(losses), 50):])) if losses else None
    saved = save_pretrained(model, cfg, out_path, seconds=seconds, final_loss=final_loss, probes=probes)
    fingerprint, final_eval, command, sidecar = (
        saved["fingerprint"], saved["final_eval"], saved["command"], saved["sidecar_path"])
    if log is not None:
        log.write(json.dumps({"final": True, "step": cfg.steps, "fingerprint": fingerprint,
                              "seconds": round(seconds, 1), "zeroshot": final_eval}) + "\n")
        log.flush()
    return {
        "out_path": out_path,
        "sidecar_path": sidecar,
        "fingerprint": fingerprint,
        "steps": cfg.steps,
        "seconds": seconds,
        "losses": losses,
        "history": history,
        "final_eval": final_eval,
        "command": command,
    }
