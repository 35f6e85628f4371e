"""Reading and writing split files in the CoOp ``split_zhou_<Name>.json`` format.

Format: a JSON object whose keys ``"train"``, ``"val"`` and ``"test"`` each hold a list of
``[relative_image_path, label, classname]`` triples; labels are 0-based and each label has one name.
An image path that is absolute or leaves the image root (``../x.jpg``) is refused as a bad entry.
The same format is used for the splits vladapt makes for custom data and for few-shot caches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from vladapt.data.base import SPLIT_NAMES, Datum, classnames_from_items, unsafe_path_reason
from vladapt.errors import DataError
from vladapt.io import atomic_write_text

_MAX_SHOWN = 10


class DataProblems(DataError):
    """A :class:`DataError` carrying every problem found in one source.

    ``problems`` holds one message per problem so that :func:`vladapt.data.check_dataset` can list
    them all; the exception message shows the first few plus a total count.
    """

    def __init__(self, source: str | os.PathLike[str], problems: Sequence[str], hint: str) -> None:
        self.source = str(source)
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:_MAX_SHOWN])
        more = len(self.problems) - _MAX_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{self.source}: {len(self.problems)} problem(s):\n{shown}{tail}\n{hint}")


def parse_entries(raw: object, where: str) -> tuple[list[Datum], list[str]]:
    """Turn a JSON list of ``[path, label, classname]`` triples into items.

    ``where`` names the list in messages (e.g. ``"train"``, giving ``"train[3]"``). Returns
    ``(items, problems)``; malformed entries, and paths that are absolute or leave the image root
    (see :func:`~vladapt.data.base.unsafe_path_reason`), are skipped and reported.
    """
    if not isinstance(raw, list):
        return [], [f"{where}: expected a list of [path, label, classname] entries, got {type(raw).__name__}"]
    items: list[Datum] = []
    problems: list[str] = []
    for index, entry in enumerate(raw):
        at = f"{where}[{index}]"
        if not isinstance(entry, list) or len(entry) != 3:
            problems.append(f"{at}: expected a 3-item list [path, label, classname], got {entry!r}")
            continue
        path, label, classname = entry
        # bool is an int subclass; a true/false label is a typo, not class 0/1.
        if not isinstance(path, str) or not path:
            problems.append(f"{at}: path must be a non-empty string, got {path!r}")
        elif (unsafe := unsafe_path_reason(path)) is not None:
            problems.append(f"{at}: path {path!r} {unsafe}")
        elif not isinstance(label, int) or isinstance(label, bool) or label < 0:
            problems.append(f"{at}: label must be an integer >= 0, got {label!r}")
        elif not isinstance(classname, str) or not classname:
            problems.append(f"{at}: classname must be a non-empty string, got {classname!r}")
        else:
            items.append(Datum(path, label, classname))
    return items, problems


def with_locations(parts: Mapping[str, Sequence[Datum]]) -> Iterable[tuple[str, Datum]]:
    """``("train[0]", datum), ...`` over every split, for consistency messages."""
    for split, items in parts.items():
        for index, datum in enumerate(items):
            yield f"{split}[{index}]", datum


def read_split_file(
    path: Path, hint: str = "fix the file or replace it with the official split file"
) -> tuple[dict[str, list[Datum]], list[str]]:
    """Read and validate a split file.

    Returns ``({"train": [...], "val": [...], "test": [...]}, classnames)``. Raises
    :class:`DataError` if the file is missing or not JSON, and :class:`DataProblems` listing every
    bad entry (by split and index), missing key and label/classname inconsistency.
    """
    if not path.is_file():
        raise DataError(f"split file {path} not found; {hint}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: bad JSON or a huge int
        raise DataError(f"cannot read split file {path}: {err}; {hint}") from err
    if not isinstance(raw, dict):
        raise DataProblems(path, [f"expected a JSON object with keys {', '.join(SPLIT_NAMES)}"], hint)
    parts: dict[str, list[Datum]] = {}
    problems: list[str] = []
    for split in SPLIT_NAMES:
        if split not in raw:
            problems.append(f"missing key {split!r} (a split file needs {', '.join(SPLIT_NAMES)})")
            parts[split] = []
            continue
        parts[split], bad = parse_entries(raw[split], split)
        problems.extend(bad)
    classnames, bad = classnames_from_items(with_locations(parts))
    problems.extend(bad)
    if problems:
        raise DataProblems(path, problems, hint)
    return parts, classnames


def split_json_text(parts: Mapping[str, Sequence[Datum]], header: Mapping[str, object] | None = None) -> str:
    """Serialise ``{split: items}`` as split-file JSON, one entry per line for readable diffs.

    ``header`` holds extra scalar keys written before the splits (few-shot caches record their
    dataset, shot count and seed there).
    """
    blocks = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in (header or {}).items()]
    for split, items in parts.items():
        lines = ",\n".join(
            "    " + json.dumps([d.path, d.label, d.classname], ensure_ascii=False) for d in items
        )
        blocks.append(f"  {json.dumps(split)}: [\n{lines}\n  ]" if items else f"  {json.dumps(split)}: []")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def write_split_file(path: Path, parts: Mapping[str, Sequence[Datum]]) -> None:
    """Atomically write ``parts`` (normally train/val/test) as a split file."""
    atomic_write_text(path, split_json_text(parts))
