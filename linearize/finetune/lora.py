"""LoRA (peft) on a linearized model: per-architecture target defaults, target checks that name the candidates,
and which parameters train.

Target defaults are the attention projections (LoLCATs stage 2). GPT-2 fuses q/k/v into ``attn.c_attn`` and uses
``Conv1D`` layers whose weight is stored [in, out]; peft needs ``fan_in_fan_out=True`` for those, and the target
names carry the ``attn.`` prefix so the MLP's own ``c_proj`` is not adapted too (peft matches by name suffix).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from linearize.errors import ConfigError
from linearize.recipes import LoraSection

#: base model_type -> LoRA target module names (matched as suffixes of the full module names)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}
#: architectures whose projections are transformers' Conv1D ([in, out] weights)
FAN_IN_FAN_OUT = {"gpt2"}

FEATURE_MAP_MARKER = ".linear_attn."


def base_model_type(model: nn.Module) -> str:
    lin = getattr(model.config, "linearize", None) or {}
    return lin.get("base_model_type") or model.config.model_type.removeprefix("linearized_")


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The target names to use, checked against the model's linear layers.

    Raises:
        ConfigError: the architecture has no default, or a name matches no Linear/Conv1D module (the message lists
            the layer names that exist).
    """
    kind = base_model_type(model)
    if targets is None:
        if kind not in DEFAULT_TARGETS:
            raise ConfigError(f"no default LoRA targets for architecture {kind!r}; set finetune.lora.target_modules "
                              f"(defaults exist for {', '.join(sorted(DEFAULT_TARGETS))})")
        targets = DEFAULT_TARGETS[kind]
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({".".join(n.split(".")[-2:]) for n in names})
        raise ConfigError(f"finetune.lora.target_modules {missing} match no linear layer of this {kind} model; "
                          f"candidates (suffixes): {', '.join(leaves)}")
    return list(targets)


def apply_lora(model: nn.Module, lora: LoraSection, *, train_feature_maps: bool, seed: int) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; everything else frozen except, when asked, ``*.linear_attn.*``.

    LoRA A matrices are initialised from ``seed`` (B starts at zero, so the wrapped model equals the base).
    """
    targets = resolve_targets(model, lora.target_modules)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        fan_in_fan_out=base_model_type(model) in FAN_IN_FAN_OUT, task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if FEATURE_MAP_MARKER in name and "lora_" not in name:
            p.requires_grad_(train_feature_maps)
            if train_feature_maps and p.dtype != torch.float32:
                p.data = p.data.float()  # optimise in fp32; bf16 autocast still runs the matmuls in bf16
    return peft_model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs that train, in a fixed order (the optimizer's and the checkpoint's)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
