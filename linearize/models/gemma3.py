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
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from linearize.errors import UnsupportedArchitectureError
from linearize.models.base import Adapter, LinearizedConfigMixin, LinearizedModelMixin
from linearize.models.qwen3 import LinearizedQwen3Attention
from linearize.modules.attention import LinearAttentionConfig


class LinearizedGemma3Attention(LinearizedQwen3Attention):
    """Drop-in replacement for ``Gemma3Attention``; the projections and q/k norms keep their names (and weights). Its
    q/k/v are Qwen3's (per-head norms, then RoPE: here each layer kind's, as the model hands it over); the scale
    comes from ``base.scaling``."""

    def __init__(self, base: nn.Module, cfg: LinearAttentionConfig, layer_idx: int):
        config = base.config
        for name, what in (("attn_logit_softcapping", "caps attention logits with tanh"),
                           ("use_bidirectional_attention", "attends in both directions")):
            if getattr(config, name, None):
                raise UnsupportedArchitectureError(
                    f"this Gemma 3 model sets {name}={getattr(config, name)!r} (it {what}); linear attention here is "
                    "causal and uncapped, so it cannot stand in for that attention")
        super().__init__(base, cfg, layer_idx)


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
