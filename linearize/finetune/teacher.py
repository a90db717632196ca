"""The distillation teacher.

``shared_teacher(model)`` turns a LoRA-wrapped linearized model back into its softmax teacher for the duration of a
``with`` block, without a second copy of the weights: LoRA is disabled (peft's ``disable_adapter``), so q/k/v/o are
the teacher's own frozen projections, and every linear attention computes the exact causal softmax attention on
the same q, k, v instead (``HybridLinearAttention.exact_softmax_attention``, fp32 math). Layers listed in
``softmax_layers`` are softmax already. The cost is one extra forward per step; use it with ``use_cache=False``
on packed sequences (no padding).

``separate`` mode loads the original checkpoint as a second model instead: one more copy of the weights in memory
(2 bytes per parameter in bf16: +16 GB for an 8B model), for when the base weights were changed (e.g. a model that
was finetuned before).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from linearize.modules.attention import linear_attention_layers


@contextlib.contextmanager
def exact_softmax(model: nn.Module) -> Iterator[None]:
    """Inside the block, every linear attention layer of ``model`` computes exact causal softmax attention."""
    layers = linear_attention_layers(model)
    for la in layers:
        la.exact_softmax = True
    try:
        yield
    finally:
        for la in layers:
            la.exact_softmax = False


@contextlib.contextmanager
def shared_teacher(peft_model: nn.Module) -> Iterator[None]:
    """LoRA off + softmax attention + eval mode (no dropout), restored on exit."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), exact_softmax(peft_model):
            yield
    finally:
        peft_model.train(was_training)
