"""Model surgery: turn a loaded softmax teacher into its linearized class, in place (no weight copies)."""

from __future__ import annotations

from torch import nn

from linearize import __version__
from linearize.models import classes_for
from linearize.modules.attention import LinearAttentionConfig


def linearize_model(
    model: nn.Module,
    cfg: LinearAttentionConfig,
    *,
    teacher: str | None = None,
    prebuilt: dict[int, nn.Module] | None = None,
) -> nn.Module:
    """Swap every attention not listed in ``cfg.softmax_layers`` for a linear one that reuses its q/k/v/o weights,
    and re-class the model as the registered ``Linearized*`` class so it saves and loads as such.

    Args:
        model: a loaded ``*ForCausalLM`` of a supported architecture (modified in place and returned).
        cfg: linearization settings.
        teacher: where the teacher came from (recorded in ``config.linearize``).
        prebuilt: layer index -> already-trained linear attention modules (from attention transfer).

    Raises:
        UnsupportedArchitectureError: the model_type has no adapter (the message lists the supported ones).
    """
    old_config = model.config
    config_cls, model_cls = classes_for(old_config.model_type)
    if isinstance(model, model_cls):
        return model
    d = old_config.to_dict()
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    d["linearize"] = {
        **cfg.to_dict(),
        "teacher": teacher,
        "base_model_type": old_config.model_type,
        "linearize_version": __version__,
    }
    d["architectures"] = [model_cls.__name__]
    new_config = config_cls.from_dict(d)
    new_config._attn_implementation = old_config._attn_implementation
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    model.__class__ = model_cls
    model.config = new_config
    model.swap_attention(prebuilt)
    return model
