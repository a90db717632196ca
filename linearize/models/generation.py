"""How a linearized model generates, apart from its plain forward: long prompts prefilled in chunks of positions,
and decode steps through a CUDA graph of the whole one-token forward (``graphs.py``), optionally ``torch.compile``d.

:class:`~linearize.models.base.LinearizedModelMixin`'s ``forward`` only routes a call here (an adapter author needs
none of it): :func:`prefill_chunk` says whether a call is chunked, :func:`chunked_prefill` runs it,
:func:`graphed_decode_step` runs a plain decode step through the graph; every other call is the transformers
class's own forward (``model._base_forward``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from linearize.models import graphs
from linearize.models.cache import LinearizedCache, RecurrentStateLayer
from linearize.models.keywords import cache_kwarg_of


GRAPH_KWARGS = frozenset({"position_ids", "cache_position", "linear_key_mask", "kept_softmax_decode", "return_dict"})


def plain_decode_call(kwargs: dict[str, Any], allowed: frozenset[str] = GRAPH_KWARGS) -> bool:
    """No input but ``allowed`` ones (default: what the captured step takes; no embeddings, output_attentions,
    labels, ...)."""
    return all(k in allowed or v is None or v is False for k, v in kwargs.items())


def prefill_chunk(model, input_ids, kwargs: dict[str, Any], attention_mask, cache, logits_to_keep) -> int:
    """Positions per chunk for this call (0 = one pass): a cached call over more tokens than
    ``prefill_chunk_tokens`` (or, with a global cache, more positions than ``global_prefill_chunk``) whose wanted
    logits fit in the last chunk, with a 2D mask (or none) and nothing
    the chunks would have to stitch together (hidden states, attentions, labels)."""
    x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    budget = int(model.prefill_chunk_tokens or 0)
    # a global cache's prefill is quadratic in the call's length: at most global_prefill_chunk positions per call
    positions = int(model.global_prefill_chunk or 0) if model.linear_config.global_cache else 0
    if cache is None or x is None:
        return 0
    if (budget <= 0 or x.shape[0] * x.shape[1] <= budget) and (positions <= 0 or x.shape[1] <= positions):
        return 0
    if not (isinstance(logits_to_keep, int) and logits_to_keep >= 1) or model.training:
        return 0
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        return 0
    if not plain_decode_call(kwargs, GRAPH_KWARGS | {"inputs_embeds", "use_cache"}):
        return 0
    chunk = budget // x.shape[0] if budget > 0 else x.shape[1]
    if positions > 0:
        chunk = min(chunk, positions)
    chunk = max(chunk, logits_to_keep, 1)
    return chunk if chunk < x.shape[1] else 0


def chunked_prefill(model, chunk: int, input_ids, attention_mask, cache, logits_to_keep: int,
                     kwargs: dict[str, Any]):
    """The forward as consecutive chunks of ``chunk`` positions through ``cache`` (the first chunk the shortest,
    so the last holds the ``logits_to_keep`` positions returned). Each chunk sees the mask up to its end and
    its slice of positions, as a prompt fed in pieces would."""
    x = input_ids if input_ids is not None else kwargs["inputs_embeds"]
    T = x.shape[1]
    past = cache.get_seq_length()
    ends = list(range(T, 0, -chunk))[::-1]
    cache_key = cache_kwarg_of(type(model))
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
        kw["linear_key_mask"] = model._linear_key_mask(mask, end - start, cached=True)
        kw[cache_key] = cache
        out = model.forward(input_ids=None if input_ids is None else input_ids[:, start:end], attention_mask=mask,
                           use_cache=True, logits_to_keep=logits_to_keep if end == T else 1, **kw)
    return out


def graphed_decode_step(model, input_ids: torch.Tensor, cache: LinearizedCache, kwargs: dict[str, Any],
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
    cache_key = cache_kwarg_of(type(model))
    forward = model._base_forward
    cache_ref = weakref.ref(cache)  # the step is kept by the cache's graph: a strong reference would be a cycle
    # the compiled forward passes no cache: every layer must be a linear one (its cache is found by the opaque op)
    all_linear = all(isinstance(layer, RecurrentStateLayer) for layer in cache.layers)
    compiled = model._compiled_decode() if graphs.compile_enabled(model) and all_linear else None

    def step(ids, pos, cpos):
        step_cache = cache_ref()
        if compiled is not None:
            layers = {i: (m.linear_attn, step_cache.layers[i]) for i, m in model.linear_attention_modules().items()}
            logits = compiled(model, layers, ids, pos, cpos)
            if logits is not None:
                return logits
        out = forward(input_ids=ids, position_ids=pos, cache_position=cpos, use_cache=True, logits_to_keep=1,
                      linear_key_mask=None, kept_softmax_decode=True, **{cache_key: step_cache})
        return out.logits

    state = graphs.decoding_state(cache, model)
    logits = state.run(cache, input_ids, position_ids.to(torch.long).contiguous(),
                       cache_position.to(torch.long).contiguous(), step, capture=capture)
    graphs.note_failure(model, state)
    return causal_lm_output(logits, cache)


def compiled_decode(model) -> graphs.CompiledDecode:
    """This model's compiled decode forward (made on first use and kept: it holds neither the model nor a cache,
    so every cache and ``generate()`` call reuses its compilations)."""
    compiled = model.__dict__.get("_compiled_decode_step")
    if compiled is None:
        compiled = model.__dict__["_compiled_decode_step"] = graphs.CompiledDecode(compiled_decode_forward)
    return compiled


def compiled_decode_forward(model, input_ids: Tensor, position_ids: Tensor,
                             cache_position: Tensor) -> Tensor:
    """The one-token forward ``torch.compile`` traces (``models/graphs.py``): the transformers class's forward with
    no cache (nothing traced reads the token count, which changes every step) and every linear attention as
    ``graphs.cached_linear_attention``; returns the logits [B, 1, V]."""
    out = model._base_forward(input_ids=input_ids, position_ids=position_ids, cache_position=cache_position,
                              use_cache=False, logits_to_keep=1, compiled_decode=True)
    return out.logits


def causal_lm_output(logits: torch.Tensor, cache: Cache):
    """A ``CausalLMOutputWithPast`` carrying ``cache`` under the name the installed transformers uses."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return CausalLMOutputWithPast(logits=logits, **{"cache" if "cache" in names else "past_key_values": cache})


__all__ = ["GRAPH_KWARGS", "causal_lm_output", "chunked_prefill", "compiled_decode", "compiled_decode_forward",
           "graphed_decode_step", "plain_decode_call", "prefill_chunk"]
