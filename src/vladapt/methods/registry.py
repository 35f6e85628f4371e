"""Method registry: ``create_method(name, backbone, classnames, config)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from vladapt.errors import ConfigError


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type
    trainable: bool


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, trainable: bool = True) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = MethodInfo(name, cls, trainable)
        cls.registry_name = name
        return cls

    return deco


def _load_builtin() -> None:
    # Importing the modules runs their @register_method decorators.
    from vladapt.methods import heba, zeroshot  # noqa: F401


def list_methods() -> dict[str, MethodInfo]:
    _load_builtin()
    return dict(sorted(_METHODS.items()))


def create_method(name: str, backbone: Any, classnames: list[str], config: dict[str, Any] | None = None) -> nn.Module:
    """Build method ``name`` on ``backbone`` for ``classnames``; ``config=None`` = its defaults."""
    methods = list_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(methods)}")
    return methods[name].cls(backbone, classnames, config)
