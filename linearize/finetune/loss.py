"""Finetuning losses without full-vocabulary logits: the model's forward returns its final hidden states, and the
LM head runs on one chunk of rows (positions of the flattened micro-batch) at a time.

:func:`hidden_states_out` swaps the output embedding of a transformers causal LM for an identity for the duration
of a ``with`` block, so the ordinary call ``model(input_ids=...)`` -- through peft, DDP and accelerate's autocast
wrapper alike -- returns the final hidden states [B, T, d] as ``.logits``. :func:`chunked_loss` then computes
``head(rows)`` per chunk inside ``torch.utils.checkpoint`` (non-reentrant): a chunk's logits, log-probabilities
and the teacher's are freed as soon as its summed losses are known, and the backward pass recomputes them one
chunk at a time. The head is the real module, so a LoRA-adapted ``lm_head`` and tied embeddings get their
gradients as before. Memory for the loss: ``chunk x vocab`` logits (+ their fp32 log-softmax temporaries) instead
of ``B x T x vocab`` several times over; the cost is one more head matmul per chunk (the recomputation) plus the
teacher's.

Only models whose forward is known to end in ``logits = lm_head(hidden_states)`` with nothing after it (no
softcapping, no scaling) take this path (:func:`plain_head`): Llama, Mistral, Qwen2 and GPT-2 in every supported
transformers version. Anything else falls back to the full-logits functions :func:`next_token_loss` and
:func:`distill_loss`, which define the loss:
``(1 - w) * CE + w * T^2 * KL(teacher_T || student_T)``, mean over positions 0..L-2 of every sequence.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from linearize.models.base import LinearizedModelMixin

#: Causal LMs whose ``forward`` computes ``logits = self.lm_head(hidden_states)`` and returns them unchanged, checked
#: in transformers 5.17 and 5.24 (the linearized subclasses call these forwards).
PLAIN_HEAD_MODELS: tuple[type, ...] = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model``: a PeftModel's base model, else ``model`` (unwrap DDP first,
    ``accelerator.unwrap_model``)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def plain_head(lm: nn.Module) -> nn.Module | None:
    """``lm``'s output embedding when its forward is known to apply it as ``lm_head(hidden)`` with nothing after it
    (the forward it runs is one of :data:`PLAIN_HEAD_MODELS`); None otherwise (use the full logits)."""
    for klass in type(lm).__mro__:
        if "forward" in vars(klass) and klass is not LinearizedModelMixin:
            if klass not in PLAIN_HEAD_MODELS:
                return None
            break
    else:
        return None
    return lm.get_output_embeddings()


def frozen_head(head: nn.Module) -> nn.Module:
    """The head without its adapter (the shared teacher's head when ``lm_head`` is a LoRA target)."""
    return head.get_base_layer() if isinstance(head, BaseTunerLayer) else head


@contextlib.contextmanager
def hidden_states_out(lm: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``lm``'s forward returns its final hidden states [B, T, d] as ``.logits`` (its output
    embedding is an identity); yields the real head. Nests (an inner block yields the identity)."""
    head = lm.get_output_embeddings()
    lm.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        lm.set_output_embeddings(head)


# ---------------------------------------------------------------------------------------------------------------
# Full-logits path (the definition; used with loss_chunk=0 and for models without a plain head)
# ---------------------------------------------------------------------------------------------------------------
def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher_T || student_T), mean over positions 0..L-2."""
    s = F.log_softmax(student[:, :-1].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[:, :-1].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


# ---------------------------------------------------------------------------------------------------------------
# Chunked path
# ---------------------------------------------------------------------------------------------------------------
def _rows(hidden: Tensor) -> Tensor:
    """[B, T, d] -> the rows that predict a next token, [B * (T - 1), d]."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


def _chunk_losses(h: Tensor, targets: Tensor, teacher_h: Tensor | None, head: nn.Module,
                  teacher_head: nn.Module | None, temperature: float,
                  autocast: Callable[[], AbstractContextManager]) -> tuple[Tensor, Tensor]:
    """(summed cross-entropy, summed KL(teacher_T || student_T)) of one chunk of rows, fp32."""
    with autocast():
        logits = head(h)
    logits = logits.float()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if teacher_h is None:
        return ce, ce.new_zeros(())
    s = F.log_softmax(logits / temperature, dim=-1)
    with torch.no_grad():
        with autocast():
            t_logits = teacher_head(teacher_h)
        t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    return ce, (t.exp() * (t - s)).sum()


def chunked_loss(hidden: Tensor, ids: Tensor, head: nn.Module, *, chunk: int, teacher_hidden: Tensor | None = None,
                 teacher_head: nn.Module | None = None, kd_weight: float = 0.0, temperature: float = 1.0,
                 autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Tensor:
    """The micro-batch loss from final hidden states: mean next-token cross-entropy, and with ``teacher_hidden``
    ``(1 - kd_weight) * CE + kd_weight * T^2 * KL`` -- the full-logits formula, ``chunk`` rows of logits at a time.

    Args:
        hidden: the student's final hidden states [B, T, d] (with grad).
        ids: the tokens [B, T].
        head: the student's LM head (the real module: LoRA on it trains).
        chunk: rows (positions of the flattened micro-batch) per chunk, > 0.
        teacher_hidden / teacher_head: the teacher's final hidden states [B, T, d] (no grad) and its head.
        autocast: the context the model's forward runs its matmuls under (``accelerator.autocast``).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    rows, targets = _rows(hidden), ids[:, 1:].reshape(-1)
    n = targets.numel()
    parts = zip(rows.split(chunk), targets.split(chunk),
                _rows(teacher_hidden).split(chunk) if teacher_hidden is not None else itertools.repeat(None))
    ce = kd = hidden.new_zeros((), dtype=torch.float32)
    for h, y, th in parts:
        c, k = checkpoint(_chunk_losses, h, y, th, head, teacher_head, temperature, autocast, use_reentrant=False)
        ce, kd = ce + c, kd + k
    ce = ce / n
    if teacher_hidden is None:
        return ce
    return (1 - kd_weight) * ce + kd_weight * (kd / n) * temperature**2


@torch.no_grad()
def chunked_nll(hidden: Tensor, ids: Tensor, head: nn.Module, *, chunk: int,
                autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Tensor:
    """Summed next-token negative log-likelihood (fp64 scalar) of ``ids`` [B, T] from final hidden states, ``chunk``
    rows of logits at a time (no grad: nothing is kept)."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for h, y in zip(_rows(hidden).split(chunk), ids[:, 1:].reshape(-1).split(chunk)):
        with autocast():
            logits = head(h)
        total += F.cross_entropy(logits.float(), y, reduction="sum").double()
    return total


__all__ = ["PLAIN_HEAD_MODELS", "causal_lm", "chunked_loss", "chunked_nll", "distill_loss", "frozen_head",
           "hidden_states_out", "next_token_loss", "plain_head"]
