"""CuPL-style description banks and HeBA's per-class prompt bank (METHODS.md §1.6).

A description bank is a JSON object ``{classname: [sentence, ...]}`` (LLM-written descriptions,
20 per class in the files HeBA and LwEIB ship). The prompt for class ``c`` and description ``d``
is the reference concatenation ``f"{prefix} {c}, {d}"``, e.g. ``"a photo of a gerenuk, A gerenuk is
a type of antelope ..."``. Tokenization is left to the caller: everything here is strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vladapt.errors import ConfigError

DEFAULT_PREFIX = "a photo of a"


def load_description_bank(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a description bank ``{classname: [sentence, ...]}`` from a JSON file.

    Raises:
        ConfigError: the file cannot be read, is not JSON, is not an object, or a key does not map
            to a list of strings; the message names the file (and the key).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read description bank {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"description bank {path} is not UTF-8 text: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"description bank {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"description bank {path} must be a JSON object {{classname: [sentence, ...]}}, "
            f"got a JSON {type(data).__name__}"
        )
    for key, value in data.items():
        if not isinstance(value, list):
            raise ConfigError(
                f"description bank {path}: key {key!r} must map to a list of strings, got {type(value).__name__}"
            )
        for i, sentence in enumerate(value):
            if not isinstance(sentence, str):
                raise ConfigError(
                    f"description bank {path}: key {key!r}, entry {i} must be a string, "
                    f"got {type(sentence).__name__}"
                )
    return data


class _Lookup:
    """Class name -> descriptions: exact key first, then case-insensitive (ambiguity is an error)."""

    def __init__(self, bank: Mapping[str, Sequence[str]]) -> None:
        self.bank = bank
        self.folded: dict[str, str] = {}
        self.ambiguous: dict[str, list[str]] = {}
        for key in bank:
            k = key.casefold()
            if k in self.folded and list(bank[self.folded[k]]) != list(bank[key]):
                self.ambiguous.setdefault(k, [self.folded[k]]).append(key)
            self.folded.setdefault(k, key)

    def get(self, name: str) -> list[str]:
        spaced = name.replace("_", " ")
        for candidate in (name, spaced):
            if candidate in self.bank:
                return list(self.bank[candidate])
        for candidate in (spaced, name):
            k = candidate.casefold()
            if k in self.ambiguous:
                raise ConfigError(
                    f"class {name!r} matches several description-bank keys that differ only in case "
                    f"({self.ambiguous[k]}); rename the class or the keys"
                )
            if k in self.folded:
                return list(self.bank[self.folded[k]])
        return []


@dataclass
class PromptBank:
    """Dense per-class prompt bank: ``prompts[c][t]`` for class id ``c`` and template ``t < num_templates``.

    Classes with fewer prompts than the longest class are padded by repeating their first prompt
    (as the reference does); ``counts[c]`` is the number of distinct prompts before padding.
    ``missing`` lists the class names a given description bank had no (non-empty) entry for; it is
    empty when the bank was built without descriptions.
    """

    classnames: list[str]
    prompts: list[list[str]]
    counts: list[int]
    missing: list[str]

    @classmethod
    def build(
        cls,
        classnames: Sequence[str],
        bank: Mapping[str, Sequence[str]] | None,
        prefix: str = DEFAULT_PREFIX,
        reference_fallback: bool = False,
        strict: bool = True,
    ) -> "PromptBank":
        """Build the prompts of ``classnames`` (in order; class id = position).

        For class ``c`` (underscores replaced by spaces) with descriptions ``d_1..d_T`` the prompts are
        ``f"{prefix} {c}, {d_t}"``. Descriptions are looked up by the original name, then the spaced
        name, then case-insensitively.

        A class without descriptions (no bank, or missing from / empty in the bank with
        ``strict=False``) gets one fallback prompt:

        * default: ``f"{prefix} {c}."`` (``"a photo of a cat."``);
        * ``reference_fallback=True``: the released HeBA code's ``f"{prefix} {c}, a photo of a {c}."``,
          i.e. the concatenation applied to its fallback description (``"a photo of a cat, a photo of a
          cat."``), which is what every class gets when its description import fails (§1.13 defect 2).

        Raises:
            ConfigError: ``strict`` and a given bank lacks classes (all of them are listed), or no
                class names.
        """
        if not classnames:
            raise ConfigError("a prompt bank needs at least one class name")
        lookup = _Lookup(bank) if bank is not None else None
        missing: list[str] = []
        prompts: list[list[str]] = []
        for name in classnames:
            c = name.replace("_", " ")
            descriptions = lookup.get(name) if lookup is not None else []
            if descriptions:
                prompts.append([f"{prefix} {c}, {d}" for d in descriptions])
                continue
            if lookup is not None:
                missing.append(name)
            prompts.append([f"{prefix} {c}, a photo of a {c}." if reference_fallback else f"{prefix} {c}."])
        if missing and strict:
            raise ConfigError(
                f"the description bank has no descriptions for {len(missing)} of {len(classnames)} classes: "
                f"{missing}; add them to the bank, or set method.strict_descriptions=false (Python: strict=False) "
                "to give them the fallback prompt"
            )
        counts = [len(p) for p in prompts]
        t_max = max(counts)
        dense = [p + [p[0]] * (t_max - len(p)) for p in prompts]
        return cls(classnames=list(classnames), prompts=dense, counts=counts, missing=missing)

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    @property
    def num_templates(self) -> int:
        """``T_max``: the padded number of prompts per class."""
        return len(self.prompts[0])

    def sample(self, class_ids: Sequence[int] | Tensor, generator: torch.Generator | None = None) -> list[str]:
        """One prompt per class id, each with its own template index drawn uniformly from ``0..T_max-1``
        (over the padded bank, as the reference does, so padded classes repeat their first prompt)."""
        ids = class_ids.tolist() if isinstance(class_ids, Tensor) else list(class_ids)
        bad = [c for c in ids if not 0 <= c < self.num_classes]
        if bad:
            raise IndexError(f"class ids {bad} out of range for a prompt bank of {self.num_classes} classes")
        templates = torch.randint(self.num_templates, (len(ids),), generator=generator).tolist()
        return [self.prompts[c][t] for c, t in zip(ids, templates)]

    def all_for_template(self, t: int) -> list[str]:
        """The ``t``-th prompt of every class, in class order (one text batch of the test-time average)."""
        if not 0 <= t < self.num_templates:
            raise IndexError(f"template index {t} out of range 0..{self.num_templates - 1}")
        return [p[t] for p in self.prompts]
