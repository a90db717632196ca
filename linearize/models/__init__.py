"""Linearized model classes, one adapter file per architecture family, registered with the Auto classes.

``import linearize`` registers every ``linearized_<type>`` config/model with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(export_dir)`` works without remote code.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from linearize.errors import UnsupportedArchitectureError
from linearize.models import gpt2, llama
from linearize.models.base import Adapter, LinearizedModelMixin, split_linearize_dict
from linearize.models.cache import LinearizedCache

#: base model_type -> (linearized config class, linearized model class)
ARCHITECTURES: dict[str, tuple[type, type]] = {**llama.CLASSES, **gpt2.CLASSES}


def classes_for(model_type: str) -> tuple[type, type]:
    base = model_type.removeprefix("linearized_")
    if base not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[base]


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
    "classes_for",
    "register_auto_classes",
    "split_linearize_dict",
]
