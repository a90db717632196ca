"""HF-native export: safetensors + config.json (+ tokenizer), loadable by ``AutoModelForCausalLM.from_pretrained``.

Two ways to load the result:
- after ``import linearize`` (which registers the ``linearized_*`` model types), plainly;
- with ``trust_remote_code=True`` without importing linearize: ``config.json``'s ``auto_map`` points at a small
  ``modeling_linearize.py`` written next to the weights, which imports the classes from the installed package.

The export is written to a temporary folder beside the destination and renamed into place when complete, so an
interrupted export never looks finished. No pickle: weights are safetensors only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from torch import nn

from linearize.errors import LinearizeError

SHIM_NAME = "modeling_linearize.py"


def is_complete_export(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _shim_source(config_cls: type, model_cls: type) -> str:
    return (
        '"""Loads this linearized checkpoint through the installed `linearize` package '
        '(pip install linearize)."""\n\n'
        f"from {config_cls.__module__} import {config_cls.__name__}\n"
        f"from {model_cls.__module__} import {model_cls.__name__}\n\n"
        f'__all__ = ["{config_cls.__name__}", "{model_cls.__name__}"]\n'
    )


def save_linearized(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (a ``Linearized*`` model) and its tokenizer to ``out_dir`` atomically.

    Raises:
        LinearizeError: ``out_dir`` already holds a complete export and ``overwrite`` is False, or it is a file.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"output path {out} exists and is not a folder; choose another --out")
    if is_complete_export(out) and not overwrite:
        raise LinearizeError(f"{out} already holds a complete export; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        config_cls, model_cls = type(model.config), type(model)
        model.config.auto_map = {
            "AutoConfig": f"{SHIM_NAME[:-3]}.{config_cls.__name__}",
            "AutoModelForCausalLM": f"{SHIM_NAME[:-3]}.{model_cls.__name__}",
        }
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / SHIM_NAME).write_text(_shim_source(config_cls, model_cls))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
