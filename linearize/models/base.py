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

import inspect
import weakref
from dataclasses import dataclass
from functools import cache as _memoize
from typing import Any, Callable, ClassVar, Mapping

import torch
import transformers
from torch import Tensor, nn
from transformers.cache_utils import Cache

from linearize.errors import ConfigError, LinearizeError
from linearize.models import graphs
from linearize.models.cache import LinearizedCache, RecurrentStateLayer
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


# -- how transformers hands the cache around ------------------------------------------------------------------------
#: Every keyword under which transformers has passed the cache to a model, a decoder layer or an attention module:
#: ``cache`` from 5.24 on, ``past_key_values`` before (deprecated in 5.24, removed in 5.40), ``past_key_value`` in 4.x.
#: Code below this module never reads a cache keyword itself: it goes through :func:`pop_cache` / :func:`find_cache`,
#: so that a rename shows up here (and in the error of :meth:`LinearizedAttention.cache_layer`), never as a silently
#: dropped state.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def find_cache(mapping: Mapping[str, Any]) -> Cache | None:
    """The cache in ``mapping`` (keyword arguments, ``prepare_inputs_for_generation``'s dict, a model output) under
    whichever name it is stored, or None.

    Raises:
        LinearizeError: two different caches under two names.
    """
    found = [(k, mapping[k]) for k in CACHE_KWARGS if k in mapping and mapping[k] is not None]
    if len({id(v) for _, v in found}) > 1:
        raise LinearizeError(f"two different caches were passed ({', '.join(k for k, _ in found)}); pass one")
    return found[0][1] if found else None


def pop_cache(kwargs: dict[str, Any]) -> Cache | None:
    """Remove every cache keyword from ``kwargs`` and return the cache (see :func:`find_cache`)."""
    cache = find_cache(kwargs)
    for k in CACHE_KWARGS:
        kwargs.pop(k, None)
    return cache


def output_cache(outputs: Mapping[str, Any]) -> Cache | None:
    """The cache a model returned (``outputs.cache`` from transformers 5.24, ``outputs.past_key_values`` before),
    read without deprecation messages on either: the first name present wins, so on 5.24 the deprecated
    ``past_key_values`` key (which logs a deprecation notice when looked up) is never asked for."""
    for key in CACHE_KWARGS:
        if key in outputs and outputs[key] is not None:
            return outputs[key]
    return None


@_memoize
def cache_kwarg_of(cls: type) -> str:
    """The name under which ``cls.forward`` takes its cache in the installed transformers, read from the signature
    of the first ``forward`` in the MRO that names one (a linearized class takes any name; its transformers base
    class decides)."""
    for klass in cls.__mro__:
        fwd = klass.__dict__.get("forward")
        if fwd is None:
            continue
        params = inspect.signature(fwd).parameters
        for name in CACHE_KWARGS:
            if name in params:
                return name
    raise LinearizeError(
        f"{cls.__name__}.forward in transformers {transformers.__version__} takes its cache under none of "
        f"{CACHE_KWARGS}; this linearize version does not support that transformers version"
    )


class LinearizedAttention(nn.Module):
    """The one forward every adapter's attention module shares: it finds this layer's recurrent cache however
    transformers passed it, computes q/k/v with the adapter's :meth:`qkv`, runs :class:`HybridLinearAttention`
    (``self.linear_attn``) and projects out with the adapter's :meth:`output`.

    An adapter subclasses this and sets ``layer_idx`` and ``linear_attn`` in ``__init__``.
    """

    layer_idx: int
    linear_attn: HybridLinearAttention

    def qkv(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None):
        """hidden [B, T, C] -> q [B, H, T, d], k/v [B, Hk, T, d] exactly as the base attention computes them."""
        raise NotImplementedError

    def output(self, o: Tensor) -> Tensor:
        """o [B, H, T, D] -> [B, T, C] through the base attention's output projection."""
        raise NotImplementedError

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
        if compiled_decode:
            q, k, v = self.qkv(hidden_states, position_embeddings)
            return self.output(graphs.cached_linear_attention(q, k, v, self.layer_idx)), None
        layer = self.cache_layer(pop_cache(kwargs), kwargs.get("use_cache"))
        q, k, v = self.qkv(hidden_states, position_embeddings)
        o = self.linear_attn(q, k, v, key_mask=linear_key_mask, cache_layer=layer)
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
            if isinstance(current, LinearizedAttention):
                continue
            new = prebuilt[i] if prebuilt and i in prebuilt else self.adapter.build(current, cfg, i)
            setattr(block, self.adapter.attention_attr, new)

    def set_backend(self, backend: str) -> None:
        """Kernel backend (auto | torch | triton) of every linear layer."""
        for m in self.linear_attention_modules().values():
            m.linear_attn.set_backend(backend)

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
        return LinearizedCache(cfg.window, n, cfg.softmax_layers, sinks=cfg.sinks)

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, logits_to_keep=0, **kwargs):
        # The cache arrives as ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (before); either works on
        # every supported version, and it is handed on under the name the installed transformers expects.
        # ``logits_to_keep`` is named in the signature because generate() looks for it there: with it, prefill
        # computes the last position's logits only, not [B, T, vocab] (GBs at long prompts and large batches).
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
        chunk = self._prefill_chunk(input_ids, kwargs, attention_mask, cache if use_cache else None, logits_to_keep)
        if chunk:
            return self._chunked_prefill(chunk, input_ids, attention_mask, cache, logits_to_keep, kwargs)
        if (use_cache and graphs.graphs_enabled(self) and not self.training and self._plain_decode_call(kwargs)
                and graphs.graph_ready(cache, input_ids, kwargs.get("linear_key_mask"))):
            return self._graphed_decode_step(input_ids, cache, kwargs)
        kwargs[cache_kwarg_of(type(self))] = cache
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)

    _GRAPH_KWARGS = frozenset({"position_ids", "cache_position", "linear_key_mask", "return_dict"})

    @staticmethod
    def _plain_decode_call(kwargs: dict[str, Any], allowed: frozenset[str] = _GRAPH_KWARGS) -> bool:
        """No input but ``allowed`` ones (default: what the captured step takes; no embeddings, output_attentions,
        labels, ...)."""
        return all(k in allowed or v is None or v is False for k, v in kwargs.items())

    def _prefill_chunk(self, input_ids, kwargs: dict[str, Any], attention_mask, cache, logits_to_keep) -> int:
        """Positions per chunk for this call (0 = one pass): a cached call over more tokens than
        ``prefill_chunk_tokens`` whose wanted logits fit in the last chunk, with a 2D mask (or none) and nothing
        the chunks would have to stitch together (hidden states, attentions, labels)."""
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        budget = int(self.prefill_chunk_tokens or 0)
        if cache is None or x is None or budget <= 0 or x.shape[0] * x.shape[1] <= budget:
            return 0
        if not (isinstance(logits_to_keep, int) and logits_to_keep >= 1) or self.training:
            return 0
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            return 0
        if not self._plain_decode_call(kwargs, self._GRAPH_KWARGS | {"inputs_embeds", "use_cache"}):
            return 0
        chunk = max(budget // x.shape[0], logits_to_keep, 1)
        return chunk if chunk < x.shape[1] else 0

    def _chunked_prefill(self, chunk: int, input_ids, attention_mask, cache, logits_to_keep: int,
                         kwargs: dict[str, Any]):
        """The forward as consecutive chunks of ``chunk`` positions through ``cache`` (the first chunk the shortest,
        so the last holds the ``logits_to_keep`` positions returned). Each chunk sees the mask up to its end and
        its slice of positions, as a prompt fed in pieces would."""
        x = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        T = x.shape[1]
        past = cache.get_seq_length()
        ends = list(range(T, 0, -chunk))[::-1]
        cache_key = cache_kwarg_of(type(self))
        out = None
        for start, end in zip([0] + ends[:-1], ends):
            kw = {k: v for k, v in kwargs.items() if k != "linear_key_mask"}
            if kw.get("inputs_embeds") is not None:
                kw["inputs_embeds"] = kw["inputs_embeds"][:, start:end]
            if kw.get("position_ids") is not None:
                kw["position_ids"] = kw["position_ids"][..., start:end]
            if kw.get("cache_position") is not None:
                kw["cache_position"] = kw["cache_position"][start:end]
            mask = None if attention_mask is None else attention_mask[:, : past + end]
            kw["linear_key_mask"] = self._linear_key_mask(mask, end - start, cached=True)
            kw[cache_key] = cache
            out = self.forward(input_ids=None if input_ids is None else input_ids[:, start:end], attention_mask=mask,
                               use_cache=True, logits_to_keep=logits_to_keep if end == T else 1, **kw)
        return out

    def _graphed_decode_step(self, input_ids: torch.Tensor, cache: LinearizedCache, kwargs: dict[str, Any],
                             *, capture: bool = True):
        """The decode step through a CUDA graph of the whole one-token forward (``models/graphs.py``); the logits
        are the eager step's (same kernels, same order; with ``compile_decode``, inductor's fused kernels around
        the same attention ops: equal to rounding)."""
        n = cache.get_seq_length()
        B = input_ids.shape[0]
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            cache_position = torch.full((1,), n, dtype=torch.long, device=input_ids.device)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = cache_position.view(1, -1).expand(B, -1)
        cache_key = cache_kwarg_of(type(self))
        forward = super().forward
        cache_ref = weakref.ref(cache)  # the step is kept by the cache's graph: a strong reference would be a cycle
        compiled = self._compiled_decode() if graphs.compile_enabled(self) else None

        def step(ids, pos, cpos):
            step_cache = cache_ref()
            if compiled is not None:
                layers = {i: (m.linear_attn, step_cache.layers[i]) for i, m in self.linear_attention_modules().items()}
                logits = compiled(self, layers, ids, pos, cpos)
                if logits is not None:
                    return logits
            out = forward(input_ids=ids, position_ids=pos, cache_position=cpos, use_cache=True, logits_to_keep=1,
                          linear_key_mask=None, **{cache_key: step_cache})
            return out.logits

        state = graphs.decoding_state(cache, self)
        logits = state.run(cache, input_ids, position_ids.to(torch.long).contiguous(),
                           cache_position.to(torch.long).contiguous(), step, capture=capture)
        graphs.note_failure(self, state)
        return _causal_lm_output(logits, cache)

    def _compiled_decode(self) -> graphs.CompiledDecode:
        """This model's compiled decode forward (made on first use and kept: it holds neither the model nor a cache,
        so every cache and ``generate()`` call reuses its compilations)."""
        compiled = self.__dict__.get("_compiled_decode_step")
        if compiled is None:
            compiled = self.__dict__["_compiled_decode_step"] = graphs.CompiledDecode(_compiled_decode_forward)
        return compiled

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


def _compiled_decode_forward(model: LinearizedModelMixin, input_ids: Tensor, position_ids: Tensor,
                             cache_position: Tensor) -> Tensor:
    """The one-token forward ``torch.compile`` traces (``models/graphs.py``): the transformers class's forward with
    no cache (nothing traced reads the token count, which changes every step) and every linear attention as
    ``graphs.cached_linear_attention``; returns the logits [B, 1, V]."""
    out = super(LinearizedModelMixin, model).forward(input_ids=input_ids, position_ids=position_ids,
                                                     cache_position=cache_position, use_cache=False, logits_to_keep=1,
                                                     compiled_decode=True)
    return out.logits


def _causal_lm_output(logits: torch.Tensor, cache: Cache):
    """A ``CausalLMOutputWithPast`` carrying ``cache`` under the name the installed transformers uses."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return CausalLMOutputWithPast(logits=logits, **{"cache" if "cache" in names else "past_key_values": cache})


def _padding_mask(attention_mask) -> torch.Tensor | None:
    """The 2D key-padding mask (bool, False = padding) when ``attention_mask`` is one and has padding."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        return attention_mask.bool()
    return None


__all__ = [
    "CACHE_KWARGS", "Adapter", "LinearizedAttention", "LinearizedConfigMixin", "LinearizedModelMixin", "cache_kwarg_of", "find_cache",
    "output_cache", "pop_cache", "split_linearize_dict",
]
