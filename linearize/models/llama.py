"""Adapter for the Llama family in transformers 5: Llama (Llama-2/3, SmolLM), Mistral and Qwen2 (q/k/v bias).

Their attention modules share one layout: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linear layers (optional
bias), GQA with ``num_key_value_heads``, RoPE from ``position_embeddings=(cos, sin)`` computed once per model, and
softmax scale ``head_dim ** -0.5``. The replacement keeps those submodules under the same names, so a linearized
checkpoint holds the teacher's weights under the teacher's keys plus ``...self_attn.linear_attn.*``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from linearize.models.base import Adapter, LinearizedAttention, LinearizedConfigMixin, LinearizedModelMixin
from linearize.modules.attention import LinearAttentionConfig


class LinearizedLlamaAttention(LinearizedAttention):
    """Drop-in replacement for ``LlamaAttention`` / ``MistralAttention`` / ``Qwen2Attention``."""

    def __init__(self, base: nn.Module, cfg: LinearAttentionConfig, layer_idx: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.adopt(base, cfg, layer_idx)

    def project(self, hidden_states: Tensor):
        """hidden [B, T, C] -> q [B, H, T, d], k/v [B, Hk, T, d] before RoPE (applied by ``rotate``)."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        return q, k, v


LLAMA_ADAPTER = Adapter(
    name="llama",
    base_model_types=("llama", "mistral", "qwen2"),
    layers_path="model.layers",
    attention_attr="self_attn",
    build=LinearizedLlamaAttention,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
)


@strict
class LinearizedLlamaConfig(LinearizedConfigMixin, LlamaConfig):
    model_type = "linearized_llama"
    linearize: dict | None = None


class LinearizedLlamaForCausalLM(LinearizedModelMixin, LlamaForCausalLM):
    config_class = LinearizedLlamaConfig
    adapter = LLAMA_ADAPTER


@strict
class LinearizedMistralConfig(LinearizedConfigMixin, MistralConfig):
    model_type = "linearized_mistral"
    linearize: dict | None = None


class LinearizedMistralForCausalLM(LinearizedModelMixin, MistralForCausalLM):
    config_class = LinearizedMistralConfig
    adapter = LLAMA_ADAPTER


@strict
class LinearizedQwen2Config(LinearizedConfigMixin, Qwen2Config):
    model_type = "linearized_qwen2"
    linearize: dict | None = None


class LinearizedQwen2ForCausalLM(LinearizedModelMixin, Qwen2ForCausalLM):
    config_class = LinearizedQwen2Config
    adapter = LLAMA_ADAPTER


# base model_type -> (config class, model class)
CLASSES = {
    "llama": (LinearizedLlamaConfig, LinearizedLlamaForCausalLM),
    "mistral": (LinearizedMistralConfig, LinearizedMistralForCausalLM),
    "qwen2": (LinearizedQwen2Config, LinearizedQwen2ForCausalLM),
}
