"""The remote-code shim of a saved linearized checkpoint: ``config.json``'s ``auto_map`` names classes in
``modeling_linearize.py``, a few lines written next to the weights that import them from the installed package, so
``from_pretrained(dir, trust_remote_code=True)`` works without ``import linearize``.

Every linearized config's ``save_pretrained`` calls :func:`write_remote_code` (``LinearizedConfigMixin``), so the
model's ``save_pretrained``, ``push_to_hub`` and a re-save of a loaded checkpoint all keep the two together.
"""

from __future__ import annotations

import os
from pathlib import Path

SHIM_NAME = "modeling_linearize.py"


def auto_map(config_cls: type, model_cls: type) -> dict[str, str]:
    """``config.json``'s ``auto_map``: the Auto classes resolve to the shim's re-exports."""
    module = SHIM_NAME.removesuffix(".py")
    return {"AutoConfig": f"{module}.{config_cls.__name__}", "AutoModelForCausalLM": f"{module}.{model_cls.__name__}"}


def install_hint() -> str:
    """The pip command that installs the linearize this checkpoint was written with: the package by name and
    version, never the folder this copy was installed from (a shared checkpoint must not name a local path)."""
    from linearize import __version__

    return f"pip install linearize=={__version__}"


def _shim_source(config_cls: type, model_cls: type) -> str:
    from linearize import __version__

    names = f"{config_cls.__name__}, {model_cls.__name__}"
    message = (
        f"this checkpoint was linearized with linearize {__version__} and loads through that package, which is not "
        f"installed in this Python environment; install it with: {install_hint()}"
    )
    # The import sits in a try block: transformers' remote-code check skips imports there, so a missing package gives
    # the message above instead of transformers' "Run `pip install linearize`".
    return (
        f'"""Loads this linearized checkpoint through the installed `linearize` package (>= {__version__})."""\n\n'
        "try:\n"
        f"    from {config_cls.__module__} import {names}\n"
        "except ModuleNotFoundError as e:\n"
        '    if not (e.name or "").startswith("linearize"):\n'
        "        raise\n"
        f"    raise ImportError({message!r}) from e\n\n"
        f'__all__ = ["{config_cls.__name__}", "{model_cls.__name__}"]\n'
    )


def write_remote_code(config, save_directory: str | os.PathLike, model_cls: type) -> None:
    """Point ``config.auto_map`` at the shim and write the shim into ``save_directory`` (created if needed);
    ``model_cls`` is the model class of ``config``'s class (``models/base.py`` keeps the pairs)."""
    config_cls = type(config)
    config.auto_map = auto_map(config_cls, model_cls)
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SHIM_NAME).write_text(_shim_source(config_cls, model_cls))


__all__ = ["SHIM_NAME", "auto_map", "install_hint", "write_remote_code"]
