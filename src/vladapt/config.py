"""Validated configuration: dataclasses filled from YAML files and ``key=value`` overrides.

Every config is a dataclass. :func:`from_mapping` builds one from a mapping and refuses unknown keys
and bad values with a :class:`~vladapt.errors.ConfigError` that names the key and what is allowed.
Field metadata may give ``choices`` (allowed values), ``min`` / ``max`` (inclusive bounds) and
``help`` (one line shown in error messages and ``vladapt info``).

A YAML config file may start from another with ``extends: parent.yaml`` (see :func:`load_config`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from vladapt.errors import ConfigError

C = TypeVar("C")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-3`` and ``1E6`` as numbers (YAML 1.1, PyYAML's version,
    wants a dot in a float: ``1.0e-3``; YAML 1.2 and every user do not)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text safely, with scientific notation read as numbers (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e3, 100.0
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where + ".")
    return value


def from_mapping(cls: type[C], data: Mapping[str, Any] | None, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``: unknown keys and bad values are errors naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if not isinstance(name, str):
            raise ConfigError(f"config key {where}{name!r} is not a name; keys are words such as {sorted(fields)[0]!r}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; allowed keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}{name}"
        value = _coerce(value, hints[name], key)
        meta = fields[name].metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(meta['choices'])}")
        if "min" in meta and value is not None and value < meta["min"]:
            raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
        if "max" in meta and value is not None and value > meta["max"]:
            raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}")
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=0.01", "method.layers=[9, 12]"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=0.01)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value ({e})") from e
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


EXTENDS = "extends"


def load_config(path: str | Path, sections: Sequence[str] | None = None) -> dict[str, Any]:
    """A YAML config file with its ``extends:`` chain resolved.

    ``extends: base.yaml`` names the parent file, relative to the file that says it; parents may
    extend further files. A file's keys deep-merge over its parent's (a nested mapping is merged key
    by key, any other value replaces the parent's). A missing parent and a cycle are errors naming
    the files. With ``sections``, every file may hold only those top-level keys (besides ``extends``),
    and an unknown one is an error naming the file it is in.
    """
    chain: list[Path] = []
    layers: list[dict[str, Any]] = []
    path: Path | None = Path(path)
    while path is not None:
        seen = [p.resolve() for p in chain]
        if path.resolve() in seen:
            cycle = chain[seen.index(path.resolve()):] + [path]
            raise ConfigError(f"config files extend each other in a cycle: {' -> '.join(map(str, cycle))}")
        if chain and not path.is_file():
            raise ConfigError(f"config file {chain[-1]} extends {path}, which does not exist")
        data = load_yaml(path)
        parent = data.pop(EXTENDS, None)
        if parent is not None and (not isinstance(parent, str) or not parent.strip()):
            raise ConfigError(f"config file {path}: {EXTENDS} must be the file name of another config, got {parent!r}")
        unknown = sorted(set(data) - set(sections)) if sections is not None else []
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r} in config file {path}; allowed sections: "
                              f"{list(sections)} (and {EXTENDS!r})")
        chain.append(path)
        layers.append(data)
        path = path.parent / parent if parent is not None else None
    merged: dict[str, Any] = {}
    for data in reversed(layers):
        merged = deep_merge(merged, data)
    return merged
