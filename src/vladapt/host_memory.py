"""Host memory: let large freed blocks be reused instead of handed back to the operating system.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the system on ``free``. A ViT-B/16 training step in fp32 allocates and
frees hundreds of activation tensors of 38 MiB (``16 x 197 x 3072`` floats): each one is zero-filled
page by page by the kernel on first touch, again in every step. On a 2-core CPU that page-fault
work took 18 % of HeBA's fp32 step (``benchmarks/heba_step.py`` runs both).

:func:`reuse_freed_memory` tells glibc (``mallopt``) to serve large blocks from its heap and to keep
up to 2 GiB of freed memory at the heap's top, so that later blocks reuse pages that are already
mapped. The process's peak RSS stays close to what it was (the heap holds what the step's peak
needs). The ``vladapt`` command and ``vladapt bench`` workers call it; Python scripts that train in
a loop of their own can call it once at the start. ``VLADAPT_TUNE_MALLOC=0`` turns it off.
Elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_KEEP_AT_TOP = 2 ** 31 - 1  # bytes of freed memory kept at the heap's top (mallopt takes an int)

_applied: list[bool] = []


def reuse_freed_memory() -> bool:
    """Serve large blocks from glibc's heap and keep freed memory for reuse (see the module
    docstring). Returns True when the setting is in effect in this process (idempotent), False on
    systems without glibc or with ``VLADAPT_TUNE_MALLOC=0``."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get("VLADAPT_TUNE_MALLOC", "1").strip() != "0" and platform.system() == "Linux" \
            and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_AT_TOP) == 1
        except (OSError, AttributeError):
            ok = False
    _applied.append(ok)
    return ok
