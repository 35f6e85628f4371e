"""Writing result files atomically: a reader never sees a half-written file.

JSON written here is strict (RFC 8259): a non-finite float (NaN, +-inf) is written as ``null``
(:func:`finite_json`), never as the bare ``NaN`` / ``Infinity`` tokens other JSON readers reject.
A file that cannot be written raises :class:`WriteError`, a :class:`~vladapt.errors.VladaptError`
(and an ``OSError``) whose one-line message names the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from vladapt.errors import VladaptError


class WriteError(VladaptError, OSError):
    """A result, checkpoint or cache file cannot be written (read-only folder, full disk, ...)."""


def _write_error(message: str, err: OSError) -> WriteError:
    e = WriteError(message)
    e.reason = err.strerror or str(err)  # the operating system's reason alone ("Read-only file system")
    return e


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by ``None`` (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON of ``obj`` (non-finite floats become ``null``; ``allow_nan=False`` guards the rest)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and write (then delete) a probe file in it, so a read-only or
    missing location is reported before any compute, not after an epoch of training."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vladapt-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise WriteError(f"cannot write to the {what} {folder} ({err.strerror or err}); make it writable "
                         "or choose another folder (--out)") from None
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    Concurrent writers of the same file (several seeds sharing a cache) each write their own
    temporary file; ``os.replace`` swaps one in atomically.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(f"cannot write {path} ({err.strerror or err}); make {path.parent} writable "
                           "or choose another folder (--out)", err) from None
    try:
        # mkstemp creates 0600; results and caches in shared folders must stay readable by others.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, VladaptError):
            raise _write_error(f"cannot write {path} ({err.strerror or err}); check the free space and "
                               f"permissions of {path.parent}", err) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (non-finite floats as ``null``), indented."""
    return atomic_write_text(path, dumps(obj, indent=2, ensure_ascii=False) + "\n")


def files_fingerprint(paths: Iterable[Path]) -> str:
    """SHA-256 over each file's path, size and modification time (in order): any change to a file
    changes it. Missing files are an error of the caller's data, reported by the loader, so they are
    fingerprinted as missing rather than raised here."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
