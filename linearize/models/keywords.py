"""How transformers hands the cache around: the one place that knows the keyword's names (``cache=`` from 5.24,
``past_key_values=`` before). Everything else finds, pops and passes the cache through these functions."""

from __future__ import annotations

import inspect
from functools import cache as _memoize
from typing import Any, Mapping

import transformers
from transformers.cache_utils import Cache

from linearize.errors import LinearizeError

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


__all__ = ["CACHE_KWARGS", "cache_kwarg_of", "find_cache", "output_cache", "pop_cache"]
