"""Adapter for Gemma 3's text models (``model_type`` gemma3_text: Gemma 3 270M and 1B; transformers reads Gemma 3
GGUF files as this type too).

Its attention: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with GQA, an RMSNorm over each head's query and key
(``q_norm``, ``k_norm``; Gemma's ``1 + weight`` form) before RoPE, and the softmax scale
``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5`` (``base.scaling`` carries it). Layers come in two kinds
(``config.layer_types``): five local ones (``sliding_attention``: a window of ``sliding_window`` tokens, RoPE base
10k) for every global one (``full_attention``: RoPE base 1M); the model computes each kind's RoPE and hands every
layer its own ``position_embeddings``, which the linear layer uses as is.

``layers: global`` (the default for Gemma 3, ``convert/config.py``) converts only the global layers; the local ones
keep the teacher's module unchanged, with a cache of their window's keys (``models/sliding.py``), so the whole
cache stays constant as the context grows.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from linearize.errors import UnsupportedArchitectureError
from linearize.models.base import Adapter, LinearizedAttention, LinearizedConfigMixin, LinearizedModelMixin
from linearize.modules.attention import HybridLinearAttention, LinearAttentionConfig


class LinearizedGemma3Attention(LinearizedAttention):
    """Drop-in replacement for ``Gemma3Attention``; the projections and q/k norms keep their names (and weights)."""

    def __init__(self, base: nn.Module, cfg: LinearAttentionConfig, layer_idx: int):
        super().__init__()
        config = base.config
        for name, what in (("attn_logit_softcapping", "caps attention logits with tanh"),
                           ("use_bidirectional_attention", "attends in both directions")):
            if getattr(config, name, None):
                raise UnsupportedArchitectureError(
                    f"this Gemma 3 model sets {name}={getattr(config, name)!r} (it {what}); linear attention here is "
                    "causal and uncapped, so it cannot stand in for that attention")
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = base.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.q_norm, self.k_norm = base.q_norm, base.k_norm
        self.linear_attn = HybridLinearAttention(cfg, self.num_heads, self.num_kv_heads, self.head_dim, base.scaling)
        self.linear_attn.to(device=base.q_proj.weight.device)

    def qkv(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None):
        """hidden [B, T, C] -> q [B, H, T, d], k/v [B, Hk, T, d]: project, norm each head, then this layer kind's
        RoPE (as Gemma 3)."""
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape).transpose(1, 2))
        k = self.k_norm(self.k_proj(hidden_states).view(shape).transpose(1, 2))
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v


GEMMA3_ADAPTER = Adapter(
    name="gemma3",
    base_model_types=("gemma3_text",),
    layers_path="model.layers",
    attention_attr="self_attn",
    build=LinearizedGemma3Attention,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
)


@strict
class LinearizedGemma3TextConfig(LinearizedConfigMixin, Gemma3TextConfig):
    model_type = "linearized_gemma3_text"
    linearize: dict | None = None


class LinearizedGemma3ForCausalLM(LinearizedModelMixin, Gemma3ForCausalLM):
    config_class = LinearizedGemma3TextConfig
    adapter = GEMMA3_ADAPTER


CLASSES = {"gemma3_text": (LinearizedGemma3TextConfig, LinearizedGemma3ForCausalLM)}
