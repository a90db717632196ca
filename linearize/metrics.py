"""Quality measures of the training pipelines: KL and perplexity against the teacher on held-out blocks
(conversion, finetuning). ``linearize eval`` and its protocols live in ``linearize/eval/``."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.run.progress import Progress, QuietProgress

STATS_ROWS = 1024
"""Positions per chunk of :func:`next_token_stats` (fp32 log-probabilities of this many rows at a time: 0.5 GB at
Llama-3's 128k vocabulary, instead of 8 GB for a batch of 8 x 2048)."""


@torch.no_grad()
def next_token_stats(logits: Tensor, ids: Tensor, ref_logits: Tensor | None = None) -> dict[str, float]:
    """Sums over positions 0..L-2 predicting 1..L-1: NLL, and KL(ref || logits) when ``ref_logits`` is given;
    computed over chunks of :data:`STATS_ROWS` positions, so the fp32 log-softmax never spans the whole batch."""
    V = logits.shape[-1]
    flat = logits[:, :-1].reshape(-1, V)
    tgt = ids[:, 1:].reshape(-1)
    ref_flat = None if ref_logits is None else ref_logits[:, :-1].reshape(-1, V)
    nll = torch.zeros((), dtype=torch.float64, device=logits.device)
    kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    for r0 in range(0, flat.shape[0], STATS_ROWS):
        rows = slice(r0, r0 + STATS_ROWS)
        lp = F.log_softmax(flat[rows].float(), dim=-1)
        nll -= lp.gather(-1, tgt[rows, None]).sum().double()
        if ref_flat is not None:
            ref = F.log_softmax(ref_flat[rows].float(), dim=-1)
            kl += (ref.exp() * (ref - lp)).sum().double()
    out = {"nll": nll.item(), "n": tgt.numel()}
    if ref_flat is not None:
        out["kl"] = kl.item()
    return out


TEACHER_CACHE_BYTES = 2 << 30
"""What a :class:`TeacherLogits` keeps at most (the teacher's logits over held-out blocks); past it, recomputed."""


class TeacherLogits:
    """The teacher's logits (and its NLL) on held-out batches, kept between :func:`compare_to_teacher` calls that
    change only the student (the layer selections measure the same blocks 30-60 times), so that each call runs the
    student alone. Entries are keyed by the batch and the scored span; at most ``max_bytes`` are kept (on the
    logits' device), later batches are recomputed. The teacher must not change while it is in use."""

    def __init__(self, max_bytes: int = TEACHER_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._kept: dict[tuple, tuple[Tensor, dict[str, float]]] = {}

    def get(self, key: tuple) -> tuple[Tensor, dict[str, float]] | None:
        return self._kept.get(key)

    def put(self, key: tuple, logits: Tensor, stats: dict[str, float]) -> None:
        size = logits.numel() * logits.element_size()
        if self.bytes + size <= self.max_bytes:
            self._kept[key] = (logits, stats)
            self.bytes += size


@torch.no_grad()
def compare_to_teacher(model: nn.Module, teacher_ctx, student_ctx, blocks: Tensor, batch_size: int = 8,
                       progress: Progress | None = None, span: tuple[int, int] | None = None,
                       teacher_logits: TeacherLogits | None = None) -> dict[str, float]:
    """Next-token KL(teacher || student) per token and both perplexities on ``blocks``.

    ``teacher_ctx`` / ``student_ctx`` are zero-argument callables returning context managers that install the
    teacher's or the student's attention modules in ``model`` (see ``convert.transfer.installed``). ``span``
    ``(start, stop)``: score only the predictions of tokens ``start .. stop - 1`` (``start >= 1``).
    ``teacher_logits``: reuse (and keep) the teacher's logits of earlier calls on the same ``blocks``.
    """
    first, last = (1, blocks.shape[1]) if span is None else span
    if not 1 <= first < last <= blocks.shape[1]:
        raise ValueError(f"span {span} must satisfy 1 <= start < stop <= {blocks.shape[1]}")
    device = next(model.parameters()).device
    t_nll = s_nll = kl = 0.0
    n = 0
    starts = range(0, blocks.shape[0], batch_size)
    with (progress or QuietProgress()).task("comparing the model with its teacher", len(starts), "batches") as task:
        for done, b0 in enumerate(starts, 1):
            ids = blocks[b0 : b0 + batch_size].to(device)
            rows = slice(first - 1, last)  # the logits at first - 1 .. last - 2 predict tokens first .. last - 1
            key = (tuple(blocks.shape), b0, batch_size, first, last)
            kept = teacher_logits.get(key) if teacher_logits is not None else None
            if kept is None:
                with (teacher_ctx or nullcontext)():
                    t_logits = model(input_ids=ids, use_cache=False).logits[:, rows].contiguous()  # a span: a copy
                tt = next_token_stats(t_logits, ids[:, rows])
                if teacher_logits is not None:
                    teacher_logits.put(key, t_logits, tt)
            else:
                t_logits, tt = kept
            with (student_ctx or nullcontext)():
                s_logits = model(input_ids=ids, use_cache=False).logits
            st = next_token_stats(s_logits[:, rows], ids[:, rows], t_logits)
            t_nll, s_nll, kl, n = t_nll + tt["nll"], s_nll + st["nll"], kl + st["kl"], n + st["n"]
            task.update(done)
    ppl_t, ppl_s = math.exp(t_nll / n), math.exp(s_nll / n)
    return {"kl": kl / n, "ppl_teacher": ppl_t, "ppl_student": ppl_s, "ppl_ratio": ppl_s / ppl_t, "tokens": n}


def text_blocks(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """Tokenise ``text`` as one stream and cut it into non-overlapping blocks [N, seq_len] (the tail is dropped)."""
    # verbose=False: one long stream, cut into blocks below (no "longer than the maximum sequence length" warning)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        from linearize.errors import DataError

        raise DataError(f"text has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)
