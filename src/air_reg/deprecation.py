"""Renamed arguments and names: the old spelling still works, with a ``DeprecationWarning``
that names the new one (``docs/protocol.md`` lists the renames)."""

from __future__ import annotations

import warnings


def warn(message: str, stacklevel: int = 3) -> None:
    """A ``DeprecationWarning`` attributed to the caller of the function that calls this."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def renamed(where: str, old: str, new: str, old_value, new_value):
    """``new_value``, or the value passed under the former name ``old`` (not None), with a
    warning that names ``new``."""
    if old_value is None:
        return new_value
    warn(f"{where}({old}=...) is deprecated; use {new}=...", stacklevel=4)
    return old_value
