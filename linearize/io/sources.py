"""Where a model or data comes from: a local path, or a hub id / dataset name, and how the model loads.

Kept free of torch and transformers: the CLI builds its flags from :class:`ModelSpec` before loading anything.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal

from pydantic import model_validator

from linearize.settings import Settings

#: file endings that make a string a path even without a slash
PATH_SUFFIXES = (".gguf", ".txt", ".jsonl", ".json", ".parquet", ".xz", ".gz", ".raw", ".yaml", ".yml")


def looks_like_path(text: str) -> bool:
    """True for ``./x``, ``../x``, ``/x``, ``~/x``, Windows-style paths, ``a/b/c`` (hub ids and dataset names have
    at most one slash) and names ending in a file suffix: one rule for models and data, used to say "does not
    exist" instead of trying the hub."""
    return (text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or "\\" in text or text.count("/") > 1
            or text.lower().endswith(PATH_SUFFIXES))


def data_sources(data: Any) -> list[Any]:
    """A data setting (one source, a list of them to mix, or None) as its list of sources."""
    return [] if data is None else [data] if isinstance(data, (str, PurePath)) else list(data)


def data_name(data: Any) -> str | None:
    """How logs and reports name a data setting: the source, or the mixture's sources joined by " + "."""
    return " + ".join(map(str, data_sources(data))) or None


class ModelSpec(Settings):
    """The starting checkpoint and how it is loaded. A bare string is accepted as ``source``."""

    source: str
    """Hub id, local folder, or .gguf file. A softmax teacher is converted first; a folder holding a linearized
    export (config.json with a ``linearize`` section) is finetuned directly."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype: auto = bfloat16 on CUDA, float32 on CPU."""
    device: str | None = None
    """cpu | cuda | cuda:N (default: cuda when available; under ``accelerate launch`` one GPU per process)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v



__all__ = ["PATH_SUFFIXES", "ModelSpec", "data_name", "data_sources", "looks_like_path"]
