"""Exceptions raised by vladapt.

Every user-facing error is a :class:`VladaptError` (or a subclass) whose message names the offending
file, key or value and says what to do; the CLI prints the message without a traceback.
"""

from __future__ import annotations


class VladaptError(Exception):
    """Base class of the errors vladapt raises for bad input or an unusable environment."""


class ConfigError(VladaptError, ValueError):
    """A configuration key or value is unknown or invalid."""


class DataError(VladaptError):
    """A dataset layout, split file or image is missing or inconsistent."""


class BackboneError(VladaptError):
    """A backbone cannot be built or its weights cannot be loaded."""
