"""vladapt: few-shot adaptation of frozen CLIP-style vision-language models.

The entry points below are imported on first use, so ``import vladapt`` stays cheap (no torch)::

    import vladapt

    bb = vladapt.load_clip("ViT-B-16-quickgelu", pretrained="openai")
    heba = vladapt.create_method("heba", bb, ["cat", "dog"])  # config=None: the method's defaults
"""

from __future__ import annotations

__version__ = "0.1.0"

from vladapt.errors import BackboneError, ConfigError, DataError, VladaptError

# name -> the module that defines it
_LAZY = {
    "create_method": "vladapt.methods",
    "list_methods": "vladapt.methods",
    "load_clip": "vladapt.backbones",
    "load_dataset": "vladapt.data",
    "run_grid": "vladapt.bench.grid",
    "Predictor": "vladapt.predict",
    "RunSettings": "vladapt.protocols.runner",
}

__all__ = [
    "__version__",
    "BackboneError",
    "ConfigError",
    "DataError",
    "VladaptError",
    *_LAZY,
]


def __getattr__(name: str):
    # Heavy imports (torch, open_clip) happen on first use, so `import vladapt` stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vladapt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
