"""Adapter for Phi-3 (Phi-3, Phi-3.5 and Phi-4-mini, ``model_type`` phi3): one fused ``qkv_proj`` whose output is q
(``num_attention_heads * head_dim``), then k and v (``num_key_value_heads * head_dim`` each), GQA, scale
``head_dim ** -0.5``, and RoPE that may rotate only the first ``partial_rotary_factor`` of each head
(Phi-4-mini: 0.75), which Phi-3's own ``apply_rotary_pos_emb`` does from the width of ``cos``/``sin``.

Phi-3-mini-4k sets ``sliding_window`` (2047) on every layer; the linear layers reach every key through their state,
so they drop it, as they do Mistral's.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from linearize.models.base import Adapter, LinearizedAttention, LinearizedConfigMixin, LinearizedModelMixin
from linearize.modules.attention import LinearAttentionConfig


class LinearizedPhi3Attention(LinearizedAttention):
    """Drop-in replacement for ``Phi3Attention``; ``qkv_proj`` and ``o_proj`` keep their names (and weights)."""

    def __init__(self, base: nn.Module, cfg: LinearAttentionConfig, layer_idx: int):
        super().__init__()
        self.qkv_proj, self.o_proj = base.qkv_proj, base.o_proj
        self.adopt(base, cfg, layer_idx)

    def project(self, hidden_states: Tensor):
        """hidden [B, T, C] -> q [B, H, T, d], k/v [B, Hk, T, d]: split the fused projection (RoPE in ``rotate``)."""
        B, T, _ = hidden_states.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden_states).split((q_size, kv_size, kv_size), dim=-1)
        shape = (B, T, -1, self.head_dim)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def rotate(self, q: Tensor, k: Tensor, position_embeddings):
        """Phi-3's RoPE: only the first ``cos.shape[-1]`` channels of each head rotate (partial rotary)."""
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(q, k, cos, sin)


PHI3_ADAPTER = Adapter(
    name="phi3",
    base_model_types=("phi3",),
    layers_path="model.layers",
    attention_attr="self_attn",
    build=LinearizedPhi3Attention,
    lora_targets=("qkv_proj", "o_proj"),
)


@strict
class LinearizedPhi3Config(LinearizedConfigMixin, Phi3Config):
    model_type = "linearized_phi3"
    linearize: dict | None = None


class LinearizedPhi3ForCausalLM(LinearizedModelMixin, Phi3ForCausalLM):
    config_class = LinearizedPhi3Config
    adapter = PHI3_ADAPTER


CLASSES = {"phi3": (LinearizedPhi3Config, LinearizedPhi3ForCausalLM)}
