"""What an export may say about where its inputs came from: hub ids as they are, local files by name only.

An export folder is meant to be shared (``hf upload``, ``model.push_to_hub``), so nothing in it names a path of the
machine that wrote it. A model that came from a local folder or ``.gguf`` file is recorded as ``local:<name>``
(``local:stories260K-hf``, ``local:SmolLM2-135M-Instruct.Q4_1.gguf``): readers see what it was, and no loader
mistakes it for a hub id. The one exception is a delta export of a local base, which cannot load without the base's
path (``models/delta.py``; its model card says so).

    portable_reference("HuggingFaceTB/SmolLM2-135M")        # -> "HuggingFaceTB/SmolLM2-135M"
    portable_reference("../shared/data/stories260K-hf")     # -> "local:stories260K-hf"
    portable_json({"data": "/home/me/text.txt (12 documents)"})  # -> {"data": "local:text.txt (12 documents)"}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

LOCAL = "local:"
"""Prefix of a model or file recorded by name only: it was local to the machine that wrote the export."""

# An absolute path inside a longer text: "/" (or "~/") not preceded by a word, "." or "/" and not followed by "/"
# (so "tokens/s", "owner/name" and "https://..." are left alone), up to whitespace, a quote or a bracket.
_EMBEDDED_PATH = re.compile(r"(?<![\w./~-])(?:~(?=/))?/(?!/)[^\s\"'`,;()\[\]{}<>|*]+")


def portable_reference(source: str | os.PathLike | None) -> str | None:
    """``source`` as an export records it: a hub id unchanged; an absolute path, a ``~`` path or an existing local
    folder or file as ``local:<its name>``; None stays None."""
    if source is None:
        return None
    text = str(source)
    if text.startswith(LOCAL):
        return text
    path = Path(text).expanduser()
    if path.is_absolute() or text.startswith("~") or path.exists():
        name = Path(os.path.normpath(path.absolute())).name
        return LOCAL + (name or text)
    return text


def is_local_reference(ref: Any) -> bool:
    """True for a ``local:<name>`` record (a model that was local to the machine that wrote the export)."""
    return isinstance(ref, str) and ref.startswith(LOCAL)


def loadable_reference(ref: str | None) -> str | None:
    """A recorded model reference that can be loaded here: a hub id (or the path older exports recorded) as it is,
    None for a ``local:<name>`` record or no record."""
    return None if not ref or is_local_reference(ref) else ref


def portable_text(text: str) -> str:
    """``text`` with every absolute path in it replaced by ``local:<its name>`` (a whole string that is a path, or
    paths inside a sentence such as ``/data/text.txt (12 documents)``)."""
    if (os.path.isabs(text) or text.startswith("~/")) and Path(text).expanduser().exists():
        return portable_reference(text)  # the whole string, spaces and all
    return _EMBEDDED_PATH.sub(_local_name, text)


def _local_name(match: re.Match) -> str:
    path = match.group(0).rstrip(".")  # a path that ends a sentence keeps its full stop
    return portable_reference(path) + match.group(0)[len(path):]


def portable_json(obj: Any) -> Any:
    """A copy of a JSON value (a report) with :func:`portable_text` applied to every string in it."""
    if isinstance(obj, str):
        return portable_text(obj)
    if isinstance(obj, dict):
        return {k: portable_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable_json(v) for v in obj]
    return obj


def settings_digest(fingerprint: dict) -> str:
    """A digest of a run's settings (with their absolute paths), for a report to tell whether a later run has the
    same settings without recording the paths."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


__all__ = ["LOCAL", "is_local_reference", "loadable_reference", "portable_json", "portable_reference",
           "portable_text", "settings_digest"]
