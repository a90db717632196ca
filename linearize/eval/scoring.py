"""Teacher-forced scoring shared by every eval: log-probabilities of chosen token spans, batched.

Each request is one token sequence plus the spans of it to score; a span ``(start, end)`` scores tokens
``ids[start:end]``, each predicted from the logits one position earlier, so ``start >= 1``. Sequences are sorted by
length (longest first, so a batch is padded to its first member) and right-padded without an attention mask: in a
causal model, softmax or linearized, a pad token placed after the last real token cannot change the logits of any
earlier position, so padding is exact. That is also how lm-evaluation-harness batches its loglikelihood requests.

Only the positions that are scored reach the LM head (``logits_to_keep`` with the positions' indices, which
transformers' causal LMs and the linearized classes accept) and go through ``log_softmax`` in fp32: a passkey
prompt of 16k tokens scores five digits, not [B, 16k, vocab] logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from linearize.errors import ConfigError
from linearize.run.progress import Progress, QuietProgress

__all__ = ["SpanScore", "model_device", "score_spans"]


@dataclass(frozen=True)
class SpanScore:
    """One scored span."""

    logprob: float
    """Sum of log P(token | everything before it) over the span."""
    greedy: bool
    """Every token of the span is the argmax of its prediction (what greedy decoding would produce)."""
    tokens: int
    """Number of tokens in the span."""
    token_logprobs: tuple[float, ...] | None = None
    """log P of each token of the span, in order (only with ``score_spans(..., per_token=True)``)."""


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_spans(
    model: nn.Module,
    sequences: list[list[int]],
    spans: list[list[tuple[int, int]]],
    *,
    batch_size: int = 8,
    progress: Progress = QuietProgress(),
    name: str = "scoring",
    per_token: bool = False,
) -> list[list[SpanScore]]:
    """Score ``spans[i]`` of ``sequences[i]`` for every i, ``batch_size`` sequences per forward pass.

    The last token of a sequence is only ever a target, so the model sees ``sequences[i][:-1]``. With
    ``per_token``, each :class:`SpanScore` also keeps its tokens' own log-probabilities (``token_logprobs``).

    Returns:
        ``out[i][j]``: the :class:`SpanScore` of ``spans[i][j]``, in the order given.

    Raises:
        ConfigError: a span is empty, starts before position 1 or ends past its sequence; ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if len(sequences) != len(spans):
        raise ConfigError(f"{len(sequences)} sequences but {len(spans)} span lists; pass one span list per sequence")
    for i, (seq, sp) in enumerate(zip(sequences, spans)):
        for start, end in sp:
            if not 1 <= start < end <= len(seq):
                raise ConfigError(f"span ({start}, {end}) of sequence {i} (length {len(seq)}) must satisfy "
                                  "1 <= start < end <= length")
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[list[SpanScore] | None] = [None] * len(sequences)
    with progress.task(name, total=len(sequences), unit="seq") as task:
        for b0 in range(0, len(order), batch_size):
            batch = order[b0 : b0 + batch_size]
            width = len(sequences[batch[0]]) - 1
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                seq = sequences[i][:-1]
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            # positions whose logits are read, over the whole batch; the rest never reach the LM head
            keep = sorted({p for i in batch for start, end in spans[i] for p in range(start - 1, end - 1)})
            if len(keep) < width:
                kwargs = {"logits_to_keep": torch.tensor(keep, device=device)}
                column = {p: c for c, p in enumerate(keep)}
            else:
                kwargs, column = {}, {p: p for p in range(width)}
            logits = model(input_ids=ids.to(device), use_cache=False, **kwargs).logits  # [B, len(keep) or width, V]
            for row, i in enumerate(batch):
                target = torch.tensor(sequences[i], dtype=torch.long, device=device)
                scores = []
                for start, end in spans[i]:
                    cols = [column[p] for p in range(start - 1, end - 1)]
                    lp = F.log_softmax(logits[row, cols].float(), dim=-1)  # [n, V]
                    tgt = target[start:end]
                    each = lp.gather(-1, tgt[:, None])[:, 0]  # [n]
                    scores.append(SpanScore(logprob=each.sum().item(), greedy=bool((lp.argmax(-1) == tgt).all()),
                                            tokens=end - start,
                                            token_logprobs=tuple(each.tolist()) if per_token else None))
                out[i] = scores
            task.update(min(b0 + batch_size, len(order)))
    return out  # type: ignore[return-value]
