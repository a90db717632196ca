"""``linearize info``: what an export is and what its cache costs, from config.json alone (no weights loaded)."""

from __future__ import annotations

from pathlib import Path

from linearize.errors import ConfigError, LinearizeError
from linearize.io.devices import to_dtype
from linearize.io.loading import context_length
from linearize.models.base import split_linearize_dict
from linearize.models.cache import CacheGeometry
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
    g = CacheGeometry.from_config(c, lin, dtype_bytes)
    softmax = [i for i in lin.softmax_layers if i < g.n_layers]
    linear = g.n_layers - len(softmax)
    state, window_bytes = g.linear_parts(linear)
    kv_per_token = g.softmax_layer_bytes(1) * g.n_layers
    softmax_per_token = g.softmax_layer_bytes(1) * len(softmax)
    fixed = state + window_bytes
    saved_per_token = kv_per_token - softmax_per_token
    ours, theirs = g.bytes_per_sequence(len(softmax), INFO_CONTEXT), g.teacher_bytes(INFO_CONTEXT)
    window = f"window {lin.window}" + (f" + {lin.sinks} sinks" if lin.sinks else "")
    context = context_length(c)
    return {
        "architecture": f"{meta.get('base_model_type', c.get('model_type'))} ({c.get('model_type')})",
        "teacher": str(meta.get("teacher")),
        "feature map": f"{lin.feature_map} (F={g.feature_dim} per head, state per {lin.state_per} head: "
                       f"{g.num_state_heads} heads/layer)",
        "attention": f"hybrid, {window}" if lin.window else "pure linear",
        "layers": f"{linear} linear, {len(softmax)} softmax {softmax if softmax else ''}".strip(),
        "cache per sequence": f"{_fmt(fixed)} constant (fp32 state {_fmt(state)} + window {_fmt(window_bytes)})"
        + (f" + {_fmt(softmax_per_token)}/token for softmax layers" if softmax else ""),
        "trained context": f"{context:,} tokens (the teacher's max_position_embeddings; `linearize generate` warns "
                           "past it)" if context else "not recorded",
        "teacher KV cache": f"{_fmt(kv_per_token)} per token",
        f"cache at {INFO_CONTEXT:,} tokens": f"{_fmt(ours)} ({ours:,} B) per sequence vs teacher KV {_fmt(theirs)} "
                                             f"({theirs:,} B): ratio {ours / theirs:.3g} ({_times(ours, theirs)})",
        "break-even context": f"{fixed / saved_per_token:,.0f} tokens (beyond this the linearized cache is "
                              "smaller)" if saved_per_token else "none (every layer is softmax)",
    }


def _times(ours: int, theirs: int) -> str:
    return f"{theirs / ours:,.1f}x smaller" if ours <= theirs else f"{ours / theirs:,.1f}x larger"
