"""The distillation teacher.

``shared_teacher(model)`` turns a LoRA-wrapped linearized model back into its softmax teacher for the duration of a
``with`` block, without a second copy of the weights: LoRA is disabled (peft's ``disable_adapter``), so q/k/v/o are
the teacher's own frozen projections, and every linear attention computes the exact causal softmax attention on
the same q, k, v instead (``HybridLinearAttention.softmax_attention``, fp32 math). Layers listed in
``softmax_layers`` are softmax already. The cost is one extra forward per step; use it with ``use_cache=False``
on packed sequences (no padding).

``separate`` mode loads the original checkpoint as a second model instead: one more copy of the weights in memory
(2 bytes per parameter in bf16: +16 GB for an 8B model), for when the base weights were changed (e.g. a model that
was finetuned before).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor, nn

from linearize.errors import LinearizeError


def _softmax_forward(la: nn.Module):
    def forward(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, cache_layer=None) -> Tensor:
        if cache_layer is not None:
            raise LinearizeError("the shared softmax teacher runs without a cache; call the model with use_cache=False")
        if key_mask is not None and not bool(key_mask.all()):
            raise LinearizeError("the shared softmax teacher does not handle padded batches; pack the sequences")
        return la.softmax_attention(q, k, v)

    return forward


@contextlib.contextmanager
def softmax_attention(model: nn.Module) -> Iterator[None]:
    """Inside the block, every ``linear_attn`` module of ``model`` computes exact causal softmax attention."""
    patched = [m.linear_attn for m in model.modules() if hasattr(m, "linear_attn")]
    for la in patched:
        la.forward = _softmax_forward(la)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for la in patched:
            del la.forward


@contextlib.contextmanager
def shared_teacher(peft_model: nn.Module) -> Iterator[None]:
    """LoRA off + softmax attention + eval mode (no dropout), restored on exit."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), softmax_attention(peft_model):
            yield
    finally:
        peft_model.train(was_training)
