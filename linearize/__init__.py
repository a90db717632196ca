"""linearize: turn pretrained Hugging Face transformers into linear-attention models.

Importing the package registers the linearized architectures with transformers' Auto classes (as soon as
transformers' Auto classes load; see ``linearize._autoregister``), so ``AutoModelForCausalLM.from_pretrained(export)``
works after ``import linearize``. The import itself stays light: submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from linearize import _autoregister

__version__ = "0.1.0"

if TYPE_CHECKING:
    from linearize import models
    from linearize.errors import LinearizeError
    from linearize.modules.attention import LinearAttentionConfig

_LAZY = {"LinearizeError": "linearize.errors", "LinearAttentionConfig": "linearize.modules.attention"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "models":
        return importlib.import_module("linearize.models")
    raise AttributeError(f"module 'linearize' has no attribute {name!r}")


_autoregister.install()

__all__ = ["LinearAttentionConfig", "LinearizeError", "__version__", "models"]
