"""Zero-shot multiple choice and cloze tasks from local jsonl files, scored the way lm-evaluation-harness scores them.

Three layouts, told apart by the keys of each record (any file in one of them works, not only the shipped ones):

- ``multiple_choice`` (llm-foundry's PIQA, ARC, ...): ``{"query", "choices", "gold"}``. Each choice is scored as the
  continuation of the query. ``acc``: the choice with the highest summed log-likelihood is ``gold``;
  ``acc_norm``: the same after dividing each sum by the choice's length in UTF-8 bytes.
- ``schema`` (llm-foundry's Winogrande, partial scoring): ``{"context_options", "continuation", "gold"}``. The one
  continuation is scored after each context option; ``acc`` only (the continuation is the same for every option,
  so a length normalisation could not change the answer).
- ``language_modeling`` (llm-foundry's LAMBADA): ``{"context", "continuation"}``. ``acc``: every continuation token
  is the model's argmax (greedy match); ``ppl``: ``exp(-mean over items of log P(continuation | context))``, the
  per-item (not per-token) perplexity that lm-eval reports for LAMBADA.

Joining context and continuation. llm-foundry's files carry no whitespace at the join (queries end in ``?`` or a
word, PIQA's in ``"\\n"``; choices and continuations start with a letter): their loader adds a delimiter. lm-eval
puts ``target_delimiter`` (a space by default) in front of every continuation. Here the continuation is
``delimiter + text`` (default ``" "``) unless the context already ends in whitespace or the continuation already
starts with it, in which case the file's own join is kept (so PIQA reads ``"Question: ...\\n<choice>"``, and a file
that already carries a leading space does not get a second one). Then, as in lm-eval, trailing whitespace of the
context moves to the front of the continuation, the pair is tokenized as one string (with the tokenizer's default
special tokens, e.g. Llama's BOS), and the continuation's tokens are the tail past the context's own encoding; an
empty context is replaced by BOS (EOS when there is none). A pair longer than the model's maximum length keeps its
last ``max_length + 1`` tokens. Length normalisation counts the bytes of the choice text alone (no delimiter).

lm-eval's own ``acc_norm`` divides by the number of characters and its ``acc_bytes`` by UTF-8 bytes; the two agree
on ASCII text (all but about 1.5 % of the shipped PIQA and ARC items). ``acc_norm`` here is the byte version.

    from linearize.eval import evaluate_task
    r = evaluate_task(model, tok, "llm-foundry-icl/arc_easy.jsonl", limit=500)
    r["acc"], r["acc_norm"], r["items"]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from linearize.errors import DataError
from linearize.eval.scoring import score_spans
from linearize.io.loading import context_length
from linearize.run.progress import Progress, QuietProgress

__all__ = ["LAYOUTS", "detect_layout", "encode_pair", "evaluate_task", "join_pair", "load_task"]

#: layout name -> the record keys that identify it
LAYOUTS: dict[str, frozenset[str]] = {
    "multiple_choice": frozenset({"query", "choices", "gold"}),
    "schema": frozenset({"context_options", "continuation", "gold"}),
    "language_modeling": frozenset({"context", "continuation"}),
}


def detect_layout(record: dict, where: str = "record") -> str:
    """The layout whose keys ``record`` has (extra keys such as ``category`` are allowed).

    Raises:
        DataError: no layout matches; the message lists the keys found and the layouts accepted.
    """
    keys = set(record)
    matches = [name for name, need in LAYOUTS.items() if need <= keys]
    if not matches:
        accepted = "; ".join(f"{name}: {sorted(need)}" for name, need in LAYOUTS.items())
        raise DataError(f"{where} has keys {sorted(keys)}, which match no task layout; accepted: {accepted}")
    return matches[0]


def _check(record: dict, layout: str, where: str) -> None:
    if layout == "multiple_choice":
        options = record["choices"]
        if not isinstance(record["query"], str) or not isinstance(options, list) \
                or not all(isinstance(c, str) for c in options):
            raise DataError(f"{where}: query must be a string and choices a list of strings")
    elif layout == "schema":
        options = record["context_options"]
        if not isinstance(record["continuation"], str) or not isinstance(options, list) \
                or not all(isinstance(c, str) for c in options):
            raise DataError(f"{where}: continuation must be a string and context_options a list of strings")
    else:
        if not isinstance(record["context"], str) or not isinstance(record["continuation"], str) \
                or not record["continuation"]:
            raise DataError(f"{where}: context and continuation must be strings, the continuation non-empty")
        return
    if len(options) < 2:
        raise DataError(f"{where} has {len(options)} option(s); a multiple-choice item needs at least 2")
    gold = record["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise DataError(f"{where}: gold={gold!r} must be an option index in 0..{len(options) - 1}")


def load_task(path: str | Path, limit: int | None = None) -> tuple[str, list[dict]]:
    """Read a jsonl task file: ``(layout, records)``, the first ``limit`` records when given.

    Raises:
        DataError: missing, unreadable or non-UTF-8 file, a line that is not JSON, records of no or of mixed
            layouts, a bad ``gold``, an empty file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task file {path} does not exist; pass a jsonl file (e.g. llm-foundry-icl/piqa.jsonl)")
    try:
        return _read_task(path, limit)
    except UnicodeDecodeError as e:
        raise DataError(f"task file {path} is not UTF-8 text ({e.reason}); pass a jsonl file") from None
    except OSError as e:
        raise DataError(f"cannot read task file {path}: {e.strerror or e}") from None


def _read_task(path: Path, limit: int | None) -> tuple[str, list[dict]]:
    records: list[dict] = []
    layout = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}); the file must hold one JSON object a line") \
                    from e
            if not isinstance(record, dict):
                raise DataError(f"{where} is a JSON {type(record).__name__}, not an object")
            this = detect_layout(record, where)
            if layout is None:
                layout = this
            elif this != layout:
                raise DataError(f"{where} is a {this} record but the file started with {layout} records; "
                                "keep one layout per file")
            _check(record, this, where)
            records.append(record)
    if not records:
        raise DataError(f"task file {path} holds no records")
    return layout, records


def join_pair(context: str, continuation: str, delimiter: str = " ") -> tuple[str, str]:
    """``(context, delimiter + continuation)``, without the delimiter when the join already has whitespace."""
    if context[-1:].isspace() or continuation[:1].isspace():
        return context, continuation
    return context, delimiter + continuation


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids ``(context, continuation)`` of one scored pair, split as lm-eval splits them: the context's
    trailing whitespace joins the continuation, the whole string is encoded once, and the continuation is what
    follows the context's own encoding. An empty context becomes BOS (or EOS).

    Raises:
        DataError: the continuation encodes to no tokens.
    """
    if not context:
        cont = tokenizer(continuation, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    ctx = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    cont = whole[len(ctx):]
    if not cont:
        raise DataError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


def _loglikelihoods(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], batch_size: int, progress: Progress,
                    name: str):
    """One :class:`SpanScore` per (context, continuation) pair."""
    limit = context_length(model.config)
    sequences, spans = [], []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        seq = ctx + cont
        if limit is not None:
            seq = seq[-(limit + 1):]  # lm-eval keeps the last max_length + 1 tokens (the last one is never input)
        sequences.append(seq)
        spans.append([(max(1, len(seq) - len(cont)), len(seq))])
    return [s[0] for s in score_spans(model, sequences, spans, batch_size=batch_size, progress=progress, name=name)]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, as numpy.argmax


def evaluate_task(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    *,
    limit: int | None = None,
    delimiter: str = " ",
    batch_size: int = 8,
    per_item: bool = False,
    progress: Progress = QuietProgress(),
) -> dict:
    """Zero-shot accuracy of ``model`` on the jsonl task ``path`` (layout detected from its keys).

    Args:
        limit: score only the first ``limit`` items.
        delimiter: put between context and continuation when neither carries whitespace at the join.
        batch_size: sequences (one per choice) per forward pass.
        per_item: also return ``"per_item"``: for each item its gold, per-option log-likelihoods and predictions.

    Returns:
        ``{"task", "file", "layout", "items", "acc"}`` plus ``"acc_norm"`` (multiple_choice) or ``"ppl"``
        (language_modeling).

    Raises:
        DataError: what :func:`load_task` raises.
    """
    layout, records = load_task(path, limit)
    name = Path(path).stem
    if layout == "multiple_choice":
        groups = [[join_pair(r["query"], c, delimiter) for c in r["choices"]] for r in records]
    elif layout == "schema":
        groups = [[join_pair(c, r["continuation"], delimiter) for c in r["context_options"]] for r in records]
    else:
        groups = [[join_pair(r["context"], r["continuation"], delimiter)] for r in records]
    flat = [pair for group in groups for pair in group]
    scores = _loglikelihoods(model, tokenizer, flat, batch_size, progress, name)
    result: dict = {"task": name, "file": str(path), "layout": layout, "items": len(records)}
    details = []
    k = 0
    correct = correct_norm = 0
    for record, group in zip(records, groups):
        item = scores[k : k + len(group)]
        k += len(group)
        lls = [s.logprob for s in item]
        if layout == "language_modeling":
            correct += item[0].greedy
            details.append({"logprob": lls[0], "greedy": item[0].greedy, "tokens": item[0].tokens})
            continue
        pred = _argmax(lls)
        correct += pred == record["gold"]
        entry = {"gold": record["gold"], "logprobs": lls, "pred": pred}
        if layout == "multiple_choice":
            pred_norm = _argmax([ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, record["choices"])])
            correct_norm += pred_norm == record["gold"]
            entry["pred_norm"] = pred_norm
        details.append(entry)
    result["acc"] = correct / len(records)
    if layout == "multiple_choice":
        result["acc_norm"] = correct_norm / len(records)
    if layout == "language_modeling":
        result["ppl"] = math.exp(-sum(d["logprob"] for d in details) / len(details))
    if per_item:
        result["per_item"] = details
    return result
