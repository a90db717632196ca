"""Adapter for Qwen3: the Llama layout (``q_proj``/``k_proj``/``v_proj``/``o_proj``, GQA, RoPE from
``position_embeddings``, scale ``head_dim ** -0.5``) plus an RMSNorm over each head's query and key (``q_norm``,
``k_norm``, on ``head_dim``) between the projection and RoPE. ``head_dim`` is its own setting (Qwen3-0.6B: 16 heads
of 128 on a hidden size of 1024), so the projections are not square.

A Qwen3 config may mark sliding-window layers (``use_sliding_window`` with ``max_window_layers``: ``layer_types``);
``models/sliding.py`` keeps those for ``layers: global``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from linearize.models.base import Adapter, LinearizedConfigMixin, LinearizedModelMixin
from linearize.models.llama import LinearizedLlamaAttention
from linearize.modules.attention import LinearAttentionConfig


class LinearizedQwen3Attention(LinearizedLlamaAttention):
    """Drop-in replacement for ``Qwen3Attention``: Llama's, with the per-head q/k RMSNorms kept under their names."""

    def __init__(self, base: nn.Module, cfg: LinearAttentionConfig, layer_idx: int):
        super().__init__(base, cfg, layer_idx)
        self.q_norm, self.k_norm = base.q_norm, base.k_norm

    def project(self, hidden_states: Tensor):
        """hidden [B, T, C] -> q [B, H, T, d], k/v [B, Hk, T, d]: project, then norm each head (as Qwen3); RoPE
        follows in ``rotate``."""
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        return q, k, v


QWEN3_ADAPTER = Adapter(
    name="qwen3",
    base_model_types=("qwen3",),
    layers_path="model.layers",
    attention_attr="self_attn",
    build=LinearizedQwen3Attention,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
)


@strict
class LinearizedQwen3Config(LinearizedConfigMixin, Qwen3Config):
    model_type = "linearized_qwen3"
    linearize: dict | None = None


class LinearizedQwen3ForCausalLM(LinearizedModelMixin, Qwen3ForCausalLM):
    config_class = LinearizedQwen3Config
    adapter = QWEN3_ADAPTER


CLASSES = {"qwen3": (LinearizedQwen3Config, LinearizedQwen3ForCausalLM)}
