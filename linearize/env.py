"""Environment switches: every boolean ``LINEARIZE_*`` variable is read by :func:`env_flag`, so they all take the same
spellings (case-insensitive, surrounding spaces ignored)::

    on:  1, true, on, yes
    off: 0, false, off, no

An unset or empty variable means the default; anything else warns once, naming the variable and its value, and the
default is used. The switches:

- ``LINEARIZE_CUDA_GRAPHS`` (default on): decode steps replay a captured CUDA graph (``linearize.models.graphs``).
- ``LINEARIZE_COMPILE_DECODE`` (default: the model's ``compile_decode``): the graphed decode step is compiled.
"""

from __future__ import annotations

import os
import warnings

TRUE_WORDS = frozenset({"1", "true", "on", "yes"})
FALSE_WORDS = frozenset({"0", "false", "off", "no"})


def env_flag(name: str, default: bool | None) -> bool | None:
    """The boolean environment variable ``name``, or ``default`` when it is unset, empty or not a boolean word (then
    with a ``UserWarning`` naming the variable and its value).

    ``default=None`` lets the caller tell "not set" from "set": ``env_flag("LINEARIZE_COMPILE_DECODE", None)`` is None
    unless the variable says on or off.
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    fallback = "ignored" if default is None else f"using the default ({'on' if default else 'off'})"
    warnings.warn(f"{name}={raw!r} is not a boolean (use 1/0, true/false, on/off or yes/no); {fallback}",
                  UserWarning, stacklevel=2)
    return default


__all__ = ["FALSE_WORDS", "TRUE_WORDS", "env_flag"]
