"""``linearize info``: what an export is and what its cache costs, from config.json alone (no weights loaded)."""

from __future__ import annotations

from pathlib import Path

from linearize.errors import ConfigError, LinearizeError
from linearize.io.devices import to_dtype
from linearize.io.loading import context_length
from linearize.models.base import split_linearize_dict
from linearize.models.sliding import SlidingCacheGeometry, cache_geometry, layer_kinds
from linearize.settings import format_bytes as _fmt

INFO_CONTEXT = 4096
"""The context (tokens) at which ``linearize info`` compares the cache with the teacher's KV cache."""


def describe(path: str | Path) -> dict[str, str]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LinearizeError(f"{path} has no config.json; pass a folder written by `linearize convert`")
    from linearize.io.loading import read_config

    c = read_config(path)
    if "linearize" not in c:
        raise LinearizeError(f"{path} is not a linearized model (config.json has no 'linearize' section)")
    lin, meta = split_linearize_dict(c["linearize"])
    try:
        dtype_bytes = to_dtype(str(c.get("dtype") or c.get("torch_dtype") or "bfloat16")).itemsize
    except ConfigError:  # a dtype this package does not load: count 2 bytes, as for bf16/fp16
        dtype_bytes = 2
    g = cache_geometry(c, lin, dtype_bytes)
    kept = [i for i in lin.softmax_layers if i < g.n_layers]
    kinds = layer_kinds(c)
    local = [i for i in kept if kinds[i] == "local"]  # the teacher's sliding-window attention, kept
    softmax = [i for i in kept if kinds[i] != "local"]
    linear = g.n_layers - len(kept)
    state, window_bytes = g.linear_parts(linear)
    local_window = g.local_window if isinstance(g, SlidingCacheGeometry) else 0
    local_bytes = len(local) * g.softmax_layer_bytes(max(local_window - 1, 0))
    fixed = state + window_bytes + local_bytes
    ours, theirs = g.bytes_per_sequence(len(kept), INFO_CONTEXT), g.teacher_bytes(INFO_CONTEXT)
    window = f"window {lin.window}" + (f" + {lin.sinks} sinks" if lin.sinks else "")
    window += f" + a global cache of {lin.global_cache} pairs per kv head" if lin.global_cache else ""
    state_form = {"additive": "additive state", "delta": "delta-rule state",
                  "gated-delta": "gated delta-rule state"}[lin.state_update]
    context = context_length(c)
    teacher_local = [i for i, kind in enumerate(kinds) if kind == "local"]
    window_only = [i for i in lin.window_only_layers if i < g.n_layers]
    layers = f"{linear} linear" + (f" ({len(window_only)} of them window-only {window_only}: linear part off)"
                                   if window_only else "") + ", " + (f"{len(local)} local {local} (the teacher's sliding-window attention over "
                                     f"{local_window} tokens), " if local else "")
    return {
        "architecture": f"{meta.get('base_model_type', c.get('model_type'))} ({c.get('model_type')})",
        "teacher": str(meta.get("teacher")),
        "feature map": f"{lin.feature_map} (F={g.feature_dim} per head, state per {lin.state_per} head: "
                       f"{g.num_state_heads} heads/layer)",
        "attention": (f"hybrid, {window}" if lin.window else "pure linear") + f"; {state_form}",
        "layers": f"{layers}{len(softmax)} softmax {softmax if softmax else ''}".strip(),
        "cache per sequence": f"{_fmt(fixed)} constant (fp32 state {_fmt(state)} + window"
                              f"{' and global cache' if lin.global_cache else ''} {_fmt(window_bytes)}"
        + (f" + local layers' windows {_fmt(local_bytes)}" if local else "") + ")"
        + (f" + {_fmt(g.softmax_layer_bytes(len(softmax)))}/token for softmax layers" if softmax else ""),
        "trained context": f"{context:,} tokens (the teacher's max_position_embeddings; `linearize generate` warns "
                           "past it)" if context else "not recorded",
        "teacher KV cache": f"{_fmt(g.softmax_layer_bytes(g.n_layers - len(teacher_local)))} per token"
        + (f" + at most {_fmt(g.softmax_layer_bytes(len(teacher_local) * (local_window - 1)))} in its "
           f"{len(teacher_local)} local layers" if teacher_local else ""),
        f"cache at {INFO_CONTEXT:,} tokens": f"{_fmt(ours)} ({ours:,} B) per sequence vs teacher KV {_fmt(theirs)} "
                                             f"({theirs:,} B): ratio {ours / theirs:.3g} ({_times(ours, theirs)})",
        "break-even context": _break_even(g, len(kept)),
    }


def _break_even(g, n_softmax: int) -> str:
    """The shortest context at which the linearized cache is no larger than the teacher's KV cache."""
    if n_softmax >= g.n_layers:
        return "none (every layer is softmax)"
    if g.bytes_per_sequence(n_softmax, 1 << 40) > g.teacher_bytes(1 << 40):
        return "none (the teacher's cache never grows past this one)"
    lo, hi = 0, 1 << 40  # ours - theirs only falls as the context grows: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if g.bytes_per_sequence(n_softmax, mid) <= g.teacher_bytes(mid):
            hi = mid
        else:
            lo = mid + 1
    return f"{lo:,} tokens (beyond this the linearized cache is smaller)"


def _times(ours: int, theirs: int) -> str:
    return f"{theirs / ours:,.1f}x smaller" if ours <= theirs else f"{ours / theirs:,.1f}x larger"
