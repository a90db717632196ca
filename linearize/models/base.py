"""What every linearized model class shares: surgery from ``config.linearize``, the constant-size cache, the
padding mask hand-off to the attention modules, the one attention forward (:class:`LinearizedAttention`) that
receives the cache however transformers passes it, and saving with the remote-code shim.

An adapter (one file per architecture family, e.g. ``models/llama.py``) defines the attention replacement and
pairs a config subclass with a model subclass::

    @strict
    class LinearizedLlamaConfig(LinearizedConfigMixin, LlamaConfig):
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
import transformers
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from linearize.errors import ConfigError, LinearizeError
from linearize.models import generation, graphs
from linearize.models.cache import LinearizedCache, RecurrentStateLayer
# how transformers hands the cache around (re-exported for the callers that import these from base)
from linearize.models.keywords import CACHE_KWARGS, cache_kwarg_of, find_cache, output_cache, pop_cache
from linearize.models.sliding import keep_local_windows
from linearize.models.softmax import KeptSoftmaxAttention, keep_softmax
from linearize.modules.attention import HybridLinearAttention, LinearAttentionConfig

# Keys of config.linearize that are metadata, not attention settings.
META_KEYS = ("teacher", "linearize_version", "base_model_type", "delta_base")


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
    lora_targets: tuple[str, ...]
    """Default LoRA target module names (suffixes of full module names): the attention projections."""
    fan_in_fan_out: bool = False
    """The projections are transformers' ``Conv1D`` ([in, out] weights, GPT-2); peft must be told."""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj


class LinearizedAttention(nn.Module):
    """The one forward every adapter's attention module shares: it finds this layer's recurrent cache however
    transformers passed it, computes q/k/v with the adapter's :meth:`qkv`, runs :class:`HybridLinearAttention`
    (``self.linear_attn``) and projects out with the adapter's :meth:`output`.

    An adapter subclasses this and sets ``layer_idx`` and ``linear_attn`` in ``__init__`` (:meth:`adopt` does it for
    the Llama-like layouts).
    """

    layer_idx: int
    linear_attn: HybridLinearAttention

    def adopt(self, base: nn.Module, cfg: LinearAttentionConfig, layer_idx: int) -> None:
        """Take a Llama-like base attention's geometry (``base.config``'s head counts, ``base.head_dim``,
        ``base.scaling``) and build ``linear_attn`` on its device; the adapter keeps its projections itself."""
        config = base.config
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = base.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.linear_attn = HybridLinearAttention(cfg, self.num_heads, self.num_kv_heads, self.head_dim, base.scaling)
        self.linear_attn.to(device=next(base.parameters()).device)

    def project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden [B, T, C] -> q [B, H, T, d], k/v [B, Hk, T, d] as the base attention computes them, before RoPE."""
        raise NotImplementedError

    def rotate(self, q: Tensor, k: Tensor, position_embeddings: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """RoPE as the base attention applies it: Llama's ``rotate_half`` form with ``position_embeddings = (cos,
        sin)`` (partial rotary from the width of ``cos``, as Phi-3's); a family without RoPE overrides this."""
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(q, k, cos, sin)

    def qkv(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None):
        """hidden [B, T, C] -> q [B, H, T, d], k/v [B, Hk, T, d] exactly as the base attention computes them."""
        q, k, v = self.project(hidden_states)
        return (*self.rotate(q, k, position_embeddings), v)

    def _qkv_phi(self, hidden_states: Tensor, position_embeddings) -> tuple[Tensor, Tensor, Tensor, tuple | None]:
        """q, k, v (RoPE applied) and what the feature maps read instead of q, k: the unrotated pair when
        ``feature_input`` is unrotated, else None."""
        q0, k0, v = self.project(hidden_states)
        q, k = self.rotate(q0, k0, position_embeddings)
        return q, k, v, ((q0, k0) if self.linear_attn.feature_input == "unrotated" else None)

    def output(self, o: Tensor) -> Tensor:
        """o [B, H, T, D] -> [B, T, C] through the base attention's output projection: ``self.o_proj`` here (the
        Llama layout, shared by most families); an adapter whose projection differs overrides this."""
        B, H, T, d = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))

    def cache_layer(self, cache: Cache | None, use_cache: bool | None) -> RecurrentStateLayer | None:
        """This layer's entry of a :class:`LinearizedCache` (unwrapping an ``EncoderDecoderCache``), or None.

        Raises:
            LinearizeError: ``use_cache`` is set but no cache arrived (transformers passed it under a name this
                version does not know), or the cache is not a linearized one.
        """
        if cache is None:
            if use_cache:
                raise LinearizeError(
                    f"layer {self.layer_idx} was called with use_cache=True but received no cache under any of "
                    f"{CACHE_KWARGS}: transformers {transformers.__version__} passes it some other way, which this "
                    "linearize version does not support (the recurrent state would be lost)"
                )
            return None
        cache = getattr(cache, "self_attention_cache", cache)
        layer = cache.layers[self.layer_idx] if self.layer_idx < len(getattr(cache, "layers", ())) else None
        if not isinstance(layer, RecurrentStateLayer):
            raise LinearizeError(
                f"layer {self.layer_idx} is linearized and needs a recurrent cache, got {type(cache).__name__}: "
                "let the model make one (use_cache=True, no cache passed) or pass model.make_cache()"
            )
        return layer

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        linear_key_mask: Tensor | None = None,
        *,
        compiled_decode: bool = False,
        **kwargs,
    ) -> tuple[Tensor, None]:
        # attention_mask (4D, softmax-only), position_ids, cache_position, ... are not needed: positions are in
        # position_embeddings (RoPE) or the embeddings (GPT-2), padding in linear_key_mask. ``compiled_decode``: the
        # compiled decode step's forward, which passes no cache; the attention against the cache is then the opaque
        # op that finds this layer's cache in the running step (models/graphs.py).
        q, k, v, phi_in = self._qkv_phi(hidden_states, position_embeddings)
        if compiled_decode:
            return self.output(graphs.cached_linear_attention(q, k, v, self.layer_idx, *(phi_in or ()))), None
        layer = self.cache_layer(pop_cache(kwargs), kwargs.get("use_cache"))
        o = self.linear_attn(q, k, v, key_mask=linear_key_mask, cache_layer=layer, phi_in=phi_in)
        return self.output(o), None


class LinearizedConfigMixin:
    """Mixed in front of a transformers config class: ``save_pretrained`` also writes the remote-code shim that
    ``auto_map`` names (so every saved folder loads with ``trust_remote_code=True``, re-saves included)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        from linearize.models.remote_code import write_remote_code

        # before the save: push_to_hub uploads at its end
        write_remote_code(self, save_directory, MODEL_CLASS_OF[type(self)])
        return super().save_pretrained(save_directory, *args, **kwargs)


MODEL_CLASS_OF: dict[type, type] = {}
"""Each linearized config class -> its model class, filled as each family's model class is defined."""


def split_linearize_dict(d: dict[str, Any] | None) -> tuple[LinearAttentionConfig, dict[str, Any]]:
    d = dict(d or {})
    meta = {k: d.pop(k) for k in META_KEYS if k in d}
    return LinearAttentionConfig.from_dict(d), meta


class LinearizedModelMixin:
    """Mixed in front of a transformers ``*ForCausalLM`` class."""

    adapter: ClassVar[Adapter]
    cuda_graphs: bool = True
    """Decode steps on CUDA replay one captured graph of the whole forward where they can (``models/graphs.py``)."""
    compile_decode: bool = False
    """The graphed decode step (where ``cuda_graphs`` applies) runs a ``torch.compile``d forward, so that inductor
    fuses the elementwise ops between the layers' attention ops (norms, RoPE, residual adds, the MLP's activation),
    while each linear attention against the cache stays our own eager op (``models/graphs.py``). Compiles once per
    batch size (the first decode step of that size); a failed compilation falls back to the uncompiled step with
    one warning. Off by default (a compilation per new batch size); on an H200 it takes SmolLM2-135M's batch-1 step
    from 3.52 to 1.91 ms. ``LINEARIZE_COMPILE_DECODE=1`` / ``0`` overrides."""
    prefill_chunk_tokens: int = 1 << 16
    """A cached forward over more than this many tokens (batch x new positions) runs as consecutive chunks of
    positions through the cache, so its activations are one chunk's, not the whole prompt's; 0 = never chunk. Only
    calls that want at most the last chunk's logits (``logits_to_keep`` >= 1, as generate() prefills) are chunked."""
    global_prefill_chunk: int = 4096
    """With a global cache (``global_cache > 0``), a cached forward over more than this many new positions also runs
    in chunks of at most this many: its PyTorch path scores every query of a call against every key of it
    (``kernels/hybrid/global_cache.py``), so chunks keep a long prompt's prefill linear in its length (the same
    result as one pass); 0 = only ``prefill_chunk_tokens`` applies."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            MODEL_CLASS_OF[cls.config_class] = cls

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if getattr(config, "linearize", None) is None:
            raise ConfigError(f"{type(self).__name__} needs config.linearize (the linearization settings)")
        self.swap_attention()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``; a delta export (``models/delta.py``) is rebuilt from its base model."""
        from linearize.models.delta import is_delta_export, load_delta

        if not args and is_delta_export(pretrained_model_name_or_path):
            return load_delta(cls, pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # -- surgery ---------------------------------------------------------------------------------------------
    @property
    def linear_config(self) -> LinearAttentionConfig:
        """The attention settings of ``config.linearize``, parsed once per distinct dict (not on every forward)."""
        raw = self.config.linearize
        cached = self.__dict__.get("_linear_config_cache")
        if cached is None or cached[0] is not raw:
            cached = (raw, split_linearize_dict(raw)[0])
            self.__dict__["_linear_config_cache"] = cached
        return cached[1]

    def swap_attention(self, prebuilt: dict[int, nn.Module] | None = None) -> None:
        """Replace each non-softmax layer's attention by its linear version (``prebuilt`` ones where given); a kept
        softmax layer's module stays the teacher's, re-classed for its decode step (:func:`~linearize.models.softmax.keep_softmax`)."""
        cfg = self.linear_config
        blocks = self.adapter.blocks(self)
        for name in ("softmax_layers", "window_only_layers"):
            bad = [i for i in getattr(cfg, name) if i >= len(blocks)]
            if bad:
                raise ConfigError(f"{name} {bad} out of range: the model has {len(blocks)} layers "
                                  f"(0..{len(blocks) - 1})")
        for i, block in enumerate(blocks):
            current = getattr(block, self.adapter.attention_attr)
            if i in cfg.softmax_layers:
                # the teacher's module stays; its plain decode steps read a static KV buffer (models/softmax.py)
                keep_softmax(current, self.adapter.build, self.config)
                continue
            if not isinstance(current, LinearizedAttention):
                current = prebuilt[i] if prebuilt and i in prebuilt else self.adapter.build(current, cfg, i)
                setattr(block, self.adapter.attention_attr, current)
            current.linear_attn.linear_off = i in cfg.window_only_layers  # its exact part alone

    def set_backend(self, backend: str) -> None:
        """Kernel backend (auto | torch | triton) of every linear layer and of the kept softmax layers' decode step."""
        for m in self.linear_attention_modules().values():
            m.linear_attn.set_backend(backend)
        for block in self.adapter.blocks(self):  # the kept softmax layers' decode step
            m = getattr(block, self.adapter.attention_attr)
            if isinstance(m, KeptSoftmaxAttention):
                m.decode_backend = backend

    def linear_attention_modules(self) -> dict[int, "LinearizedAttention"]:
        blocks = self.adapter.blocks(self)
        out = {}
        for i, block in enumerate(blocks):
            m = getattr(block, self.adapter.attention_attr)
            if isinstance(m, LinearizedAttention):
                out[i] = m
        return out

    # -- cache and forward -----------------------------------------------------------------------------------
    def make_cache(self) -> LinearizedCache:
        cfg = self.linear_config
        n = len(self.adapter.blocks(self))
        exact_only = [i for i, m in self.linear_attention_modules().items() if m.linear_attn.exact_only]
        cache = LinearizedCache(cfg.window, n, cfg.softmax_layers, sinks=cfg.sinks, global_cache=cfg.global_cache,
                                window_only_layers=exact_only)  # no state where the linear part is off
        keep_local_windows(cache, self.config, cfg.softmax_layers)  # softmax layers the teacher runs sliding
        return cache

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0,
                **kwargs):
        # The cache arrives as ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (before); either works on
        # every supported version, and it is handed on under the name the installed transformers expects.
        # ``logits_to_keep`` is named in the signature because generate() looks for it there: with it, prefill
        # computes the last position's logits only, not [B, T, vocab] (GBs at long prompts and large batches).
        # ``position_ids`` is named for the same reason: generate() makes them from the attention mask only for a
        # forward that names them, and without them a left-padded row's RoPE positions would count its padding (the
        # teacher's would not; the feature maps read RoPE'd keys, so the row's output would change).
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        cache = self._recurrent_cache(pop_cache(kwargs))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.make_cache()
        if "linear_key_mask" not in kwargs:
            x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            key_mask = self._linear_key_mask(attention_mask, x.shape[1] if x is not None else None,
                                             cached=cache is not None)
            if key_mask is not None:
                kwargs["linear_key_mask"] = key_mask
        if "kept_softmax_decode" not in kwargs and self.linear_config.softmax_layers:
            x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            kwargs["kept_softmax_decode"] = self._kept_softmax_step(x, attention_mask)
        chunk = generation.prefill_chunk(self, input_ids, kwargs, attention_mask, cache if use_cache else None,
                                         logits_to_keep)
        if chunk:
            return generation.chunked_prefill(self, chunk, input_ids, attention_mask, cache, logits_to_keep, kwargs)
        if (use_cache and graphs.graphs_enabled(self) and not self.training and self._plain_decode_call(kwargs)
                and graphs.graph_ready(cache, input_ids, kwargs.get("linear_key_mask"),
                                       kept_softmax=kwargs.get("kept_softmax_decode", False))):
            return self._graphed_decode_step(input_ids, cache, kwargs)
        kwargs[cache_kwarg_of(type(self))] = cache
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)

    def _kept_softmax_step(self, x: Tensor | None, attention_mask) -> bool:
        """Whether the kept softmax layers take their static decode step in this call (``models/softmax.py``): one new
        token, no padding (they would need the mask), and every kept layer's module re-classed for it. Decided once
        per call; the graph (``graphs.graph_ready``) follows the same decision."""
        return (x is not None and x.shape[1] == 1 and (
            attention_mask is None or (isinstance(attention_mask, Tensor) and attention_mask.dim() == 2
                                       and _padding_mask(attention_mask) is None)) and self._kept_softmax_ready())

    def _kept_softmax_ready(self) -> bool:
        """Every kept softmax layer's module takes the static decode path (``models/softmax.py``): the condition
        for a graph of a step through them."""
        blocks = self.adapter.blocks(self)
        return all(isinstance(getattr(blocks[i], self.adapter.attention_attr), KeptSoftmaxAttention)
                   for i in self.linear_config.softmax_layers if i < len(blocks))

    def _base_forward(self, **kwargs):
        """The transformers class's own forward (what every call not routed to ``generation.py`` runs)."""
        return super().forward(**kwargs)

    _plain_decode_call = staticmethod(generation.plain_decode_call)

    def _graphed_decode_step(self, input_ids: Tensor, cache: LinearizedCache, kwargs: dict[str, Any], *,
                             capture: bool = True):
        """One decode step through the CUDA graph (:func:`~linearize.models.generation.graphed_decode_step`)."""
        return generation.graphed_decode_step(self, input_ids, cache, kwargs, capture=capture)

    def _compiled_decode(self) -> graphs.CompiledDecode:
        """This model's compiled decode forward (:func:`~linearize.models.generation.compiled_decode`)."""
        return generation.compiled_decode(self)

    def _recurrent_cache(self, cache: Cache | None) -> Cache | None:
        """``cache`` if it is a linearized one; a fresh one in place of an empty cache of another kind (``generate``
        makes a ``DynamicCache`` before the first step; the model's output then carries the recurrent one on).

        Raises:
            LinearizeError: a non-empty cache of another kind (its keys and values cannot become a state).
        """
        if cache is None or isinstance(getattr(cache, "self_attention_cache", cache), LinearizedCache):
            return cache
        if cache.get_seq_length() == 0:
            return self.make_cache()
        raise LinearizeError(
            f"a linearized model needs its own recurrent cache, got a filled {type(cache).__name__}: pass no cache "
            "(one is made) or model.make_cache()"
        )

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # Some families (Qwen2) turn the 2D mask into per-layer-type 4D masks here; keep the 2D padding mask for
        # the linear layers before that happens.
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        x = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        # set even when None, so that forward does not decide again
        inputs["linear_key_mask"] = self._linear_key_mask(attention_mask, x.shape[1] if x is not None else None,
                                                          cached=find_cache(inputs) is not None)
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


def _padding_mask(attention_mask) -> torch.Tensor | None:
    """The 2D key-padding mask (bool, False = padding) when ``attention_mask`` is one and has padding."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        return attention_mask.bool()
    return None


__all__ = [
    "CACHE_KWARGS", "Adapter", "LinearizedAttention", "LinearizedConfigMixin", "LinearizedModelMixin", "cache_kwarg_of", "find_cache",
    "output_cache", "pop_cache", "split_linearize_dict",
]
