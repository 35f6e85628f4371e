"""Which precision to run in: ``auto`` picks the fastest one this machine runs well.

* CUDA: bf16 where the GPU supports it (Ampere and newer), else fp16 (with a gradient scaler);
* CPU: bf16 only where the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX on x86,
  the BF16 extension on Arm), else fp32. Without them PyTorch emulates bf16 matmuls, which on an
  AVX2 CPU run hundreds of times slower than fp32 (``benchmarks/heba_step.py`` prints both);
* any other device: fp32.

The chosen precision is the storage precision of the frozen backbone, and the engine autocasts in
it (``train.precision: auto``); every result record names the precision it was computed in.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

from vladapt.errors import ConfigError

__all__ = ["PRECISIONS", "auto_precision", "cpu_bf16_instructions", "precision_dtype", "precision_name",
           "resolve_precision", "storage_dtype"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# x86 /proc/cpuinfo "flags" and Arm "Features" that mean native bf16 matrix arithmetic
_X86_BF16 = {"avx512_bf16", "amx_bf16"}
_ARM_BF16 = {"bf16"}


def _cpuinfo_flags(text: str) -> set[str]:
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def _cpuinfo_text() -> str | None:
    """The text of ``/proc/cpuinfo``; ``None`` where the system has none (not Linux), ``""`` when it
    cannot be read."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    try:
        return cpuinfo.read_text(errors="replace")
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def cpu_bf16_instructions() -> str | None:
    """The CPU's native bf16 instruction set (``"avx512_bf16"``, ``"amx_bf16"``, ``"arm_bf16"``), or
    ``None`` when bf16 would be emulated. Read from PyTorch's CPU capabilities, else ``/proc/cpuinfo``
    (Linux) or ``sysctl`` (macOS)."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older PyTorch or an unknown CPU: fall back to the operating system
        caps = {}
    for name in ("amx_bf16", "avx512_bf16"):
        if caps.get(name):
            return name
    machine = platform.machine().lower()
    text = _cpuinfo_text()
    if text is not None:
        flags = _cpuinfo_flags(text)
        found = sorted(flags & _X86_BF16)
        if found:
            return found[0]
        if machine in ("aarch64", "arm64") and flags & _ARM_BF16:
            return "arm_bf16"
        return None
    if platform.system() == "Darwin" and machine == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return "arm_bf16" if out == "1" else None
    return None


def auto_precision(device: str | torch.device = "cpu") -> str:
    """The precision ``auto`` means on ``device`` (see the module docstring)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_bf16_instructions() else "fp32"
    return "fp32"


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``precision`` itself, or for ``auto`` the one :func:`auto_precision` picks on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "auto":
        return auto_precision(device)
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ConfigError("precision fp16 needs a CUDA device; on the CPU use bf16 (fast only with native bf16 "
                          "instructions) or fp32, or auto to let vladapt choose")
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` -> the torch dtype (``auto`` must be resolved first)."""
    if precision not in _DTYPES:
        raise ConfigError(f"precision {precision!r} has no dtype; resolve 'auto' with resolve_precision first")
    return _DTYPES[precision]


def storage_dtype(precision: str, device: str | torch.device = "cpu", train: str | None = None) -> torch.dtype:
    """The dtype to store the frozen backbone in for ``precision`` (``auto`` resolved on ``device``).

    ``train``: the run's ``train.precision``. When the backbone's precision is ``auto`` and training
    names one explicitly (``fp32``, ``bf16``, ``fp16``), the backbone is stored in that one: an
    explicit choice outranks the automatic one (``train.precision=fp32`` on a CPU with native bf16
    trains in fp32, not with fp32 adapters on a bf16 backbone)."""
    if precision == "auto" and train not in (None, "auto"):
        precision = train
    return precision_dtype(resolve_precision(precision, device))


def precision_name(dtype: torch.dtype) -> str:
    """The torch dtype -> ``fp32`` / ``bf16`` / ``fp16``."""
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ConfigError(f"no precision name for dtype {dtype}")
