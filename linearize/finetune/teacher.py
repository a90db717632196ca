"""The distillation teacher.

``shared_teacher(model)`` turns a LoRA-wrapped linearized model back into its softmax teacher for the duration of a
``with`` block, without a second copy of the weights: LoRA is disabled (peft's ``disable_adapter``), so q/k/v/o are
the teacher's own frozen projections, and every linear attention computes the exact causal softmax attention on
the same q, k, v instead (``HybridLinearAttention.exact_softmax_attention``, computed as the base attention computes it). Layers listed in
``softmax_layers`` are softmax already. The cost is one extra forward per step; use it with ``use_cache=False``
on packed sequences (no padding).

``separate`` mode loads the original checkpoint as a second model instead: one more copy of the weights in memory
(2 bytes per parameter in bf16: +16 GB for an 8B model), for when the base weights were changed (e.g. a model that
was finetuned before).

Training calls the teacher through :class:`Teacher`: its final hidden states and its LM head, so that its logits
are computed a chunk of rows at a time (``linearize.finetune.loss``), or its full logits where the model's head is
not a plain ``lm_head(hidden)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from torch import Tensor, nn

from linearize.finetune.loss import causal_lm, frozen_head, hidden_states_out, plain_head
from linearize.modules.attention import exact_softmax, linear_attention_layers


@contextlib.contextmanager
def shared_teacher(peft_model: nn.Module) -> Iterator[None]:
    """LoRA off + softmax attention + eval mode (no dropout), restored on exit."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), exact_softmax(linear_attention_layers(peft_model)):
            yield
    finally:
        peft_model.train(was_training)


@dataclass(frozen=True)
class Teacher:
    """The distillation teacher as the training step calls it (always under ``torch.no_grad()``)."""

    forward: Callable[[Tensor], Tensor]
    """ids [B, T] -> ``.logits`` of the teacher's forward, run in the teacher's context."""
    lm: nn.Module
    """The transformers causal LM that ``forward`` runs (its output embedding is swapped for :meth:`hidden`)."""
    head: nn.Module | None
    """The teacher's LM head on final hidden states; None when ``lm`` has no plain ``lm_head(hidden)`` (then only
    :meth:`logits` works)."""

    def logits(self, ids: Tensor) -> Tensor:
        """Full logits [B, T, V]."""
        return self.forward(ids)

    def hidden(self, ids: Tensor) -> Tensor:
        """Final hidden states [B, T, d] (apply :attr:`head` to rows of them for logits)."""
        with hidden_states_out(self.lm):
            return self.forward(ids)


def shared(wrapped: nn.Module, peft_model: nn.Module) -> Teacher:
    """The shared teacher: ``wrapped`` (``peft_model`` as ``accelerator.prepare`` returned it) called inside
    :func:`shared_teacher`. Its head is the student's without LoRA (the same module unless ``lm_head`` is a
    target)."""
    lm = causal_lm(peft_model)
    head = plain_head(lm)

    def forward(ids: Tensor) -> Tensor:
        with shared_teacher(peft_model):
            return wrapped(input_ids=ids, use_cache=False).logits

    return Teacher(forward, lm, frozen_head(head) if head is not None else None)


def separate(model: nn.Module, autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Teacher:
    """A teacher that is a model of its own (frozen; its forward runs under ``autocast``)."""
    model.requires_grad_(False)

    def forward(ids: Tensor) -> Tensor:
        with autocast():
            return model(input_ids=ids, use_cache=False).logits

    return Teacher(forward, model, plain_head(model))


__all__ = ["Teacher", "separate", "shared", "shared_teacher"]
