"""Checkpoints: only the trainable weights (safetensors) plus a JSON sidecar, written atomically.

Layout of a run directory::

    run_dir/
      checkpoint/weights.safetensors   the method's checkpoint state (trainable weights, caches)
      checkpoint/meta.json             method, configs, backbone name and fingerprint, class names,
                                       epoch, seed, vladapt version
      checkpoint/optimizer.pt          optimizer state (for --resume; tensors only, weights_only load)
      log.jsonl                        one JSON line per epoch
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vladapt import __version__
from vladapt.errors import ConfigError, VladaptError
from vladapt.io import atomic_write_bytes, atomic_write_json

WEIGHTS = "weights.safetensors"
META = "meta.json"
OPTIMIZER = "optimizer.pt"


class CheckpointError(VladaptError):
    """A checkpoint file is missing, truncated or corrupt."""


def _unreadable(path: Path, run_dir: str | Path, err: BaseException) -> CheckpointError:
    reason = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else type(err).__name__
    return CheckpointError(f"checkpoint file {path} is unreadable ({reason}): it is truncated or corrupt; "
                           f"delete the run folder {run_dir} and train again (without --resume)")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoint"


def save_checkpoint(run_dir: str | Path, method, meta: dict[str, Any], optimizer=None) -> Path:
    """Write weights, optimizer state and then the sidecar (the sidecar last: it marks completeness)."""
    ckpt = checkpoint_dir(run_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in method.checkpoint_state().items()}
    atomic_write_bytes(ckpt / WEIGHTS, st_save(tensors))
    if optimizer is not None:
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        atomic_write_bytes(ckpt / OPTIMIZER, buf.getvalue())
    atomic_write_json(ckpt / META, {**meta, "vladapt_version": __version__, "weights": WEIGHTS})
    return ckpt


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    path = checkpoint_dir(run_dir) / META
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run_dir} is not a vladapt run directory with a checkpoint")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unreadable(path, run_dir, err) from None
    if not isinstance(meta, dict) or "method" not in meta:
        raise _unreadable(path, run_dir, ValueError("not a vladapt checkpoint sidecar"))
    return meta


def load_checkpoint(run_dir: str | Path, method, backbone_fingerprint: str | None = None,
                    optimizer=None) -> dict[str, Any]:
    """Load trainable weights (and optimizer state) into ``method``; refuses a mismatched method or backbone."""
    meta = read_meta(run_dir)
    name = getattr(method, "registry_name", type(method).__name__)
    if meta.get("method") != name:
        raise ConfigError(f"checkpoint {run_dir} is of method {meta.get('method')!r}, not {name!r}")
    if backbone_fingerprint is not None and meta["backbone"]["fingerprint"] != backbone_fingerprint:
        raise ConfigError(
            f"checkpoint {run_dir} was trained on backbone {meta['backbone']['name']!r} with weights "
            f"{meta['backbone']['fingerprint']}, but the loaded backbone's weights are {backbone_fingerprint}; "
            "load the same backbone and weights"
        )
    ckpt = checkpoint_dir(run_dir)
    try:
        tensors = st_load((ckpt / WEIGHTS).read_bytes())
    except Exception as err:  # safetensors: "invalid header length", "incomplete metadata", missing file
        raise _unreadable(ckpt / WEIGHTS, run_dir, err) from None
    try:
        method.load_checkpoint_state(tensors)
    except ValueError as e:
        raise ConfigError(f"checkpoint {run_dir} does not fit this method's configuration ({e}); "
                          "use the checkpoint's config") from None
    if optimizer is not None and (ckpt / OPTIMIZER).is_file():
        try:
            state = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(state)
        except Exception as err:  # truncated zip archive, pickle error, a state of another optimizer
            raise _unreadable(ckpt / OPTIMIZER, run_dir, err) from None
    return meta
