"""Causal linear / hybrid attention: references (``naive``) and fused Triton kernels."""

from linearize.kernels.hybrid.naive import (
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
)

__all__ = ["hybrid_attention_chunked", "hybrid_attention_quadratic", "hybrid_attention_recurrent"]
