"""LoRA (peft) on a linearized model: target checks that name the candidates, and which parameters train.

Target defaults are the attention projections (LoLCATs stage 2), declared by each architecture's adapter
(``Adapter.lora_targets``, ``Adapter.fan_in_fan_out`` for GPT-2's ``Conv1D`` layers).
"""

from __future__ import annotations

import peft
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from linearize.errors import ConfigError
from linearize.finetune.config import LoRAConfig
from linearize.models import adapter_for
from linearize.modules.attention import linear_attention_layers


def base_model_type(model: nn.Module) -> str:
    lin = getattr(model.config, "linearize", None) or {}
    return lin.get("base_model_type") or model.config.model_type.removeprefix("linearized_")


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The target names to use, checked against the model's linear layers.

    Raises:
        ConfigError: a name matches no Linear/Conv1D module (the message lists the layer names that exist).
    """
    kind = base_model_type(model)
    if targets is None:
        targets = list(adapter_for(kind).lora_targets)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({".".join(n.split(".")[-2:]) for n in names})
        raise ConfigError(f"finetune.lora.target_modules {missing} match no linear layer of this {kind} model; "
                          f"candidates (suffixes): {', '.join(leaves)}")
    return list(targets)


def apply_lora(model: nn.Module, lora: LoRAConfig, *, train_feature_maps: bool, seed: int) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; everything else frozen except, when asked, the
    feature maps and mix factors (every ``HybridLinearAttention``).

    LoRA A matrices are initialised from ``seed`` (B starts at zero, so the wrapped model equals the base).
    """
    targets = resolve_targets(model, lora.target_modules)
    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        fan_in_fan_out=adapter_for(base_model_type(model)).fan_in_fan_out, task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    for la in linear_attention_layers(peft_model):
        for p in la.parameters():
            p.requires_grad_(train_feature_maps)
            if train_feature_maps and p.dtype != torch.float32:
                p.data = p.data.float()  # optimise in fp32; bf16 autocast still runs the matmuls in bf16
    return peft_model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs that train, in a fixed order (the optimizer's and the checkpoint's)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
