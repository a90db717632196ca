"""Linearized model classes, one adapter file per architecture family, registered with the Auto classes.

Every module of this package other than the shared ones (``base``, ``cache``, ``delta``, ``generation``, ``graphs``,
``keywords``, ``remote_code``, ``sliding``, ``softmax``) is an adapter file:
it defines an :class:`~linearize.models.base.Adapter` and ``CLASSES = {base model_type: (config class, model
class)}``, and is found here by itself — a new architecture is one new file.

``import linearize`` registers every ``linearized_<type>`` config/model with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(export_dir)`` works without remote code.
"""

from __future__ import annotations

import importlib
import pkgutil

from transformers import AutoConfig, AutoModelForCausalLM

from linearize.errors import UnsupportedArchitectureError
from linearize.models.base import Adapter, LinearizedModelMixin, split_linearize_dict
from linearize.models.cache import LinearizedCache

_SHARED_MODULES = {"base", "cache", "delta", "generation", "graphs", "keywords", "remote_code", "sliding",
                   "softmax"}


def _discover() -> dict[str, tuple[type, type]]:
    found: dict[str, tuple[type, type]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _SHARED_MODULES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.update(module.CLASSES)
    return found


#: base model_type -> (linearized config class, linearized model class), from every adapter file
ARCHITECTURES: dict[str, tuple[type, type]] = _discover()


def classes_for(model_type: str) -> tuple[type, type]:
    base = model_type.removeprefix("linearized_")
    if base not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[base]


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a base or linearized ``model_type``."""
    return classes_for(model_type)[1].adapter


def register_auto_classes() -> None:
    for config_cls, model_cls in ARCHITECTURES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register_auto_classes()

__all__ = [
    "ARCHITECTURES",
    "Adapter",
    "LinearizedCache",
    "LinearizedModelMixin",
    "adapter_for",
    "classes_for",
    "register_auto_classes",
    "split_linearize_dict",
]
