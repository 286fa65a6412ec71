"""The errors a user can fix: the scripts print them on one line and exit with code 2."""

from __future__ import annotations

import warnings


class MitoError(Exception):
    """A problem the user can fix; the scripts print it on one line and exit with 2."""


class DataError(MitoError):
    """A dataset, image or output path that cannot be used; the message names the file."""


def error_reason(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class ConfigError(MitoError, ValueError):
    """A configuration with one or more invalid fields; the message names them all."""


class ModelError(MitoError):
    """A model file or its settings file that cannot be used; the message names the file."""


_noted = set()


def note_once(message: str, kind: str) -> None:
    """A warning said once per ``kind`` and run: a rule is stated once, not for every file."""
    if kind not in _noted:
        _noted.add(kind)
        warnings.warn(message, stacklevel=3)
