"""The softmax layers a converted model keeps (``softmax_layers``): the teacher's own attention module, with a plain
decode step that reads a static KV buffer, so that a CUDA graph can hold it.

A kept layer's module stays the teacher's object (same class hierarchy, parameters, state-dict keys and prefill
forward); :func:`keep_softmax` only re-classes it (as ``linearize_model`` re-classes the model) to a subclass that
adds :class:`KeptSoftmaxAttention`'s ``forward``. That forward takes the **decode path** when the call is a plain
one-token step against a :class:`~linearize.models.cache.SoftmaxKVLayer`:

- the model says so (``kept_softmax_decode=True``, which ``LinearizedModelMixin.forward`` passes down for a
  one-token call without padding, and the graphed step always: the new token then attends to every cached key,
  whatever 4D mask transformers built), one new token, no autograd, no attention weights asked for, a
  full-causal layer (no sliding window, no logit softcap);
- q, k, v and the output projection as the adapter's linear module computes them (its ``project``, ``rotate``,
  ``output``: the teacher's own projections, norms and RoPE, read through the same attribute names), the
  teacher's ``scaling``;
- the attention is ``SoftmaxKVLayer.decode`` (``kernels/softmax_decode``): the new key and value written in place
  at the device-side position, only the filled slots read.

Every other call (the prompt, a padded batch, eager attention with its explicit mask, training, a layer of
another cache) runs the teacher's forward unchanged; ``SoftmaxKVLayer.update`` then serves it as a
``DynamicLayer`` would. Both paths compute the same softmax attention: the decode path to within rounding of the
teacher's (fp32 scores and softmax in the kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from linearize.models.cache import LinearizedCache, SoftmaxKVLayer
from linearize.models.keywords import find_cache

_KEPT_CLASSES: dict[tuple[type, type], type] = {}


class KeptSoftmaxAttention:
    """Mixed in front of a teacher attention class by :func:`keep_softmax` (module docstring). Class attributes set
    there: ``_kept_project``, ``_kept_rotate``, ``_kept_output``, the adapter module's functions."""

    _kept_project: Callable[..., tuple[Tensor, Tensor, Tensor]]
    _kept_rotate: Callable[..., tuple[Tensor, Tensor]]
    _kept_output: Callable[..., Tensor]
    decode_backend: str = "auto"
    """Kernel backend of the decode step (auto | torch | triton), set by ``set_backend`` with the linear layers'."""

    def decode_layer(self, hidden_states: Tensor, args: tuple, kwargs: dict[str, Any],
                     allowed: bool) -> SoftmaxKVLayer | None:
        """This call's static KV layer when it is a plain decode step (module docstring), else None. ``allowed``:
        the model's word that the new token attends to every cached key (no padding among them)."""
        if not allowed or args or hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            return None
        if torch.is_grad_enabled() or kwargs.get("output_attentions"):
            return None
        if getattr(self, "sliding_window", None) or getattr(self, "attn_logit_softcapping", None):
            return None
        cache = find_cache(kwargs)
        cache = getattr(cache, "self_attention_cache", cache)
        if not isinstance(cache, LinearizedCache) or self.layer_idx >= len(cache.layers):
            return None
        layer = cache.layers[self.layer_idx]
        if not isinstance(layer, SoftmaxKVLayer) or not layer.is_initialized:
            return None
        return layer if layer.pos.shape[0] == hidden_states.shape[0] else None

    def forward(self, hidden_states: Tensor, *args, kept_softmax_decode: bool = False, **kwargs):
        layer = self.decode_layer(hidden_states, args, kwargs, kept_softmax_decode)
        if layer is None:
            return super().forward(hidden_states, *args, **kwargs)
        q, k, v = self._kept_project(hidden_states)  # q [B, H, 1, d], k/v [B, Hk, 1, d], before RoPE
        q, k = self._kept_rotate(q, k, kwargs.get("position_embeddings"))
        o = layer.decode(q, k, v, scale=self.scaling, backend=self.decode_backend)  # (B, H, 1, D)
        return self._kept_output(o), None


def keep_softmax(module: nn.Module, adapter_class: type, config: Any) -> nn.Module:
    """Re-class the teacher attention ``module`` of a kept softmax layer (in place; returns it) so that its plain
    decode steps read a static KV buffer (module docstring). ``adapter_class``: the adapter's linear attention class,
    whose ``project`` / ``rotate`` / ``output`` read the teacher's submodules by their names; ``config``: the model
    config (head counts for adapters that read ``num_heads`` / ``num_kv_heads``). Idempotent."""
    base = type(module)
    if isinstance(module, KeptSoftmaxAttention):
        return module
    key = (base, adapter_class)
    cls = _KEPT_CLASSES.get(key)
    if cls is None:
        cls = type(f"Kept{base.__name__}", (KeptSoftmaxAttention, base), {
            "_kept_project": adapter_class.project, "_kept_rotate": adapter_class.rotate,
            "_kept_output": adapter_class.output, "__module__": __name__})
        _KEPT_CLASSES[key] = cls
    for name, value in (("num_heads", getattr(config, "num_attention_heads", None)),
                        ("num_kv_heads", getattr(config, "num_key_value_heads", None)
                         or getattr(config, "num_attention_heads", None))):
        if not hasattr(module, name) and value is not None:
            setattr(module, name, value)
    module.__class__ = cls
    return module


__all__ = ["KeptSoftmaxAttention", "keep_softmax"]
