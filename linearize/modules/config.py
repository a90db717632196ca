"""The linear-attention settings stored in an export's ``config.json`` (``linearize`` section).

Free of torch, like every settings module, so that the CLI can build its flags from the fields without loading
PyTorch; the feature-map registry is consulted only when a value is validated.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationInfo, field_validator, model_validator

from linearize.errors import ConfigError
from linearize.settings import Settings, check, positive

DEFAULT_WINDOW = 256
"""The sliding window when none is given: measured on SmolLM2-135M (#12): WikiText 1.25x the teacher after stage 1
against 1.73x at LoLCATs' 64, state at 4k tokens 0.16x the teacher's KV cache (docs/benchmarks.md)."""
DEFAULT_SINKS = 4
"""Attention sinks when ``sinks`` is null and there is a window (StreamingLLM's 4; measured: #12's ablation)."""
LEGACY_DEFAULTS = {"window": 64, "sinks": 0, "feature_input": "rotated"}
"""What an export's ``config.json`` means by a missing key: the defaults of the linearize that wrote it (sinks did
not exist before #12; the window's default was 64 until #26)."""


class LinearAttentionConfig(Settings):
    """How softmax attention is replaced. Stored in the exported ``config.json`` under ``linearize``; immutable
    (each layer holds its own, see :meth:`HybridLinearAttention.set_backend`)."""

    feature_map: str = "hedgehog"
    """Feature map: hedgehog | based | t2r | elu | performer (the registry in modules/feature_maps.py)."""
    proj_dim: int | None = None
    """Feature-map projection size (hedgehog: per half, default head_dim; based: default 16)."""
    window: int = DEFAULT_WINDOW
    """Sliding softmax window in tokens (the query included); 0 = pure linear attention. 256 by default (measured
    on SmolLM2-135M, #12: WikiText 1.25x the teacher after stage 1 against 1.73x at LoLCATs' 64, state at 4k tokens
    0.16x the teacher's KV cache; docs/benchmarks.md); exports record theirs."""
    sinks: int | None = None
    """Attention sinks: the first N tokens of every sequence stay exact-softmax keys next to the window for every
    later query, never in the linear state; null = 4 with a window, 0 for pure linear attention (exports without
    the key load with 0)."""
    global_cache: int = 0
    """Sparse global cache: per layer and kv head, this many exact key/value pairs from beyond the window, the keys
    the linear state recalls worst (self-recall error, as LoLA), read by exact softmax with the sinks and the
    window; 0 = off. Constant memory; training-free (also set on an export's config.json). Runs the PyTorch path
    (kernels/hybrid/global_cache.py) for training and prefill: O(T^2) per chunk; decoding runs a fused Triton step on
    CUDA (kernels/hybrid/global_decode.py)."""
    state_update: Literal["additive", "delta", "gated-delta"] = "additive"
    """How a key that leaves the window enters the recurrent state: additive (S += phi(k) v^T, LoLCATs), delta (the
    delta rule on L2-normalised phi: erase what the state holds for the key, then write it with a learned strength
    beta) or gated-delta (the delta rule with a learned decay a as well). The delta forms keep the normaliser as a
    ones column of the same state (kernels/delta/naive.py), so the state's share of the output stays bounded at any
    length; they run fla-core's kernels on CUDA when installed (pip install 'linearize[delta]'), PyTorch otherwise."""
    feature_input: Literal["rotated", "unrotated"] = "unrotated"
    """What the feature maps read: unrotated = q and k before RoPE (a position-free state, as NoPE; the window and
    the sinks keep RoPE) or rotated = q and k after RoPE (LoLCATs; the state's scores then depend on absolute
    positions, and past the transfer's sequence length the maps see rotations they were never trained on).
    Measured on SmolLM2-135M (#27, H200): perplexity on 4k-token blocks 26.2 unrotated against 73.5 rotated after the
    same 1k-token transfer, 24.4 vs 24.5 at 1k. Exports without the key load as rotated. Models without RoPE (GPT-2)
    read the same q and k either way."""
    softmax_layers: list[int] = []
    """Layer indices that keep their softmax attention (and a normal KV cache)."""
    window_only_layers: list[int] = []
    """Layer indices whose linear part is switched off: they read only their exact part (sinks + window + global
    cache), as StreamingLLM does, with a constant cache; their feature maps are still trained and exported. convert's
    auto_window_only chooses them by held-out KL (docs/convert.md); also set on an export's config.json."""
    state_per: Literal["kv", "query"] = "kv"
    """Recurrent state per kv head (phi_k shared within a GQA group; smaller) or per query head (LoLCATs)."""
    mix_init: float = 0.1
    """Initial weight gamma = sigmoid(mix_logit) of the window softmax against the linear part (hybrid only)."""
    eps: float = 1e-6
    """Added to the attention normaliser."""
    backend: Literal["auto", "torch", "triton"] = "auto"
    """Kernel backend: auto (Triton on CUDA) | torch (chunked PyTorch reference) | triton."""

    @field_validator("feature_map")
    @classmethod
    def _known_map(cls, v: str) -> str:
        from linearize.modules.feature_maps import FEATURE_MAPS  # the registry (torch); only when validating

        if v not in FEATURE_MAPS:
            raise ValueError(f"is not one of {sorted(FEATURE_MAPS)}")
        return v

    _window = check("window", ok=lambda v: v >= 0, says="must be >= 0 (0 = pure linear)")
    _sinks = check("sinks", ok=lambda v: 0 <= v <= 64, says="must be in 0..64 (the sink keys share one block)")
    _global = check("global_cache", ok=lambda v: 0 <= v <= 4096, says="must be in 0..4096 (0 = off)")
    _mix = check("mix_init", ok=lambda v: 0.0 < v < 1.0, says="must be in (0, 1)")
    _proj = positive("proj_dim")

    @field_validator("sinks", mode="after")
    @classmethod
    def _default_sinks(cls, v: int | None, info: ValidationInfo) -> int:
        if v is not None:
            return v
        return DEFAULT_SINKS if (info.data.get("window") or 0) > 0 else 0

    @field_validator("softmax_layers", "window_only_layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("must be non-negative layer indices")
        return sorted(set(int(i) for i in v))

    @model_validator(mode="after")
    def _consistent(self) -> "LinearAttentionConfig":
        if self.global_cache and self.state_update != "additive":
            raise ValueError(f"global_cache={self.global_cache} needs state_update=additive (the recall errors are "
                             f"defined for the additive state)")
        if self.global_cache and not self.window:
            raise ValueError(f"global_cache={self.global_cache} needs window > 0 (its keys are read with the window's)")
        if self.sinks and not self.window:
            raise ValueError(f"sinks={self.sinks} needs window > 0 (sinks are exact-softmax keys next to the window)")
        if self.window_only_layers and not self.window:
            raise ValueError(f"window_only_layers={self.window_only_layers} needs window > 0 (without its linear part "
                             "a layer reads its window alone)")
        both = sorted(set(self.window_only_layers) & set(self.softmax_layers))
        if both:
            raise ValueError(f"layers {both} are in softmax_layers and in window_only_layers: a layer is one or the "
                             "other")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LinearAttentionConfig.model_fields}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LinearAttentionConfig":
        unknown = set(d) - set(cls.model_fields)
        if unknown:
            raise ConfigError(f"unknown linearize settings {sorted(unknown)}; valid: {sorted(cls.model_fields)}")
        return cls.build(**{**LEGACY_DEFAULTS, **d})


__all__ = ["DEFAULT_SINKS", "DEFAULT_WINDOW", "LEGACY_DEFAULTS", "LinearAttentionConfig"]
