"""``linearize info``: what an export is and what its cache costs, from config.json alone (no weights loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from linearize.devices import to_dtype
from linearize.errors import ConfigError, LinearizeError
from linearize.models.base import split_linearize_dict
from linearize.models.cache import cache_bytes_per_sequence
from linearize.modules.feature_maps import make_feature_map


def describe(path: str | Path) -> dict[str, str]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LinearizeError(f"{path} has no config.json; pass a folder written by `linearize convert`")
    c = json.loads(cfg_file.read_text())
    if "linearize" not in c:
        raise LinearizeError(f"{path} is not a linearized model (config.json has no 'linearize' section)")
    lin, meta = split_linearize_dict(c["linearize"])
    n_layers = c.get("num_hidden_layers", c.get("n_layer"))
    n_heads = c.get("num_attention_heads", c.get("n_head"))
    n_kv = c.get("num_key_value_heads") or n_heads
    hidden = c.get("hidden_size", c.get("n_embd"))
    head_dim = c.get("head_dim") or hidden // n_heads
    fmap = make_feature_map(lin.feature_map, 1, head_dim, lin.proj_dim)
    F = fmap.feature_dim
    state_heads = n_kv if lin.state_per == "kv" else n_heads
    softmax = [i for i in lin.softmax_layers if i < n_layers]
    linear = n_layers - len(softmax)
    try:
        dtype_bytes = to_dtype(str(c.get("dtype") or c.get("torch_dtype") or "bfloat16")).itemsize
    except ConfigError:  # a dtype this package does not load: count 2 bytes, as for bf16/fp16
        dtype_bytes = 2
    state, window_bytes = cache_bytes_per_sequence(
        linear_layers=linear, num_state_heads=state_heads, num_kv_heads=n_kv, feature_dim=F, head_dim=head_dim,
        window=lin.window, dtype_bytes=dtype_bytes,
    )
    kv_per_token = 2 * n_kv * head_dim * dtype_bytes * n_layers
    softmax_per_token = 2 * n_kv * head_dim * dtype_bytes * len(softmax)
    fixed = state + window_bytes
    return {
        "architecture": f"{meta.get('base_model_type', c.get('model_type'))} ({c.get('model_type')})",
        "teacher": str(meta.get("teacher")),
        "feature map": f"{lin.feature_map} (F={F} per head, state per {lin.state_per} head: {state_heads} heads/layer)",
        "attention": f"hybrid, window {lin.window}" if lin.window else "pure linear",
        "layers": f"{linear} linear, {len(softmax)} softmax {softmax if softmax else ''}".strip(),
        "cache per sequence": f"{_fmt(fixed)} constant (fp32 state {_fmt(state)} + window {_fmt(window_bytes)})"
        + (f" + {_fmt(softmax_per_token)}/token for softmax layers" if softmax else ""),
        "teacher KV cache": f"{_fmt(kv_per_token)} per token",
        "break-even context": f"{fixed / kv_per_token:,.0f} tokens (beyond this the linearized cache is smaller)",
    }


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"
