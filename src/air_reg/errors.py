"""air-reg's own error types. The entry points show these as one line (their messages name
the problem and the fix); any other exception is a bug and keeps its traceback.

Each also derives from the built-in type it replaced (``ImageError`` is a ``ValueError``,
``CheckpointError`` a ``RuntimeError``, ...), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or settings, raised by air-reg itself."""


class ConfigError(UserError, ValueError):
    """A setting (config value or argument) that cannot work."""


class DataError(UserError, FileNotFoundError):
    """Data files that are missing, corrupt or do not fit together."""


class OutputError(UserError, PermissionError):
    """An output location that cannot be written."""
