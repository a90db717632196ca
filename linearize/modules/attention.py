"""The linear / hybrid attention module shared by every architecture adapter.

An adapter computes q, k, v exactly as its base model does (projections, RoPE), then calls
:meth:`HybridLinearAttention.forward`, which applies the feature maps, reads/writes the recurrent cache and runs
the kernel. The module holds only the new, trainable parts: ``feature_map_q``, ``feature_map_k`` and ``mix_logit``
(gamma = sigmoid(mix_logit), one per query head, used when ``window > 0``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from linearize.errors import ConfigError, LinearizeError
from linearize.kernels import BACKENDS, hybrid_attention, hybrid_decode_step
from linearize.modules.feature_maps import FEATURE_MAPS, make_feature_map


@dataclass
class LinearAttentionConfig:
    """How softmax attention is replaced. Stored in the exported ``config.json`` under ``linearize``."""

    feature_map: str = "hedgehog"
    """Feature map name, one of the registry: hedgehog, based, t2r, elu, performer."""
    proj_dim: int | None = None
    """Feature-map projection size (hedgehog: per half, default head_dim; based: default 16)."""
    window: int = 64
    """Exact softmax over the last ``window`` tokens (the query included) plus linear attention over the rest.
    0 = pure linear attention."""
    softmax_layers: list[int] = field(default_factory=list)
    """Layer indices that keep their original softmax attention (and a normal KV cache)."""
    state_per: Literal["kv", "query"] = "kv"
    """``kv``: one recurrent state per key/value head, phi_k shared within a GQA group (smaller state).
    ``query``: one per query head (LoLCATs; more parameters, larger state)."""
    mix_init: float = 0.1
    """Initial gamma = sigmoid(mix_logit), the weight of the window softmax against the linear part."""
    eps: float = 1e-6
    """Added to the normaliser."""
    backend: str = "auto"
    """Kernel backend: auto (Triton on CUDA), torch (chunked PyTorch reference), triton."""

    def __post_init__(self) -> None:
        problems = []
        if self.feature_map not in FEATURE_MAPS:
            problems.append(f"feature_map={self.feature_map!r} is not one of {sorted(FEATURE_MAPS)}")
        if self.window < 0:
            problems.append(f"window={self.window} must be >= 0 (0 = pure linear)")
        if self.state_per not in ("kv", "query"):
            problems.append(f"state_per={self.state_per!r} must be 'kv' or 'query'")
        if not 0.0 < self.mix_init < 1.0:
            problems.append(f"mix_init={self.mix_init} must be in (0, 1)")
        if self.backend not in BACKENDS:
            problems.append(f"backend={self.backend!r} must be one of {BACKENDS}")
        if self.proj_dim is not None and self.proj_dim <= 0:
            problems.append(f"proj_dim={self.proj_dim} must be positive")
        if any(i < 0 for i in self.softmax_layers):
            problems.append(f"softmax_layers={self.softmax_layers} must be non-negative layer indices")
        if problems:
            raise ConfigError("; ".join(problems))
        self.softmax_layers = sorted(set(int(i) for i in self.softmax_layers))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LinearAttentionConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown linearize settings {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


class HybridLinearAttention(nn.Module):
    """phi maps + mix factor + kernel call + cache handling, for one layer.

    Args:
        cfg: the linearization settings.
        num_heads / num_kv_heads / head_dim: the base attention's geometry.
        scale: the base model's softmax scale (used by the window part).
    """

    def __init__(self, cfg: LinearAttentionConfig, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = float(scale)
        self.window = cfg.window
        self.num_state_heads = num_kv_heads if cfg.state_per == "kv" else num_heads
        self.feature_map_q = make_feature_map(cfg.feature_map, num_heads, head_dim, cfg.proj_dim)
        self.feature_map_k = make_feature_map(cfg.feature_map, self.num_state_heads, head_dim, cfg.proj_dim)
        logit = math.log(cfg.mix_init / (1 - cfg.mix_init))
        self.mix_logit = nn.Parameter(torch.full((num_heads,), logit)) if cfg.window > 0 else None
        self.set_backend(cfg.backend)
        self.softmax_teacher = False
        """When True, ``forward`` computes the exact causal softmax attention on the same q, k, v (the teacher for
        logit distillation, without a second copy of the weights); no cache, no padding."""

    def set_backend(self, backend: str) -> None:
        """Kernel backend of this layer: the attention kernels and the feature maps with fused kernels."""
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} must be one of {BACKENDS}")
        self.cfg.backend = backend
        self.feature_map_q.backend = self.feature_map_k.backend = backend

    @property
    def feature_dim(self) -> int:
        return self.feature_map_q.feature_dim

    def gamma(self) -> Tensor | None:
        return None if self.mix_logit is None else torch.sigmoid(self.mix_logit.float())

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """phi(q) [B, H, T, F] and phi(k) [B, Hs, Tk, F]."""
        if self.num_state_heads != k.shape[1]:
            k = k.repeat_interleave(self.num_state_heads // k.shape[1], dim=1)
        return self.feature_map_q(q), self.feature_map_k(k)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_mask: Tensor | None = None,
        cache_layer: Any = None,
    ) -> Tensor:
        """q [B, H, T, d], k/v [B, Hk, T, d|D] (post-RoPE) -> o [B, H, T, D].

        ``key_mask`` [B, past + T] (bool, False = padding) covers every token seen so far; ``cache_layer`` is this
        layer's entry of a :class:`linearize.models.cache.LinearizedCache` (None when not caching).
        """
        if self.softmax_teacher:
            if cache_layer is not None or (key_mask is not None and not bool(key_mask.all())):
                raise LinearizeError("the softmax teacher runs on packed sequences without a cache "
                                     "(use_cache=False, no padding)")
            return self.softmax_attention(q, k, v)
        if cache_layer is not None:
            return self._forward_cached(q, k, v, key_mask, cache_layer)
        if key_mask is not None:
            key_mask = key_mask[:, -k.shape[2] :].bool()
        fq, fk = self.features(q, k)
        o, _ = hybrid_attention(
            q, k, v, fq, fk, self.gamma(), window=self.window, scale=self.scale, key_mask=key_mask,
            eps=self.cfg.eps, backend=self.cfg.backend,
        )
        return o

    def _forward_cached(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, cache_layer: Any) -> Tensor:
        """Prefill or decode against a :class:`~linearize.models.cache.RecurrentStateLayer`.

        One new token with no padding among the window's keys (``key_mask`` None; the model drops the mask when
        that holds) runs ``hybrid_decode_step``: one launch reads the ring buffers and the state, writes the new
        key into the ring and folds the key leaving the window into the state, in place. Anything else (prompts,
        padding in the window) runs the chunked kernel over the cached window keys followed by the new ones.
        """
        fq, fk = self.features(q, k)
        gamma = self.gamma()
        if q.shape[2] == 1 and key_mask is None and cache_layer.has_state():
            k_ring, v_ring, fk_ring, pos = cache_layer.decode_buffers()
            o = hybrid_decode_step(
                q, k, v, fq, fk, gamma, state=cache_layer.state(), k_cache=k_ring, v_cache=v_ring,
                fk_cache=fk_ring, pos=pos, window=self.window, scale=self.scale, eps=self.cfg.eps,
                backend=self.cfg.backend,
            )
            cache_layer.advance(1)
            return o
        T = q.shape[2]
        prev = cache_layer.window_keys()
        if prev is not None:
            k, v, fk = (torch.cat([p.to(x.dtype), x], dim=2) for p, x in zip(prev, (k, v, fk)))
        if key_mask is not None:
            key_mask = key_mask[:, -k.shape[2] :].bool()
        initial_state = cache_layer.state() if cache_layer.has_state() else None
        o, state = hybrid_attention(
            q, k, v, fq, fk, gamma, window=self.window, scale=self.scale, key_mask=key_mask,
            initial_state=initial_state, output_final_state=True, eps=self.cfg.eps, backend=self.cfg.backend,
        )
        cache_layer.store(k, v, fk, state, T, key_mask)
        return o

    def attention_weights(self, q: Tensor, k: Tensor, rows: slice | None = None) -> Tensor:
        """Normalised attention weights of this (student) layer for query rows ``rows``: [B, H, R, T], fp32.

        Used by the Hedgehog cross-entropy loss. Memory is O(R * T); callers iterate over query blocks.
        """
        T = k.shape[2]
        rows = rows or slice(0, q.shape[2])
        fq, fk = self.features(q[:, :, rows], k)
        H = self.num_heads
        fk_h = fk.repeat_interleave(H // fk.shape[1], dim=1).float()
        i = torch.arange(T, device=q.device)[rows][:, None]
        j = torch.arange(T, device=q.device)[None, :]
        lin = torch.einsum("bhtf,bhsf->bhts", fq.float(), fk_h) * (j <= i - self.window)
        w = lin
        if self.window > 0:
            k_h = k.repeat_interleave(H // k.shape[1], dim=1).float()
            s = torch.einsum("bhtd,bhsd->bhts", q[:, :, rows].float(), k_h) * self.scale
            win = (j <= i) & (j > i - self.window)
            s = s.masked_fill(~win, float("-inf"))
            p = torch.exp(s - s.amax(-1, keepdim=True)) * self.gamma()[None, :, None, None]
            w = w + p
        return w / (w.sum(-1, keepdim=True) + self.cfg.eps)

    def softmax_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The teacher: exact causal softmax attention on the same q, k, v -> [B, H, T, D] (fp32 math)."""
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        v = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        o = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True, scale=self.scale
        )
        return o.to(v.dtype)
