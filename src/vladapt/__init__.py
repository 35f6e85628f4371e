"""vladapt: few-shot adaptation of frozen CLIP-style vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"

from vladapt.errors import BackboneError, ConfigError, DataError, VladaptError

__all__ = [
    "__version__",
    "BackboneError",
    "ConfigError",
    "DataError",
    "VladaptError",
    "load_clip",
]


def __getattr__(name: str):
    # Heavy imports (torch, open_clip) happen on first use, so `import vladapt` stays cheap.
    if name == "load_clip":
        from vladapt.backbones import load_clip

        return load_clip
    raise AttributeError(f"module 'vladapt' has no attribute {name!r}")
