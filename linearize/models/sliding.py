"""Teachers whose config marks sliding-window (local) layers: which layers those are, which of them ``layers: global``
keeps, their cache, and what the cache costs.

A layer is **local** when the teacher runs it with a sliding window: ``config.layer_types[i] == "sliding_attention"``
(Gemma 2/3, Qwen2/3 with ``use_sliding_window``), or, without ``layer_types``, every layer of a config that sets
``sliding_window`` (Mistral 7B v0.1, Phi-3-mini-4k); every other layer is **global**.

``layers`` (``ConvertConfig.layers``): ``all`` converts every layer; ``global`` converts only the global ones and
keeps each local layer's own attention module, unchanged (it is listed in the export's ``softmax_layers``). Default:
``global`` where the teacher has both kinds, ``all`` otherwise. A local layer that keeps softmax attention gets
transformers' ``DynamicSlidingWindowLayer`` in the linearized cache (:func:`keep_local_windows`): the last
``sliding_window - 1`` keys and values, what the teacher's own cache keeps, so the model's masks, outputs and
cache are the teacher's there and the cache stops growing once the window is full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from linearize.errors import ConfigError
from linearize.models.cache import CacheGeometry, LinearizedCache, SoftmaxKVLayer
from linearize.modules.config import LinearAttentionConfig


def _get(config: Any, key: str) -> Any:
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def sliding_window(config: Any) -> int | None:
    """The teacher's local window in tokens (the query included), or None (a config object or config.json's dict
    as transformers 5 writes it: Qwen's ``use_sliding_window: false`` has already cleared ``sliding_window``)."""
    w = _get(config, "sliding_window")
    return int(w) if w else None


def layer_kinds(config: Any) -> list[str]:
    """``"local"`` or ``"global"`` for every decoder layer of ``config`` (module docstring)."""
    n = _get(config, "num_hidden_layers") or _get(config, "n_layer")
    window = sliding_window(config)
    types = _get(config, "layer_types")
    if types:
        return ["local" if t == "sliding_attention" and window else "global" for t in types]
    return ["local" if window else "global"] * int(n)


def local_layers(config: Any) -> list[int]:
    return [i for i, kind in enumerate(layer_kinds(config)) if kind == "local"]


def kept_local_layers(layers: str | None, config: Any, *, seq_len: int | None = None) -> list[int]:
    """The local layers that ``layers`` (``all`` | ``global`` | None = the model's default) keeps with their own
    attention; [] when every layer is converted.

    Raises:
        ConfigError: ``global`` on a model without local layers or without global ones (nothing would be
            converted); ``all`` with local layers and ``seq_len`` beyond their window (attention transfer's teacher
            runs full causal softmax on each trained layer's q, k, v, which a local layer does not compute past its
            window).
    """
    kinds = layer_kinds(config)
    local = [i for i, kind in enumerate(kinds) if kind == "local"]
    if layers is None:
        layers = "global" if local and len(local) < len(kinds) else "all"
    if layers == "global":
        if not local:
            raise ConfigError("--layers global keeps the teacher's sliding-window (local) layers, and this model has "
                              "none (every layer attends to the whole context): use --layers all")
        if len(local) == len(kinds):
            raise ConfigError(f"--layers global converts only the global layers, and every layer of this model is "
                              f"local (sliding_window {sliding_window(config)} on all {len(kinds)}): nothing would be "
                              "converted; use --layers all")
        return local
    window = sliding_window(config)
    if local and seq_len is not None and seq_len > window:
        raise ConfigError(f"--layers all converts the local layers {_span(local)} too, and attention transfer's "
                          f"teacher for them (full causal softmax) equals their sliding window of {window} tokens only "
                          f"up to that length: use --seq-len {window} or less, or --layers global")
    return []


def _span(layers: list[int]) -> str:
    return str(layers) if len(layers) <= 8 else f"[{', '.join(map(str, layers[:6]))}, ... {layers[-1]}]"


def keep_local_windows(cache: LinearizedCache, config: Any, softmax_layers: list[int] | tuple[int, ...]) -> None:
    """Give every softmax layer of ``cache`` that the teacher runs with a sliding window transformers'
    ``DynamicSlidingWindowLayer`` in place of a growing one (``SoftmaxKVLayer``; what ``DynamicCache(config=...)``
    gives the teacher)."""
    window = sliding_window(config)
    if window is None:
        return
    kinds = layer_kinds(config)
    for i in softmax_layers:
        if i < len(cache.layers) and kinds[i] == "local" and type(cache.layers[i]) in (DynamicLayer, SoftmaxKVLayer):
            cache.layers[i] = DynamicSlidingWindowLayer(sliding_window=window)


@dataclass(frozen=True)
class SlidingCacheGeometry(CacheGeometry):
    """:class:`CacheGeometry` where some softmax layers are local: each keeps at most ``local_window - 1`` tokens
    (the teacher's local layers do the same in the teacher's own cache). Its ``n_softmax`` arguments count every
    softmax layer, local ones included."""

    local_layers: int = 0
    """Softmax layers of the linearized model that the teacher runs with a sliding window."""
    teacher_local_layers: int = 0
    """The teacher's local layers."""
    local_window: int = 0

    def local_layer_bytes(self, context: int) -> int:
        """One local layer's KV cache at ``context`` tokens: the last ``local_window - 1`` at most."""
        return self.softmax_layer_bytes(min(context, max(self.local_window - 1, 0)))

    def bytes_per_sequence(self, n_softmax: int, context: int) -> int:
        linear = sum(self.linear_parts(self.n_layers - n_softmax))
        return (linear + (n_softmax - self.local_layers) * self.softmax_layer_bytes(context)
                + self.local_layers * self.local_layer_bytes(context))

    def teacher_bytes(self, context: int) -> int:
        return ((self.n_layers - self.teacher_local_layers) * self.softmax_layer_bytes(context)
                + self.teacher_local_layers * self.local_layer_bytes(context))


def cache_geometry(c: dict[str, Any], lin: LinearAttentionConfig, dtype_bytes: int) -> CacheGeometry:
    """:meth:`CacheGeometry.from_config`, as a :class:`SlidingCacheGeometry` where the teacher has local layers."""
    g = CacheGeometry.from_config(c, lin, dtype_bytes)
    local = local_layers(c)
    if not local:
        return g
    kept = [i for i in lin.softmax_layers if i in set(local)]
    fields = {name: getattr(g, name) for name in CacheGeometry.__dataclass_fields__}
    return SlidingCacheGeometry(**fields, local_layers=len(kept), teacher_local_layers=len(local),
                                local_window=sliding_window(c))


__all__ = ["SlidingCacheGeometry", "cache_geometry", "keep_local_windows", "kept_local_layers", "layer_kinds",
           "local_layers", "sliding_window"]
