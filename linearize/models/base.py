"""What every linearized model class shares: surgery from ``config.linearize``, the constant-size cache, and the
padding mask hand-off to the attention modules.

An adapter (one file per architecture family, e.g. ``models/llama.py``) defines the attention replacement and
pairs a config subclass with a model subclass::

    @strict
    class LinearizedLlamaConfig(LlamaConfig):
        model_type = "linearized_llama"
        linearize: dict | None = None

    class LinearizedLlamaForCausalLM(LinearizedModelMixin, LlamaForCausalLM):
        config_class = LinearizedLlamaConfig
        adapter = LLAMA_ADAPTER
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from linearize.errors import ConfigError
from linearize.models.cache import LinearizedCache
from linearize.modules.attention import LinearAttentionConfig

# Keys of config.linearize that are metadata, not attention settings.
META_KEYS = ("teacher", "linearize_version", "base_model_type")


@dataclass(frozen=True)
class Adapter:
    """Per-architecture knowledge: where the attention modules are and how to replace one."""

    name: str
    base_model_types: tuple[str, ...]
    layers_path: str
    """Dotted path from the *ForCausalLM model to the list of decoder blocks (``model.layers``)."""
    attention_attr: str
    """Attribute of a decoder block holding its attention (``self_attn``)."""
    build: Callable[[nn.Module, LinearAttentionConfig, int], nn.Module]
    """(base attention module, settings, layer index) -> linear attention module reusing its weights."""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj


def split_linearize_dict(d: dict[str, Any] | None) -> tuple[LinearAttentionConfig, dict[str, Any]]:
    d = dict(d or {})
    meta = {k: d.pop(k) for k in META_KEYS if k in d}
    return LinearAttentionConfig.from_dict(d), meta


class LinearizedModelMixin:
    """Mixed in front of a transformers ``*ForCausalLM`` class."""

    adapter: ClassVar[Adapter]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if getattr(config, "linearize", None) is None:
            raise ConfigError(f"{type(self).__name__} needs config.linearize (the linearization settings)")
        self.swap_attention()

    # -- surgery ---------------------------------------------------------------------------------------------
    @property
    def linear_config(self) -> LinearAttentionConfig:
        return split_linearize_dict(self.config.linearize)[0]

    def swap_attention(self, prebuilt: dict[int, nn.Module] | None = None) -> None:
        """Replace each non-softmax layer's attention by its linear version (``prebuilt`` ones where given)."""
        cfg = self.linear_config
        blocks = self.adapter.blocks(self)
        bad = [i for i in cfg.softmax_layers if i >= len(blocks)]
        if bad:
            raise ConfigError(f"softmax_layers {bad} out of range: the model has {len(blocks)} layers (0..{len(blocks) - 1})")
        for i, block in enumerate(blocks):
            if i in cfg.softmax_layers:
                continue
            current = getattr(block, self.adapter.attention_attr)
            if hasattr(current, "linear_attn"):
                continue
            new = prebuilt[i] if prebuilt and i in prebuilt else self.adapter.build(current, cfg, i)
            setattr(block, self.adapter.attention_attr, new)

    def linear_attention_modules(self) -> dict[int, nn.Module]:
        blocks = self.adapter.blocks(self)
        out = {}
        for i, block in enumerate(blocks):
            m = getattr(block, self.adapter.attention_attr)
            if hasattr(m, "linear_attn"):
                out[i] = m
        return out

    # -- cache and forward -----------------------------------------------------------------------------------
    def make_cache(self) -> LinearizedCache:
        cfg = self.linear_config
        n = len(self.adapter.blocks(self))
        return LinearizedCache(cfg.window, n, cfg.softmax_layers)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = self.make_cache()
        if "linear_key_mask" not in kwargs:
            x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            key_mask = self._linear_key_mask(attention_mask, x.shape[1] if x is not None else None,
                                             cached=past_key_values is not None)
            if key_mask is not None:
                kwargs["linear_key_mask"] = key_mask
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
            use_cache=use_cache, **kwargs,
        )

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # Some families (Qwen2) turn the 2D mask into per-layer-type 4D masks here; keep the 2D padding mask for
        # the linear layers before that happens.
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        x = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        # set even when None, so that forward does not decide again
        inputs["linear_key_mask"] = self._linear_key_mask(attention_mask, x.shape[1] if x is not None else None,
                                                          cached=inputs.get("past_key_values") is not None)
        return inputs

    def _linear_key_mask(self, attention_mask, query_len: int | None, cached: bool) -> torch.Tensor | None:
        """The 2D padding mask the linear layers need, or None when it cannot change their output: no padding, or
        (with a cache) none among the keys the new tokens' windows reach, since cached states and rings already
        exclude padded keys. None lets the fused kernels (and the one-launch decode step) run."""
        key_mask = _padding_mask(attention_mask)
        if key_mask is None or not cached or query_len is None:
            return key_mask
        reach = query_len + max(self.linear_config.window - 1, 0)
        if reach < key_mask.shape[1] and bool(key_mask[:, -reach:].all()):
            return None
        return key_mask

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = self.make_cache()
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


def _padding_mask(attention_mask) -> torch.Tensor | None:
    """The 2D key-padding mask (bool, False = padding) when ``attention_mask`` is one and has padding."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        return attention_mask.bool()
    return None


def cache_layer_for(past_key_values, layer_idx: int):
    """This layer's cache entry (unwraps an EncoderDecoderCache), or None."""
    if past_key_values is None:
        return None
    cache = getattr(past_key_values, "self_attention_cache", past_key_values)
    return cache.layers[layer_idx]


__all__ = ["Adapter", "LinearizedModelMixin", "cache_layer_for", "split_linearize_dict", "torch"]
