"""Feature maps phi: ``[B, heads, T, d] -> [B, heads, T, F]``, one set of parameters per head.

Add a map by subclassing :class:`FeatureMap` and decorating it with ``@register_feature_map("name")``; the
registry is the only place the rest of the package looks names up. Formulas: ``shared/docs/method-notes.md``.

Each map is initialised so that the *untrained* map is already a sensible kernel (identity projections, or a
projection scaled so the Taylor map approximates ``exp(q.k / sqrt(d))``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.errors import ConfigError
from linearize.kernels.feature_maps import based_features, hedgehog_features

FEATURE_MAPS: dict[str, type["FeatureMap"]] = {}


def register_feature_map(name: str):
    def wrap(cls: type[FeatureMap]) -> type[FeatureMap]:
        cls.name = name
        FEATURE_MAPS[name] = cls
        return cls

    return wrap


class FeatureMap(nn.Module):
    """Base class. ``feature_dim`` is F, the output size per head.

    ``backend`` (a plain attribute, not saved state; set it on an instance to override) picks the implementation of
    the maps that have fused kernels (Hedgehog, BASED): ``"auto"`` = the fused Triton kernels for CUDA inputs of
    supported sizes, else PyTorch; ``"torch"`` / ``"triton"`` force one (see ``linearize.kernels.feature_maps``).
    """

    name: str = ""
    feature_dim: int
    backend: str = "auto"

    def __init__(self, num_heads: int, head_dim: int, proj_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


def _identity_like(num_heads: int, d: int, p: int) -> Tensor:
    """[h, d, p] identity when p == d; otherwise a scaled random orthogonal slice (norm-preserving on average)."""
    if p == d:
        return torch.eye(d).expand(num_heads, d, d).clone()
    w = torch.empty(num_heads, max(d, p), max(d, p))
    for h in range(num_heads):
        nn.init.orthogonal_(w[h])
    return w[:, :d, :p].contiguous() * math.sqrt(max(d, p) / d) if p > d else w[:, :d, :p].contiguous()


def _project(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # x [B, h, T, d], weight [h, d, p] -> [B, h, T, p]
    y = torch.einsum("bhtd,hdp->bhtp", x, weight.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)[None, :, None, :]
    return y


@register_feature_map("hedgehog")
class HedgehogFeatureMap(FeatureMap):
    """Hedgehog (Zhang et al. 2024), softmax form as in LoLCATs: phi(x) = [softmax(xW + b), softmax(-xW - b)].

    The softmax runs over the feature dimension in fp32. ``proj_dim`` (default ``head_dim``) is the size of each
    half, so ``F = 2 * proj_dim``. Identity initialisation: the untrained map is softmax(+-x), already a positive
    kernel that favours aligned q/k. ``forward`` calls ``linearize.kernels.feature_maps.hedgehog_features`` with
    ``self.backend``: the PyTorch reference projects in ``x.dtype``, the fused Triton kernel keeps the projection's
    fp32 accumulator (same result for fp32 inputs, ~1e-3 relative difference for bf16).
    """

    def __init__(self, num_heads: int, head_dim: int, proj_dim: int | None = None):
        super().__init__(num_heads, head_dim)
        p = proj_dim or head_dim
        self.weight = nn.Parameter(_identity_like(num_heads, head_dim, p))
        self.bias = nn.Parameter(torch.zeros(num_heads, p))
        self.feature_dim = 2 * p

    def forward(self, x: Tensor) -> Tensor:
        return hedgehog_features(x, self.weight, self.bias, backend=self.backend)


@register_feature_map("based")
class BasedFeatureMap(FeatureMap):
    """BASED (Arora et al. 2024): 2nd-order Taylor expansion of exp(q.k / sqrt(r)) on a learned projection to r dims.

    phi(x) = [1, x / r^(1/4), x_i x_j / (sqrt(2) sqrt(r)) for i == j, x_i x_j / sqrt(r) for i < j], so that
    phi(q).phi(k) = 1 + s + s^2 / 2 with s = q'.k' / sqrt(r) (symmetric packing: 1 + r + r(r+1)/2 features, 153 for
    r = 16). The projection is initialised with Gaussian entries scaled so that E[q'.k'] / sqrt(r) = q.k / sqrt(d):
    the untrained map approximates the teacher's exp(q.k / sqrt(d)) to second order. ``forward`` calls
    ``linearize.kernels.feature_maps.based_features`` with ``self.backend`` (fp32 products either way).
    """

    def __init__(self, num_heads: int, head_dim: int, proj_dim: int | None = None):
        super().__init__(num_heads, head_dim)
        r = proj_dim or min(16, head_dim)
        self.proj_dim = r
        g = torch.randn(num_heads, head_dim, r) / math.sqrt(r)
        self.weight = nn.Parameter(g * (r / head_dim) ** 0.25)
        self.feature_dim = 1 + r + r * (r + 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        return based_features(x, self.weight, backend=self.backend)


@register_feature_map("t2r")
class T2RFeatureMap(FeatureMap):
    """T2R (Kasai et al. 2021): phi(x) = ReLU(xW + b), identity initialisation. May be all-zero for a key; the
    attention's eps keeps the normaliser finite."""

    def __init__(self, num_heads: int, head_dim: int, proj_dim: int | None = None):
        super().__init__(num_heads, head_dim)
        p = proj_dim or head_dim
        self.weight = nn.Parameter(_identity_like(num_heads, head_dim, p))
        self.bias = nn.Parameter(torch.zeros(num_heads, p))
        self.feature_dim = p

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(_project(x, self.weight, self.bias))


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """Linear Transformer (Katharopoulos et al. 2020): phi(x) = elu(x) + 1. No parameters."""

    def __init__(self, num_heads: int, head_dim: int, proj_dim: int | None = None):
        super().__init__(num_heads, head_dim)
        self.feature_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1


@register_feature_map("performer")
class PerformerFeatureMap(FeatureMap):
    """Performer FAVOR+ positive random features (Choromanski et al. 2021), a training-free baseline:
    phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(m) with x' = x / d^(1/4), so phi(q).phi(k) estimates exp(q.k / sqrt(d)).

    The random matrix (orthogonal blocks, chi-distributed row norms) is a saved buffer: exports reproduce exactly.
    """

    def __init__(self, num_heads: int, head_dim: int, proj_dim: int | None = None):
        super().__init__(num_heads, head_dim)
        m = proj_dim or head_dim
        gen = torch.Generator().manual_seed(0)
        blocks = []
        for _ in range(num_heads):
            rows = []
            while sum(r.shape[0] for r in rows) < m:
                qmat, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen))
                rows.append(qmat.T)
            w = torch.cat(rows)[:m]
            norms = torch.randn(m, head_dim, generator=gen).norm(dim=1, keepdim=True)
            blocks.append((w * norms).T)  # [d, m]
        self.register_buffer("omega", torch.stack(blocks))  # [h, d, m]
        self.feature_dim = m

    def forward(self, x: Tensor) -> Tensor:
        xs = x.float() * self.head_dim**-0.25
        proj = _project(xs, self.omega.float(), None)
        return (torch.exp(proj - 0.5 * xs.pow(2).sum(-1, keepdim=True)) / math.sqrt(self.feature_dim)).to(x.dtype)


def make_feature_map(name: str, num_heads: int, head_dim: int, proj_dim: int | None = None) -> FeatureMap:
    if name not in FEATURE_MAPS:
        raise ConfigError(f"unknown feature map {name!r}; choose one of: {', '.join(sorted(FEATURE_MAPS))}")
    return FEATURE_MAPS[name](num_heads, head_dim, proj_dim)
