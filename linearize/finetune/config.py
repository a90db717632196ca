"""The settings of LoRA finetuning (stage 2), defined once: the recipe's ``finetune`` section is
:class:`FinetuneConfig` (``--set finetune.<key>=<value>`` on the command line)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from linearize.settings import LoopConfig, Settings, one_or_many


class LoRAConfig(Settings):
    """LoRA adapters (peft) on the linearized model."""

    rank: int = Field(8, gt=0)
    """LoRA rank r (LoLCATs: 8)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator; the update is (alpha / rank) * B @ A (LoLCATs: 16)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input (LoLCATs: 0)."""
    target_modules: list[str] | None = None
    """Module names to adapt; null = the attention projections of the architecture (llama/mistral/qwen2:
    q_proj, k_proj, v_proj, o_proj; gpt2: attn.c_attn, attn.c_proj)."""


class DistillConfig(Settings):
    """Distillation from the teacher's next-token distribution, added to the next-token loss."""

    weight: float = Field(0.5, ge=0, le=1)
    """loss = (1 - weight) * cross-entropy + weight * T^2 * KL(teacher_T || student_T)."""
    temperature: float = Field(1.0, gt=0)
    """Softening temperature T of both distributions."""
    teacher: Literal["shared", "separate"] = "shared"
    """shared: the student's own frozen base weights with exact softmax attention and LoRA disabled (no extra
    memory; one more forward per step). separate: load the original teacher as a second model (one more copy of
    the weights, e.g. +16 GB for an 8B model in bf16)."""


class FinetuneConfig(LoopConfig):
    """Stage 2: LoRA finetuning of the linearized model (next-token loss, optional distillation)."""

    lora: LoRAConfig = LoRAConfig()
    train_feature_maps: bool = False
    """Also train the feature maps and mix factors; LoLCATs keeps them frozen."""
    data: str | list[str] | None = None
    """Training text or instruction data (file, folder or dataset name; chat template applied where the
    tokenizer has one), or a list of them mixed evenly by characters; null = text sampled from the teacher."""
    chat_template: bool | None = None
    """Render instruction/chat records with the tokenizer's chat template; null = when the tokenizer has one."""
    tokens: int = Field(1_000_000, gt=0)
    """Training tokens (one pass); steps = tokens // (batch_size * seq_len)."""
    seq_len: int = Field(1024, gt=0)
    """Tokens per packed training sequence."""
    val_tokens: int | None = Field(None, gt=0)
    """Held-out tokens for validation loss before/after (default 5% of tokens, at least 4 sequences)."""
    batch_size: int = Field(8, gt=0)
    """Sequences per optimizer step, summed over all processes."""
    micro_batch_size: int | None = Field(None, gt=0)
    """Sequences per forward on each process (gradient accumulation); default: batch_size / processes."""
    kd: DistillConfig | None = None
    """Distillation from the teacher's logits; null = plain next-token loss."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    loss_chunk: int = Field(1024, ge=0)
    """Rows (positions of the flattened micro-batch) of logits that exist at a time in the loss: the forward
    returns hidden states and the LM head runs chunk by chunk, recomputed in the backward pass (about
    loss_chunk x vocab x 4 bytes a copy instead of micro_batch_size x seq_len x vocab x 4); 0 = full logits."""
    eval_batch_size: int = Field(8, gt=0)
    """Sequences per forward when measuring validation loss."""

    _data = one_or_many("data")

    def problems(self) -> list[str]:
        """Checks across fields, as ``finetune.<key>`` phrases (empty when consistent)."""
        out = []
        if self.tokens < self.seq_len * self.batch_size:
            out.append(f"finetune.tokens={self.tokens:,} is less than one step (batch_size * seq_len = "
                       f"{self.batch_size * self.seq_len:,}); raise finetune.tokens or lower finetune.batch_size")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            out.append(f"finetune.micro_batch_size={self.micro_batch_size} must divide "
                       f"finetune.batch_size={self.batch_size}")
        if self.lora.target_modules is not None and not self.lora.target_modules:
            out.append("finetune.lora.target_modules is empty; list module names or use null for the defaults")
        return out


__all__ = ["DistillConfig", "FinetuneConfig", "LoRAConfig"]
