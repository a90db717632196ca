"""Perplexity of a raw text file under the sliding-window protocol of fixed-length models.

The protocol is the one in the transformers guide "Perplexity of fixed-length models": the text is tokenized once
as a single stream (with the tokenizer's default special tokens, so a Llama tokenizer puts one BOS at the very
start), then windows of ``context`` tokens start every ``stride`` tokens. Each window scores only the tokens that
the previous window did not reach, so with ``stride < context`` every scored token (after the first window) sees at
least ``context - stride`` tokens of history. The first token of a window is never a target (nothing precedes it in
that window), which with ``stride == context`` (non-overlapping blocks) drops one token per block, exactly as the
guide's ``labels``-shifted loss does. The last window ends at the end of the text, so nothing is dropped at the tail.
Where the tokenizer starts a text with BOS (Gemma, Llama-2; not SmolLM2 or GPT-2), every window starts with it: a
window's first token, never a target, is replaced by BOS, so each window reads like a document, as these models
were trained (Gemma 3 without it is several times worse). The tokens scored do not change.
(The guide weights each window's mean loss by ``valid labels - 1``; for overlapping windows, whose first label is
masked, the loss averages over all the valid labels, so that count is one short per window. Here every scored token
weighs the same.)

    from linearize.eval import file_perplexity
    r = file_perplexity(model, tok, "wiki.valid.raw", context=1024, stride=512)
    r["ppl"], r["nll"], r["tokens"]

The file is read as it is (UTF-8). WikiText numbers published with the HF ``datasets`` rows joined by ``"\\n\\n"``
use a slightly different string, so they differ from a raw-file number in the last digits.

:func:`distance_perplexity` is perplexity by distance: non-overlapping windows of ``context`` tokens, each token's
loss kept apart by its position in the window (power-of-two buckets 0-63, 64-127, ..., 2048-4095), plus one number
for the positions past a linearized model's exact part (sinks + window), where only the recurrent state can carry
what lies further back.

    r = distance_perplexity(model, tok, text, context=4096, max_tokens=65536, beyond=64 + 4)
    r["by_position"][-1]["ppl"], r["beyond"]["ppl"]
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from linearize.errors import ConfigError, DataError
from linearize.eval.scoring import score_spans
from linearize.io.loading import context_length
from linearize.run.progress import Progress, QuietProgress

__all__ = ["distance_perplexity", "file_perplexity", "position_buckets", "read_text_file", "sliding_windows",
           "text_perplexity"]


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` per window over ``n_tokens`` tokens: the window is ``ids[begin:end]`` and it
    scores ``ids[first_target:end]``. Every position 1..n_tokens-1 is scored at most once.

    Raises:
        ConfigError: ``context < 2`` or ``stride`` outside ``1..context``.
    """
    if context < 2:
        raise ConfigError(f"context={context} must be >= 2 tokens")
    if not 1 <= stride <= context:
        raise ConfigError(f"stride={stride} must be between 1 and context={context}")
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _text_ids(model: nn.Module, tokenizer, text: str, context: int, max_tokens: int | None) -> list[int]:
    """The token stream of ``text`` (its first ``max_tokens``), once ``context`` is known to fit the model."""
    limit = context_length(model.config)
    if limit is not None and context > limit:
        raise ConfigError(f"context={context} is longer than the model's max_position_embeddings={limit}; "
                          f"pass context <= {limit}")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    return ids


def _windows(ids: list[int], windows: list[tuple[int, int, int]], bos: int | None) -> list[list[int]]:
    """The token lists of ``windows`` over ``ids``; with ``bos`` (the stream starts with it) each window's first
    token, which is never scored, becomes BOS."""
    return [ids[b:e] if bos is None or b == 0 else [bos, *ids[b + 1:e]] for b, e, _ in windows]


def _leading_bos(tokenizer, ids: list[int]) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and ids and ids[0] == bos else None


def text_perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    context: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: Progress = QuietProgress(),
) -> dict:
    """Sliding-window perplexity of ``model`` on ``text`` (see the module docstring for the protocol).

    Args:
        context: window length in tokens (at most the model's ``max_position_embeddings``).
        stride: how far each window advances; ``stride == context`` gives non-overlapping blocks.
        max_tokens: keep only the first ``max_tokens`` tokens of the stream (None: all).
        batch_size: windows per forward pass.

    Returns:
        ``{"ppl", "nll", "tokens", "windows", "context", "stride"}``: ``nll`` is the summed negative log-likelihood
        in nats over the ``tokens`` scored, ``ppl = exp(nll / tokens)``.

    Raises:
        ConfigError: ``context`` longer than the model's maximum, bad ``stride``.
        DataError: the text has fewer than 2 tokens.
    """
    ids = _text_ids(model, tokenizer, text, context, max_tokens)
    windows = sliding_windows(len(ids), context, stride)
    scores = score_spans(model, _windows(ids, windows, _leading_bos(tokenizer, ids)),
                         [[(f - b, e - b)] for b, e, f in windows],
                         batch_size=batch_size, progress=progress, name=f"perplexity (context {context})")
    nll = -sum(s[0].logprob for s in scores)
    n = sum(s[0].tokens for s in scores)
    return {"ppl": math.exp(nll / n), "nll": nll, "tokens": n, "windows": len(windows), "context": context,
            "stride": stride}


def position_buckets(context: int) -> list[tuple[int, int]]:
    """``[start, end)`` position ranges with power-of-two edges covering a window of ``context`` tokens: (0, 64),
    (64, 128), (128, 256), ..., the last one cut at ``context``."""
    buckets, start, end = [], 0, 64
    while start < context:
        buckets.append((start, min(end, context)))
        start, end = end, 2 * end
    return buckets


def _nll_summary(nll: float, tokens: int) -> dict:
    return {"tokens": tokens, "nll": nll, "ppl": math.exp(nll / tokens) if tokens else None}


def distance_perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    context: int = 4096,
    max_tokens: int | None = 65536,
    beyond: int | None = None,
    batch_size: int = 8,
    progress: Progress = QuietProgress(),
) -> dict:
    """Perplexity by position within non-overlapping windows of ``context`` tokens over the first ``max_tokens``
    tokens of ``text``.

    A token's position is that of the query that predicts it (the token before it) in its window: a prediction at
    position ``p`` reads ``p + 1`` tokens of context. The first token of each window is never a target, so the
    tokens scored (and their summed loss) are exactly those of ``text_perplexity(..., stride=context)``.

    Args:
        beyond: where "beyond the window" starts: ``window + sinks`` of a linearized model, whose queries from that
            position on have keys in the recurrent state (None: no such number).

    Returns:
        ``{"ppl", "nll", "tokens", "windows", "context", "by_position", "beyond"}``: ``by_position`` one
        ``{"from", "to", "tokens", "nll", "ppl"}`` per bucket of :func:`position_buckets` that holds a token
        (positions ``from..to``, both included); ``beyond`` ``{"from", "tokens", "nll", "ppl"}`` over positions
        ``>= beyond`` (``ppl`` None when no token is that far in), or None.

    Raises:
        ConfigError: ``context`` longer than the model's maximum or shorter than 2.
        DataError: the text has fewer than 2 tokens.
    """
    if context < 2:
        raise ConfigError(f"context={context} must be >= 2 tokens")
    ids = _text_ids(model, tokenizer, text, context, max_tokens)
    windows = sliding_windows(len(ids), context, context)
    scores = score_spans(model, _windows(ids, windows, _leading_bos(tokenizer, ids)),
                         [[(1, e - b)] for b, e, _ in windows],
                         batch_size=batch_size, progress=progress, name=f"perplexity by distance (context {context})",
                         per_token=True)
    buckets = position_buckets(context)
    sums, counts = [0.0] * len(buckets), [0] * len(buckets)
    far_nll, far_n = 0.0, 0
    for (span,) in scores:
        for p, lp in enumerate(span.token_logprobs):  # the query at window position p predicts token p + 1
            k = max(0, p.bit_length() - 6)  # (0, 64) holds positions 0..63, then one bucket per power of two
            sums[k] -= lp
            counts[k] += 1
            if beyond is not None and p >= beyond:
                far_nll -= lp
                far_n += 1
    nll, n = sum(sums), sum(counts)
    return {"ppl": math.exp(nll / n), "nll": nll, "tokens": n, "windows": len(windows), "context": context,
            "by_position": [{"from": a, "to": b - 1, **_nll_summary(s, c)}
                            for (a, b), s, c in zip(buckets, sums, counts) if c],
            "beyond": None if beyond is None else {"from": beyond, **_nll_summary(far_nll, far_n)}}


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``.

    Raises:
        DataError: the file is missing, unreadable or not UTF-8 (the message says how to fix it).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file {path} does not exist; pass a raw text file (e.g. WikiText wiki.valid.raw)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {path} is not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from e
    except OSError as e:
        raise DataError(f"cannot read text file {path}: {e.strerror or e}") from e
    return text


def file_perplexity(model: nn.Module, tokenizer, path: str | Path, **kwargs) -> dict:
    """:func:`text_perplexity` of the UTF-8 text file ``path``; the result also names the file (``"text"``).

    Raises:
        DataError: the file is missing, not UTF-8 or too short; plus what :func:`text_perplexity` raises.
    """
    return {"text": str(Path(path).expanduser()),
            **text_perplexity(model, tokenizer, read_text_file(path), **kwargs)}
