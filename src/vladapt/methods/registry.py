"""Method registry: ``create_method(name, backbone, classnames, config)``.

No file lists the methods. A method registers itself with ``@register_method("name")`` in its own
module under ``vladapt.methods``; :func:`list_methods` imports every module of the package once
(``pkgutil``), so adding a method is adding its module (and its configs under
``vladapt/configs/<name>/``). Methods of other packages register through the ``vladapt.methods``
entry-point group (each entry point names a module to import).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from torch import nn

from vladapt.errors import ConfigError


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type

    @property
    def trainable(self) -> bool:
        return bool(self.cls.trainable)


_METHODS: dict[str, MethodInfo] = {}
_discovered = False


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        known = _METHODS.get(name)
        if known is not None and known.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is registered twice ({known.cls.__module__} and {cls.__module__})")
        _METHODS[name] = MethodInfo(name, cls)
        cls.registry_name = name
        return cls

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import vladapt.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    for ep in entry_points(group="vladapt.methods"):
        importlib.import_module(ep.value.split(":")[0])
    _discovered = True


def list_methods() -> dict[str, MethodInfo]:
    """``{name: MethodInfo}`` of every registered method, sorted by name."""
    _discover()
    return dict(sorted(_METHODS.items()))


def create_method(name: str, backbone: Any, classnames: list[str], config: dict[str, Any] | None = None) -> nn.Module:
    """Build method ``name`` on ``backbone`` for ``classnames``; ``config=None`` = its defaults."""
    methods = list_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(methods)}")
    return methods[name].cls(backbone, classnames, config)
