"""Run configuration: the packaged YAML of (method, protocol), a user file, and key=value overrides.

A run config has two sections, ``method`` (the method's Config dataclass) and ``train``
(:class:`~vladapt.engine.train.TrainConfig`); both are validated before anything runs. A config file
may extend another (``extends: base2new.yaml``, relative to the file; see
:func:`vladapt.config.load_config`): its keys deep-merge over the parent's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vladapt.config import deep_merge, from_mapping, load_config, parse_overrides, to_dict
from vladapt.engine.train import TrainConfig
from vladapt.errors import ConfigError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = ("method", "train")


def packaged_config(method: str, protocol: str) -> Path | None:
    """``vladapt/configs/<method>/<protocol>.yaml`` if vladapt ships one."""
    path = CONFIG_ROOT / method / f"{protocol}.yaml"
    return path if path.is_file() else None


def resolve_run_config(method: str, protocol: str, path: str | Path | None = None,
                       overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any], TrainConfig]:
    """(validated method config as a dict, TrainConfig) for a run.

    Order: the packaged config of (method, protocol), replaced by ``path`` when given (either with
    its ``extends`` chain resolved), then the overrides (``method.scale=0.05``, ``train.lr=0.01``).
    """
    from vladapt.methods import list_methods

    methods = list_methods()
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}; available: {sorted(methods)}")
    source = Path(path) if path is not None else packaged_config(method, protocol)
    data = load_config(source, SECTIONS) if source is not None else {}
    given = parse_overrides(list(overrides))
    unknown = sorted(set(given) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} in overrides; allowed sections: {list(SECTIONS)}")
    classes = {"method": methods[method].cls.Config, "train": TrainConfig}
    for section, cls in classes.items():  # say where a misspelt key was written before merging
        _check_keys(given.get(section), cls, section, "given on the command line")
        if source is not None:
            _check_keys(data.get(section), cls, section, f"in config file {source} (or a file it extends)")
    data = deep_merge(data, given)
    method_cfg = from_mapping(methods[method].cls.Config, data.get("method") or {}, "method.")
    train_cfg = from_mapping(TrainConfig, data.get("train") or {}, "train.")
    return to_dict(method_cfg), train_cfg


def _check_keys(values: Any, cls: type, section: str, where: str) -> None:
    import dataclasses

    if not isinstance(values, dict):
        return  # from_mapping reports a section that is not a mapping
    allowed = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise ConfigError(f"unknown config key '{section}.{unknown[0]}' {where}; allowed {section} keys: {allowed}")
