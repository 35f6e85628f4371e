"""The training loop shared by every trainable method.

Semantics follow Dassl (the reference code base of the field) where it matters for reproducing
published numbers: the learning rate is set once per epoch (cosine over ``epochs``, optional warm-up
epochs at a constant or linearly rising rate, after which the cosine starts from its first value),
the loader drops the last incomplete batch when the split holds at least one batch.

Determinism: all randomness of an epoch is derived from (seed, epoch): the batch order, each image's
augmentation (seeded per (seed, epoch, image index), so it does not depend on which process or
worker loads it) and each step's generator handed to the method (negative classes, templates,
stochastic scales). Resuming from the checkpoint of epoch k therefore continues exactly as an
uninterrupted run, and N data-parallel processes see the same global batches as one process.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vladapt.backbones.transforms import DEFAULT_CROP_SCALE, train_transform
from vladapt.config import to_dict
from vladapt.data import DatasetSplits, Datum
from vladapt.data.dataset import load_image
from vladapt.engine import distributed as dist
from vladapt.engine.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from vladapt.engine.precision import precision_name
from vladapt.data.workers import unwrapped
from vladapt.errors import ConfigError, VladaptError
from vladapt.io import atomic_write_text, check_writable, dumps
from vladapt.methods.base import StepInfo

__all__ = ["DivergedError", "StepInfo", "TrainConfig", "derive_seed", "epoch_batches", "fit", "lr_at_epoch",
           "lr_at_iteration"]


class DivergedError(VladaptError):
    """Training produced a non-finite loss, gradient or weight; the run stops without a result."""


@dataclass
class TrainConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.002, metadata={"min": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    weight_decay: float = field(default=5e-4, metadata={"min": 0.0})
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = field(default=1e-8, metadata={"min": 0.0})
    epochs: int = field(default=10, metadata={"min": 1})
    batch_size: int = field(default=16, metadata={"min": 1})
    scheduler: Literal["cosine", "constant"] = "cosine"
    # "epoch": the rate is set once per epoch (Dassl); "iteration": per optimizer step, with the cosine
    # running over all iterations down to min_lr (CLIP-LoRA).
    schedule: Literal["epoch", "iteration"] = "epoch"
    iterations: int | None = field(default=None, metadata={
        "min": 1, "help": "stop after this many optimizer steps (the epochs then follow from it); none = epochs"})
    min_lr: float = field(default=0.0, metadata={"min": 0.0, "help": "end of the cosine"})
    warmup_epochs: int = field(default=0, metadata={"min": 0})
    warmup_type: Literal["constant", "linear"] = "constant"
    warmup_lr: float = field(default=1e-5, metadata={"min": 0.0})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_clip: float | None = field(default=None, metadata={"min": 0.0})
    workers: int = field(default=0, metadata={"min": 0})
    # Area range of RandomResizedCrop (Dassl's INPUT.RRCROP_SCALE); the field's default crops down
    # to 8% of the image. [1.0, 1.0] keeps the whole image (flip only).
    crop_scale: list[float] = field(default_factory=lambda: list(DEFAULT_CROP_SCALE))
    # Feature-level methods: the number of distinct augmentation passes whose frozen features are
    # encoded (epoch e trains on pass e mod N, as Tip-Adapter reuses 10 passes); none = one pass per
    # epoch, which equals training on the images.
    feature_passes: int | None = field(default=None, metadata={"min": 1})

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must have two values, got {self.betas}")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(f"train.crop_scale must be two area fractions 0 < low <= high <= 1, "
                              f"got {self.crop_scale}")
        if self.iterations is not None and self.schedule != "iteration":
            raise ConfigError("train.iterations needs train.schedule=iteration")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0 and self.iterations is None:
            raise ConfigError(f"train.warmup_epochs ({self.warmup_epochs}) must be below train.epochs ({self.epochs})")


def lr_at_epoch(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch`` (Dassl: constant within an epoch)."""
    if epoch < cfg.warmup_epochs:
        if cfg.warmup_type == "constant":
            return cfg.warmup_lr
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * epoch / cfg.warmup_epochs
    if cfg.scheduler == "constant":
        return cfg.lr
    k = epoch - cfg.warmup_epochs
    return _cosine(cfg, k, cfg.epochs)


def _cosine(cfg: TrainConfig, k: int, total: int) -> float:
    if cfg.min_lr == 0.0:  # the plain formula, bit for bit what earlier releases computed
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * k / total))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * k / total))


def lr_at_iteration(cfg: TrainConfig, iteration: int, total: int, warmup: int = 0) -> float:
    """Learning rate of 0-based optimizer step ``iteration`` of ``total`` (``schedule=iteration``):
    ``warmup`` steps at the warm-up rate (constant or linear), then the cosine from ``lr`` to
    ``min_lr`` over the remaining steps."""
    if iteration < warmup:
        if cfg.warmup_type == "constant":
            return cfg.warmup_lr
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * iteration / warmup
    if cfg.scheduler == "constant":
        return cfg.lr
    return _cosine(cfg, iteration - warmup, max(total - warmup, 1))


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, index, ...)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts] + [len(parts)]).generate_state(2, np.uint64)[0] >> 1)


def _train_transform(backbone, cfg: TrainConfig):
    """The backbone's training transform for the field's crop range, else the same pipeline with ``cfg.crop_scale``."""
    if tuple(cfg.crop_scale) == DEFAULT_CROP_SCALE:
        return backbone.train_transform
    return train_transform(backbone.image_size, backbone.mean, backbone.std, scale=tuple(cfg.crop_scale))


class _SeededAugmentation(Dataset):
    """Items indexed by (epoch, index): the augmentation of each image is seeded by (seed, epoch, index)."""

    def __init__(self, items: list[Datum], image_root: Path, transform, seed: int) -> None:
        self.items, self.image_root, self.transform, self.seed = items, Path(image_root), transform, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        datum = self.items[index]
        image = load_image(self.image_root / datum.path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            return self.transform(image), datum.label


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of item indices for one epoch (the same in every process)."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 1 << 30))
    perm = torch.randperm(n, generator=g).tolist()
    if n >= batch_size:  # drop the last incomplete batch, as Dassl does when the split allows it
        return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return [perm]


def _shard(batch: list[int], world: int, rank: int) -> slice:
    per = len(batch) // world
    return slice(rank * per, (rank + 1) * per)


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]] | list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD or AdamW over a method's parameter groups (:meth:`Method.param_groups`): a group's
    ``weight_decay`` overrides the configured one, its ``lr_scale`` multiplies every scheduled rate."""
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": list(groups)}]
    groups = [{**g, "params": list(g["params"]), "lr_scale": float(g.get("lr_scale", 1.0))} for g in groups]
    if cfg.optimizer == "sgd":
        # The fused kernel updates each tensor in one pass (HeBA's 87 M parameters: ~15x faster than the
        # multi-tensor loop on a CPU) and gives bit-identical weights (tests/test_engine_steps.py).
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov, fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def train_precision(precision: str, backbone_dtype: torch.dtype) -> str:
    """``auto``: autocast in the precision the frozen backbone is stored in (fp32 master weights);
    the storage precision is what :func:`vladapt.engine.precision.auto_precision` chose for the
    machine when the backbone was loaded with ``precision auto``. An explicit precision is kept;
    ``fp32`` over a backbone stored in bf16/fp16 is a :class:`ConfigError` (its layers would not
    compute in fp32)."""
    if precision == "fp32" and backbone_dtype != torch.float32:
        raise ConfigError(f"train.precision=fp32 needs a backbone stored in fp32, but it is stored in "
                          f"{precision_name(backbone_dtype)} (its layers would compute in that precision); load it "
                          "with --precision fp32 (load_clip(..., dtype=torch.float32)) or use train.precision=auto")
    if precision != "auto":
        return precision
    return precision_name(backbone_dtype) if backbone_dtype in (torch.bfloat16, torch.float16) else "fp32"


def autocast_context(precision: str, device: str):
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _read_log(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise VladaptError(f"training log {path} is unreadable ({err}); delete the run folder {path.parent} "
                           "and train again (without --resume)") from None
    return [r for r in rows if isinstance(r, dict) and r.get("epoch", upto_epoch + 1) <= upto_epoch]


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    tensors = [t for t in tensors if t is not None]
    return not tensors or bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())


def _diverged(what: str, epoch: int, step: int, steps: int, cfg: TrainConfig, run_dir: Path | None) -> DivergedError:
    """The one-line message of a diverged run: where, what is kept, what to do."""
    kept = ""
    if run_dir is not None:
        kept = (f"; the checkpoint of epoch {epoch} in {run_dir / 'checkpoint'} is kept (no result was written)"
                if epoch > 0 else "; no checkpoint or result was written")
    return DivergedError(f"training diverged: {what} at epoch {epoch + 1}, step {step + 1}/{steps}{kept}; "
                         f"lower the learning rate (train.lr={cfg.lr:g}, e.g. train.lr={cfg.lr / 10:g}) "
                         "or set train.grad_clip and train again")


def fit(method, splits: DatasetSplits, cfg: TrainConfig, seed: int, run_dir: str | Path | None = None,
        resume: bool = False, progress: bool = True, device: str = "cpu",
        extra_meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``method`` on ``splits.train`` (labels index ``splits.classnames``); returns the epoch logs.

    With ``run_dir`` a checkpoint is written after every epoch and ``log.jsonl`` keeps one line per
    epoch (strict JSON); ``resume=True`` continues from the checkpoint found there (and sets
    ``method.resumed_from_epoch`` to the checkpoint's epoch; 0 for a fresh run).

    A non-finite loss, gradient or trained weight stops the run with :class:`DivergedError` naming the
    epoch and step; the checkpoint of the last finished epoch stays as it was. The loss is checked
    every step, the gradients when ``grad_clip`` computes their norm, the weights at the end of each
    epoch: a non-finite gradient turns the weights it updates non-finite, so without clipping it
    stops the run at the next step (its loss) or at the end of the epoch, before any checkpoint.
    """
    groups = method.param_groups()
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ConfigError(f"method {getattr(method, 'registry_name', method)!r} has no trainable parameters")
    items = list(splits.train)
    world, rank = dist.world_size(), dist.rank()
    if cfg.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be divisible by the {world} processes")
    if len(items) < world:
        raise ConfigError(f"{len(items)} training images cannot be split over {world} processes")
    method.set_classnames(splits.classnames, split="train")
    optimizer = build_optimizer(cfg, groups)
    precision = train_precision(cfg.precision, method.backbone_dtype)
    method.train_precision = precision  # the result record names it
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and dist.is_main():  # a read-only --out fails now, not after an epoch of compute
        check_writable(run_dir, "run folder")
    backbone = method.backbone
    meta = {
        "method": method.registry_name,
        "method_config": to_dict(method.config),
        "train_config": to_dict(cfg),
        "backbone": {"name": backbone.name, "pretrained": backbone.pretrained, "fingerprint": backbone.fingerprint},
        "dataset": method.dataset or splits.name,  # the registry name the protocol used
        "classnames": list(splits.classnames),
        "seed": seed,
        "epochs": cfg.epochs,
        **(extra_meta or {}),
    }
    start, logs = 0, []
    if resume:
        if run_dir is None or not (checkpoint_dir(run_dir) / "meta.json").is_file():
            raise ConfigError(f"--resume: no checkpoint in {run_dir}")
        done = load_checkpoint(run_dir, method, backbone.fingerprint, optimizer)
        for key in ("method_config", "train_config", "seed", "dataset", "classnames"):
            if done.get(key) != meta[key]:
                raise ConfigError(f"--resume: the checkpoint in {run_dir} was made with a different {key}; "
                                  "resume with the same command, or start a new run directory")
        start = done["epoch"]
        logs = _read_log(run_dir / "log.jsonl", start)
    method.resumed_from_epoch = start
    transform = _train_transform(backbone, cfg)
    dataset = _SeededAugmentation(items, splits.image_root, transform, seed)
    # Feature-level methods train on the frozen features of each epoch's augmentation, encoded once
    # per (backbone, images, transform, seed, epoch) through the run's feature cache.
    source = getattr(method, "feature_source", None) if getattr(method, "feature_level", False) else None
    labels_all = torch.tensor([d.label for d in items])
    per_epoch = len(epoch_batches(len(items), cfg.batch_size, seed, 0))
    epochs, total = cfg.epochs, cfg.epochs * per_epoch
    if cfg.iterations is not None:
        total = cfg.iterations
        epochs = math.ceil(total / per_epoch)
        meta["epochs"] = epochs
    warmup = cfg.warmup_epochs * per_epoch
    if start and progress and dist.is_main():
        left = f"{epochs - start} epoch(s) to go" if start < epochs else "training was already finished"
        print(f"resumed from epoch {start} of {epochs} in {run_dir} ({left})", file=sys.stderr, flush=True)
    for epoch in range(start, epochs):
        lr = lr_at_epoch(cfg, epoch) if cfg.schedule == "epoch" else lr_at_iteration(cfg, epoch * per_epoch, total, warmup)
        _set_lr(optimizer, lr)
        torch.manual_seed(derive_seed(seed, epoch, 2))
        random.seed(derive_seed(seed, epoch, 3))
        batches = epoch_batches(len(items), cfg.batch_size, seed, epoch)
        if source is not None:
            feats = source.train_pass(items, splits.image_root, transform, seed,
                                      epoch if cfg.feature_passes is None else epoch % cfg.feature_passes)
            loader = [(feats[b[_shard(b, world, rank)]], labels_all[b[_shard(b, world, rank)]]) for b in batches]
        else:
            local = [[(epoch, i) for i in b[_shard(b, world, rank)]] for b in batches]
            loader = DataLoader(dataset, batch_sampler=local, num_workers=cfg.workers,
                                pin_memory=str(device).startswith("cuda"))
        method.train()
        t0 = time.perf_counter()
        loss_sum = correct = count = 0.0
        term_sums: dict[str, float] = {}
        bar = tqdm(unwrapped(loader), desc=f"epoch {epoch + 1}/{epochs}", total=len(batches),
                   disable=not progress or not dist.is_main(), leave=False)
        for step, (images, labels) in enumerate(bar):
            iteration = epoch * per_epoch + step
            if iteration >= total:
                break
            if cfg.schedule == "iteration":
                lr = lr_at_iteration(cfg, iteration, total, warmup)
                _set_lr(optimizer, lr)
            b = batches[step]
            info = StepInfo(epoch=epoch, step=step,
                            generator=torch.Generator().manual_seed(derive_seed(seed, epoch, 4, step)),
                            global_labels=labels_all[b], local=_shard(b, world, rank), batch_size=cfg.batch_size)
            # the previous step's gradients go before the forward pass: they are not held beside its activations
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(precision, device):
                if source is not None:
                    out = method.feature_step(images.to(device), labels.to(device), info)
                else:
                    out = method.training_step(images.to(device), labels.to(device), info)
            loss_value = float(out.loss.detach())  # one host sync for the check and the epoch's mean
            local_finite = math.isfinite(loss_value)
            loss_finite = local_finite
            if world > 1:  # every rank stops at the same step
                loss_finite = dist.all_sum([float(not local_finite)])[0] == 0
            if not loss_finite:
                what = "the loss of another process is not finite" if local_finite else f"the loss is {loss_value}"
                raise _diverged(what, epoch, step, len(batches), cfg, run_dir)
            if scaler is not None:
                scaler.scale(out.loss).backward()
                scaler.unscale_(optimizer)
            else:
                out.loss.backward()
            dist.average_gradients(params)
            if cfg.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                # fp16: the scaler skips steps with overflowing gradients and lowers its scale; that is not divergence
                if scaler is None and not bool(torch.isfinite(norm)):
                    raise _diverged("a gradient is not finite", epoch, step, len(batches), cfg, run_dir)
            # Without clipping the gradients are not read a second time: a non-finite gradient makes the
            # weights it updates non-finite, which the next step's loss or the end-of-epoch check finds.
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            n = len(labels)
            loss_sum += loss_value * n
            count += n
            if out.logits is not None:
                correct += float((out.logits.detach().argmax(-1) == out.labels).sum())
            for name, value in (out.extras or {}).items():
                term_sums[name] = term_sums.get(name, 0.0) + float(value) * n
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{100 * correct / count:.1f}", lr=f"{lr:.2e}")
        method.on_epoch_end(epoch)
        if not _all_finite(params):
            raise _diverged("a trained weight is not finite", epoch, len(batches) - 1, len(batches), cfg, run_dir)
        names = sorted(term_sums)
        loss_sum, correct, count, *term_values = dist.all_sum([loss_sum, correct, count, *(term_sums[k] for k in names)])
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / max(count, 1),
                  "accuracy": 100.0 * correct / max(count, 1), "images": int(count),
                  "seconds": round(seconds, 3), "images_per_second": round(count / max(seconds, 1e-9), 2)}
        if names:  # the epoch means of the loss terms (and whatever else) the method's steps reported
            record["terms"] = {k: v / max(count, 1) for k, v in zip(names, term_values)}
        logs.append(record)
        if run_dir is not None and dist.is_main():
            save_checkpoint(run_dir, method, {**meta, "epoch": epoch + 1}, optimizer)
            atomic_write_text(run_dir / "log.jsonl", "".join(dumps(r) + "\n" for r in logs))
        dist.barrier()
    method.eval()
    return logs
