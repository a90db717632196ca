"""Perplexity of a raw text file under the sliding-window protocol of fixed-length models.

The protocol is the one in the transformers guide "Perplexity of fixed-length models": the text is tokenized once
as a single stream (with the tokenizer's default special tokens, so a Llama tokenizer puts one BOS at the very
start), then windows of ``context`` tokens start every ``stride`` tokens. Each window scores only the tokens that
the previous window did not reach, so with ``stride < context`` every scored token (after the first window) sees at
least ``context - stride`` tokens of history. The first token of a window is never a target (nothing precedes it in
that window), which with ``stride == context`` (non-overlapping blocks) drops one token per block, exactly as the
guide's ``labels``-shifted loss does. The last window ends at the end of the text, so nothing is dropped at the tail.
(The guide weights each window's mean loss by ``valid labels - 1``; for overlapping windows, whose first label is
masked, the loss averages over all the valid labels, so that count is one short per window. Here every scored token
weighs the same.)

    from linearize.eval import file_perplexity
    r = file_perplexity(model, tok, "wiki.valid.raw", context=1024, stride=512)
    r["ppl"], r["nll"], r["tokens"]

The file is read as it is (UTF-8). WikiText numbers published with the HF ``datasets`` rows joined by ``"\\n\\n"``
use a slightly different string, so they differ from a raw-file number in the last digits.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from linearize.errors import ConfigError, DataError
from linearize.eval.scoring import score_spans
from linearize.io.loading import context_length
from linearize.run.progress import Progress, QuietProgress

__all__ = ["file_perplexity", "sliding_windows", "text_perplexity"]


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
    limit = context_length(model.config)
    if limit is not None and context > limit:
        raise ConfigError(f"context={context} is longer than the model's max_position_embeddings={limit}; "
                          f"pass context <= {limit}")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    windows = sliding_windows(len(ids), context, stride)
    scores = score_spans(model, [ids[b:e] for b, e, _ in windows], [[(f - b, e - b)] for b, e, f in windows],
                         batch_size=batch_size, progress=progress, name=f"perplexity (context {context})")
    nll = -sum(s[0].logprob for s in scores)
    n = sum(s[0].tokens for s in scores)
    return {"ppl": math.exp(nll / n), "nll": nll, "tokens": n, "windows": len(windows), "context": context,
            "stride": stride}


def file_perplexity(model: nn.Module, tokenizer, path: str | Path, **kwargs) -> dict:
    """:func:`text_perplexity` of the UTF-8 text file ``path``; the result also names the file (``"text"``).

    Raises:
        DataError: the file is missing, not UTF-8 or too short; plus what :func:`text_perplexity` raises.
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
    return {"text": str(path), **text_perplexity(model, tokenizer, text, **kwargs)}
