"""Errors raised inside DataLoader worker processes, brought back as their one-line message.

With ``num_workers > 0`` PyTorch re-raises a worker's exception in the main process as the same
type, but with the worker's whole traceback as the message ("Caught DataError in DataLoader worker
process 0. Original Traceback ..."). For vladapt's own errors (an unreadable image, a missing file)
:func:`unwrapped` restores the original one-line message, which the CLI prints without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from vladapt.errors import VladaptError

T = TypeVar("T")
_MARK = "Original Traceback (most recent call last):"


def original_message(err: BaseException) -> str | None:
    """The worker's own message of ``err`` when it is a re-raised DataLoader worker error, else None."""
    text = str(err)
    if not text.startswith("Caught ") or _MARK not in text:
        return None
    cls = type(err)
    names = [f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "]
    best = max(text.rfind("\n" + n) for n in names)
    if best < 0:
        return None
    line = text[best + 1:]
    return line.split(": ", 1)[1].strip() if ": " in line else None


def unwrapped(loader: Iterable[T]) -> Iterator[T]:
    """Iterate ``loader``; a vladapt error from a worker process is re-raised with its own message."""
    try:
        yield from loader
    except VladaptError as err:
        message = original_message(err)
        if message is None:
            raise
        raise type(err)(message) from None
