"""Long-context recall, where a fixed-size recurrent state is known to lose to softmax attention's growing KV cache.

- :func:`passkey`: a 5-digit pass key is stated once inside filler text, at a chosen depth (0 = right after the
  opening instruction, 1 = right before the question) of a prompt of a chosen length in tokens; the model must
  complete "The pass key is" with it. An item counts when every token of the key is the argmax, teacher-forced:
  that is exactly when greedy decoding would write the key, without running ``generate``.
- :func:`mqar`: multi-query associative recall (Zoology's MQAR, arXiv:2312.04927) in natural text. ``N`` sentences
  "The code for <word> is <number>." are followed by the same N sentences in another order; the values of the second
  listing are scored teacher-forced, all in one pass. Accuracy is reported per N and per token distance between a
  value's first mention and the query that asks for it.

Both are seeded (``random.Random(seed)``), build prompts from the model's own tokenizer, skip (with the reason in
``"skipped"``) what does not fit in the model's ``max_position_embeddings``, and return plain JSON-ready dicts
(string keys).

    from linearize.eval import mqar, passkey
    passkey(model, tok, contexts=[1024, 4096], depths=[0.0, 0.5, 1.0], samples=4)["by_context"]
    mqar(model, tok, pairs=[4, 16, 64], samples=8)["by_pairs"]
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Sequence

from torch import nn

from linearize.errors import ConfigError
from linearize.eval.config import MQAR_KEYS
from linearize.eval.multiple_choice import encode_pair
from linearize.eval.scoring import score_spans
from linearize.io.loading import context_length
from linearize.run.progress import Progress, QuietProgress

__all__ = ["MQAR_KEYS", "mqar", "mqar_prompt", "passkey", "passkey_prompt"]

_INTRO = "Somewhere in the long text below there is a pass key. Remember it: you will be asked for it at the end.\n"
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = "\nWhat is the pass key? The pass key is"
# Plain, repetitive and free of digits, so the key is the only number in the prompt.
_FILLER = ("The morning was quiet and the road was empty. A cat slept in the sun by the door. "
           "Far away, a bell rang twice and then stopped. The wind moved the tall grass.")



def _words(n_tokens: int) -> list[str]:
    """Enough filler words for ``n_tokens`` tokens (every word is at least one token)."""
    unit = _FILLER.split()
    return (unit * (n_tokens // len(unit) + 1))[:n_tokens]


def _passkey_text(words: list[str], n: int, depth: float, key: str) -> tuple[str, int]:
    """The prompt with ``n`` filler words, ``round(depth * n)`` of them before the needle, and the needle's offset."""
    before = round(depth * n)
    head = _INTRO + " ".join(words[:before])
    head = head + " " if before else head
    tail = " ".join(words[before:n])
    text = head + _NEEDLE.format(key=key) + (" " + tail if tail else "") + _QUESTION
    return text, len(head)


def passkey_prompt(tokenizer, context: int, depth: float, key: str) -> dict:
    """The longest passkey prompt whose tokens, with the answer's, fit in ``context`` tokens.

    Filler is added word by word (binary search on the word count), so the total falls short of ``context`` by less
    than one word's tokens.

    Returns:
        ``{"text", "answer", "key", "depth", "filler_words", "words_before", "needle_char", "context_ids",
        "answer_ids"}``; ``answer`` is ``" " + key``, and ``context_ids + answer_ids`` is the scored sequence.

    Raises:
        ConfigError: ``depth`` outside [0, 1], or the prompt without any filler is already longer than ``context``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"passkey depth={depth} must be between 0 and 1")
    words = _words(context)
    answer = " " + key

    def build(n: int):
        text, needle_char = _passkey_text(words, n, depth, key)
        ctx, cont = encode_pair(tokenizer, text, answer)
        return text, needle_char, ctx, cont

    lo, hi = 0, len(words)
    if sum(map(len, build(0)[2:])) > context:
        raise ConfigError(_NO_ROOM.format(context=context))
    while lo < hi:  # the largest n that fits
        mid = (lo + hi + 1) // 2
        if sum(map(len, build(mid)[2:])) <= context:
            lo = mid
        else:
            hi = mid - 1
    text, needle_char, ctx, cont = build(lo)
    return {"text": text, "answer": answer, "key": key, "depth": depth, "filler_words": lo,
            "words_before": round(depth * lo), "needle_char": needle_char, "context_ids": ctx, "answer_ids": cont}


_NO_ROOM = "a passkey prompt does not fit in {context} tokens even without filler; use a longer context"


def _room_for_filler(tokenizer, context: int) -> bool:
    """Whether a passkey prompt without filler (and the longest key's answer) fits in ``context`` tokens."""
    text, _ = _passkey_text([], 0, 0.0, "00000")
    return sum(map(len, encode_pair(tokenizer, text, " 00000"))) <= context


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def passkey(
    model: nn.Module,
    tokenizer,
    *,
    contexts: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 4,
    progress: Progress = QuietProgress(),
) -> dict:
    """Passkey retrieval accuracy over a grid of prompt lengths (tokens) and needle depths.

    Each (context, depth) cell holds ``samples`` prompts with their own random 5-digit keys. Contexts longer than
    the model's ``max_position_embeddings``, or too short to hold the prompt without filler, are skipped and listed
    in ``"skipped"`` with the reason.

    Returns:
        ``{"acc", "by_context", "by_depth", "grid", "skipped", "samples", "seed"}``: ``acc`` over every scored item
        (None when all were skipped), ``by_context`` / ``by_depth`` keyed by the value as a string, ``grid`` one
        row per cell (``context``, ``depth``, ``acc``, mean ``logprob`` of the key, mean ``tokens``).

    Raises:
        ConfigError: ``samples < 1`` or a depth outside [0, 1].
    """
    if samples < 1:
        raise ConfigError(f"passkey samples={samples} must be >= 1")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError(f"passkey depths {bad} must be between 0 and 1")
    limit = context_length(model.config)
    cells, skipped, items, fitting = [], [], [], []
    for context in contexts:
        if limit is not None and context > limit:
            skipped.append({"context": context, "reason": f"longer than the model's max_position_embeddings={limit}"})
        elif not _room_for_filler(tokenizer, context):
            skipped.append({"context": context, "reason": _NO_ROOM.format(context=context)})
        else:
            fitting.append(context)
    # each prompt is a binary search over the filler length, every step a tokenization of the whole prompt: minutes
    # for the default grid at long contexts
    with progress.task("building passkey prompts", len(fitting) * len(depths) * samples, "prompts") as task:
        for context in fitting:
            for depth in depths:
                cells.append((context, depth))
                rng = random.Random(f"passkey-{seed}-{context}-{depth}")  # a cell's keys do not depend on the grid
                for _ in range(samples):
                    prompt = passkey_prompt(tokenizer, context, depth, str(rng.randint(10000, 99999)))
                    items.append((len(cells) - 1, prompt))
                    task.update(len(items))
    sequences = [p["context_ids"] + p["answer_ids"] for _, p in items]
    spans = [[(len(p["context_ids"]), len(seq))] for (_, p), seq in zip(items, sequences)]
    scores = score_spans(model, sequences, spans, batch_size=batch_size, progress=progress, name="passkey")
    grid = []
    for c, (context, depth) in enumerate(cells):
        mine = [(s[0], seq) for (cell, _), s, seq in zip(items, scores, sequences) if cell == c]
        grid.append({"context": context, "depth": depth, "acc": _mean([float(s.greedy) for s, _ in mine]),
                     "logprob": _mean([s.logprob for s, _ in mine]), "tokens": _mean([len(q) for _, q in mine])})
    hits = [float(s[0].greedy) for s in scores]

    def by(field: str) -> dict[str, float]:
        keys = list(dict.fromkeys(row[field] for row in grid))
        return {str(k): _mean([row["acc"] for row in grid if row[field] == k]) for k in keys}

    return {"acc": _mean(hits), "by_context": by("context"), "by_depth": by("depth"), "grid": grid,
            "skipped": skipped, "samples": samples, "seed": seed}


def mqar_prompt(tokenizer, n_pairs: int, rng: random.Random) -> dict:
    """One MQAR prompt: ``n_pairs`` key-value sentences, then the same sentences in a shuffled order.

    Returns:
        ``{"text", "ids", "pairs", "queries"}``: ``ids`` the token ids; ``pairs`` the ``(key, value)`` list in the
        order written; ``queries`` one dict per query sentence (in its order) with the ``key``, ``value``, the token
        span of the value in the query (``span``, scored) and at its first mention (``first``), and ``distance``,
        the number of tokens between the two spans' starts.

    Raises:
        ConfigError: ``n_pairs`` outside 1..len(MQAR_KEYS), or a tokenizer without character offsets.
    """
    if not 1 <= n_pairs <= len(MQAR_KEYS):
        raise ConfigError(f"mqar pairs={n_pairs} must be between 1 and {len(MQAR_KEYS)} (the number of keys)")
    keys = rng.sample(MQAR_KEYS, n_pairs)
    values = [str(v) for v in rng.sample(range(1000, 10000), n_pairs)]
    order = rng.sample(range(n_pairs), n_pairs)
    parts = ["Here are some codes. Remember them.\n"]
    where: dict[tuple[int, int], tuple[int, int]] = {}  # (listing, pair index) -> the value's character span
    for listing, indices in enumerate((range(n_pairs), order)):
        if listing:
            parts.append("\nThe codes again:\n")
        for j, i in enumerate(indices):
            head = ("" if j == 0 else " ") + f"The code for {keys[i]} is "
            start = sum(map(len, parts)) + len(head)
            where[(listing, i)] = (start, start + len(values[i]))
            parts.append(head + values[i] + ".")
    text = "".join(parts)
    enc = tokenizer(text, return_offsets_mapping=True, return_attention_mask=False, verbose=False)
    if "offset_mapping" not in enc:
        raise ConfigError("mqar needs a tokenizer that returns character offsets (a fast tokenizer)")
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    ends = [e for _, e in offsets]

    def token_span(chars: tuple[int, int]) -> tuple[int, int]:
        # tokens overlapping [start, end): special tokens have (0, 0) offsets and never overlap a value
        first = bisect_left(ends, chars[0] + 1)
        last = first
        while last < len(offsets) and offsets[last][0] < chars[1]:
            last += 1
        return first, last

    queries = []
    for i in order:
        span, first = token_span(where[(1, i)]), token_span(where[(0, i)])
        queries.append({"key": keys[i], "value": values[i], "span": span, "first": first,
                        "distance": span[0] - first[0]})
    return {"text": text, "ids": ids, "pairs": list(zip(keys, values)), "queries": queries}


def _distance_bins(distances: list[int]) -> list[int]:
    """Upper edges 16, 32, 64, ... up to the first that covers the largest distance."""
    edges = [16]
    while edges[-1] < max(distances, default=0):
        edges.append(edges[-1] * 2)
    return edges


def mqar(
    model: nn.Module,
    tokenizer,
    *,
    pairs: Sequence[int] = (4, 8, 16, 32, 64),
    samples: int = 8,
    seed: int = 0,
    batch_size: int = 4,
    progress: Progress = QuietProgress(),
) -> dict:
    """Multi-query associative recall accuracy by number of pairs and by token distance.

    A query counts when every token of its value is the argmax (teacher-forced). Prompts longer than the model's
    ``max_position_embeddings`` are skipped (per N, listed in ``"skipped"``).

    Returns:
        ``{"acc", "by_pairs", "by_distance", "tokens", "skipped", "samples", "seed"}``: ``by_pairs`` maps N (string)
        to accuracy; ``by_distance`` is a list of ``{"max_distance", "acc", "queries"}`` bins (distances in tokens;
        a bin holds the distances in (previous edge, max_distance]; empty bins are left out); ``tokens`` maps N to
        the mean prompt length.

    Raises:
        ConfigError: ``samples < 1`` or a pair count outside 1..len(MQAR_KEYS).
    """
    if samples < 1:
        raise ConfigError(f"mqar samples={samples} must be >= 1")
    limit = context_length(model.config)
    prompts, skipped = [], []
    for n in pairs:
        rng = random.Random(f"mqar-{seed}-{n}")  # the prompts for N do not depend on the other Ns asked for
        batch = [mqar_prompt(tokenizer, n, rng) for _ in range(samples)]
        longest = max(len(p["ids"]) for p in batch)
        if limit is not None and longest - 1 > limit:
            skipped.append({"pairs": n, "reason": f"prompts of {longest} tokens exceed the model's "
                                                  f"max_position_embeddings={limit}"})
            continue
        prompts += [(n, p) for p in batch]
    spans = [[q["span"] for q in p["queries"]] for _, p in prompts]
    scores = score_spans(model, [p["ids"] for _, p in prompts], spans, batch_size=batch_size, progress=progress,
                         name="mqar")
    hits = [(n, q["distance"], float(s.greedy)) for (n, p), row in zip(prompts, scores)
            for q, s in zip(p["queries"], row)]
    ns = list(dict.fromkeys(n for n, _ in prompts))
    edges = _distance_bins([d for _, d, _ in hits])
    bins = []
    for k, edge in enumerate(edges):
        low = edges[k - 1] if k else 0
        inside = [h for _, d, h in hits if low < d <= edge]
        if inside:
            bins.append({"max_distance": edge, "acc": _mean(inside), "queries": len(inside)})
    return {"acc": _mean([h for _, _, h in hits]),
            "by_pairs": {str(n): _mean([h for m, _, h in hits if m == n]) for n in ns},
            "by_distance": bins,
            "tokens": {str(n): _mean([len(p["ids"]) for m, p in prompts if m == n]) for n in ns},
            "skipped": skipped, "samples": samples, "seed": seed}
