"""An on-disk cache of frozen image features, keyed by everything the features depend on.

A frozen backbone maps the same image through the same transform to the same feature, so
feature-level methods (CLIP-Adapter, Tip-Adapter(-F), a linear probe, LatHAdapter) need the image
encoder only once per (backbone weights, image files, transform, augmentation pass, precision): later
seeds, hyper-parameters and methods read the features back. An entry's key is the SHA-256 of those
parts; a changed backbone (its weights fingerprint), transform (its description), augmentation pass
or seed, precision, or any image file (path, size or modification time) gives another key, so stale
entries are never read. Entries are ``<root>/<key[:2]>/<key>.safetensors`` holding one fp32 tensor
``features [N, E]`` and the key in the metadata, written to a temporary file and renamed into place;
an entry that cannot be read or does not match its key (a torn or foreign file) is rebuilt.

A cache folder that cannot be written (read-only, full disk, not a folder) does not stop a run: the
first failed write prints one warning naming the folder, and from then on this cache keeps its
entries in memory only (existing entries are still read).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vladapt.io import atomic_write_bytes, cache_key

ENV_VAR = "VLADAPT_FEATURE_CACHE"


def default_cache_dir() -> Path | None:
    """``$VLADAPT_FEATURE_CACHE`` (``none``: no disk cache), else ``~/.cache/vladapt/features``."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in ("", "none", "off") else Path(value).expanduser()
    return Path.home() / ".cache" / "vladapt" / "features"


def cache_dir_option(where: str | None) -> Path | None:
    """The cache folder a ``--feature-cache`` option names: ``None`` (not given) -> :func:`default_cache_dir`,
    ``none`` -> no disk cache (``None``), else that folder."""
    if where is None:
        return default_cache_dir()
    return None if where.strip().lower() == "none" else Path(where)


class FeatureCache:
    """``get(parts, compute)``: the tensor stored for ``parts`` or ``compute()`` (then stored).

    ``root=None`` keeps entries in memory only (for this process). ``hits`` / ``misses`` count lookups
    (memory hits included) for reports and tests.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._memory: dict[str, Tensor] = {}
        self.write_failed = False  # set by the first failed write: later entries stay in memory only
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, parts: dict[str, Any], compute: Callable[[], Tensor]) -> Tensor:
        key = cache_key(parts)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        value = self._read(key)
        if value is None:
            self.misses += 1
            value = compute().detach().to("cpu", torch.float32).contiguous()
            self._write(key, value, parts)
        else:
            self.hits += 1
        self._memory[key] = value
        return value

    def _read(self, key: str) -> Tensor | None:
        if self.root is None:
            return None
        path = self.path(key)
        try:
            if not path.is_file():
                return None
        except OSError:  # an unreadable folder: as if the entry were absent
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    raise ValueError("the entry's key does not match its file name")
                return f.get_tensor("features")
        except Exception as err:  # a torn, truncated or foreign file: rebuild it
            warnings.warn(f"feature cache entry {path} is unreadable ({err}); recomputing it", stacklevel=3)
            return None

    def _write(self, key: str, value: Tensor, parts: dict[str, Any]) -> None:
        if self.root is None or self.write_failed:
            return
        from safetensors.torch import save

        meta = {"key": key, "parts": json.dumps(parts, sort_keys=True, default=str)}
        try:
            atomic_write_bytes(self.path(key), save({"features": value}, metadata=meta))
        except OSError as err:  # a read-only or full disk must not stop a run: the features are in memory
            self.write_failed = True
            reason = getattr(err, "reason", None) or err.strerror or str(err)
            warnings.warn(f"cannot write the feature cache in {self.root} ({reason}); keeping features in memory "
                          "for this run only (make the folder writable, or pass --feature-cache DIR or none)",
                          stacklevel=3)
