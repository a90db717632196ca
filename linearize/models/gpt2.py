"""Adapter for GPT-2: fused ``c_attn`` (a Conv1D, so weights are [in, out]) producing q, k, v; absolute position
embeddings (added to the input, so no RoPE here); softmax scale ``1/sqrt(d)`` (``scale_attn_weights``), further
divided by ``layer_idx + 1`` when ``scale_attn_by_inverse_layer_idx`` is set — ``base.scaling`` carries both."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from linearize.models.base import Adapter, LinearizedAttention, LinearizedConfigMixin, LinearizedModelMixin
from linearize.modules.attention import HybridLinearAttention, LinearAttentionConfig


class LinearizedGPT2Attention(LinearizedAttention):
    def __init__(self, base: nn.Module, cfg: LinearAttentionConfig, layer_idx: int):
        super().__init__()
        self.config = base.config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim, self.split_size = base.num_heads, base.head_dim, base.split_size
        self.c_attn, self.c_proj, self.resid_dropout = base.c_attn, base.c_proj, base.resid_dropout
        self.linear_attn = HybridLinearAttention(cfg, self.num_heads, self.num_heads, self.head_dim, base.scaling)
        self.linear_attn.to(device=base.c_attn.weight.device)

    def project(self, hidden_states: Tensor):
        B, T, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape = (B, T, self.num_heads, self.head_dim)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def rotate(self, q: Tensor, k: Tensor, position_embeddings=None):
        """GPT-2 has no RoPE (its positions are in the embeddings)."""
        return q, k

    def output(self, o: Tensor) -> Tensor:
        B, H, T, d = o.shape
        return self.resid_dropout(self.c_proj(o.transpose(1, 2).reshape(B, T, H * d)))


GPT2_ADAPTER = Adapter(
    name="gpt2",
    base_model_types=("gpt2",),
    layers_path="transformer.h",
    attention_attr="attn",
    build=LinearizedGPT2Attention,
    # the `attn.` prefix keeps peft (which matches by name suffix) off the MLP's own c_proj
    lora_targets=("attn.c_attn", "attn.c_proj"),
    fan_in_fan_out=True,  # Conv1D weights are [in, out]
)


@strict
class LinearizedGPT2Config(LinearizedConfigMixin, GPT2Config):
    model_type = "linearized_gpt2"
    linearize: dict | None = None


class LinearizedGPT2LMHeadModel(LinearizedModelMixin, GPT2LMHeadModel):
    config_class = LinearizedGPT2Config
    adapter = GPT2_ADAPTER


CLASSES = {"gpt2": (LinearizedGPT2Config, LinearizedGPT2LMHeadModel)}
