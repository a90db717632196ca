"""Packing: documents -> one token stream -> shuffled train / validation blocks (:func:`build_calibration`).

Each document is tokenized with the tokenizer's own special tokens (BOS where it adds one) and ends with EOS;
documents are concatenated, cut into ``seq_len`` blocks (the tail is dropped), the blocks are shuffled with
``seed``, and the first ones are held out for validation. Reading stops as soon as enough tokens are collected, so
a 50 MB corpus costs no more than the tokens used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linearize.data.records import read_chat_texts, read_texts
from linearize.data.sampling import sample_teacher_tokens
from linearize.errors import ConfigError, DataError
from linearize.io.sources import data_name
from linearize.run.progress import Progress, QuietProgress

# A document is cut to this many characters per still-needed token before tokenizing: far above the ~2-5 chars per
# token of real tokenizers, so no needed token is lost, while a 1 MB book is not tokenized to use 2k of its tokens.
_CHARS_PER_TOKEN_BOUND = 16
_TOKENIZE_BATCH = 64  # documents per tokenizer call (fast tokenizers encode a batch in parallel)


@dataclass
class CalibrationData:
    """Packed token blocks for attention transfer."""

    train: torch.Tensor
    """``[N, seq_len]`` int64 training blocks, shuffled."""
    valid: torch.Tensor
    """``[M, seq_len]`` int64 held-out blocks, disjoint from ``train``."""
    source_desc: str
    """Where the tokens came from, for reports (path and documents read, or the sampling settings)."""
    n_tokens: int
    """Tokens in ``train`` and ``valid`` together."""



def _text_token_stream(tokenizer: Any, texts: Iterator[str], needed: int, chat: bool,
                       progress: Progress | None = None) -> tuple[list[int], int]:
    """Tokenize documents into one stream (BOS per document where the tokenizer adds it, EOS after each) until
    ``needed`` tokens are collected, shown as a task counting tokens; returns ``(stream, documents used)``."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    stream: list[int] = []
    n_docs = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal n_docs
        for ids in tokenizer(pending, add_special_tokens=True, verbose=False)["input_ids"]:
            if len(stream) >= needed:
                break
            if chat and bos is not None and ids[:2] == [bos, bos]:
                ids = ids[1:]  # the chat template wrote BOS itself
            stream.extend(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                stream.append(eos)
            n_docs += 1
        pending.clear()

    pending_chars = 0
    # reading and tokenizing millions of tokens takes minutes (1M tokens: 51 s on a busy 2-core CPU)
    with (progress or QuietProgress()).task("reading and tokenizing the data", needed, "tokens") as task:
        for text in texts:
            remaining = needed - len(stream)
            text = text[: max(4096, remaining * _CHARS_PER_TOKEN_BOUND)]
            pending.append(text)
            pending_chars += len(text)
            # Tokenize once the pending text surely covers the remaining tokens, or the batch is full.
            if len(pending) >= _TOKENIZE_BATCH or pending_chars >= remaining * _CHARS_PER_TOKEN_BOUND:
                flush()
                pending_chars = 0
                task.update(min(len(stream), needed))
                if len(stream) >= needed:
                    break
        if pending:
            flush()
        task.update(min(len(stream), needed))
    return stream[:needed], n_docs


def _cut_blocks(stream: list[int], seq_len: int, n_blocks: int, bos: int | None) -> torch.Tensor:
    """``n_blocks`` consecutive blocks of ``seq_len`` tokens from ``stream``. With ``bos`` (the tokenizer adds it to
    every text it encodes) every block starts with BOS, as every perplexity window of ``linearize eval`` and every
    prompt the tokenizer encodes does: BOS-led models (Gemma most of all) attend to it as a sink, and a block cut
    mid-document without it shows the transfer a teacher it never runs as. A document's own BOS at a block's start
    is that block's BOS; the other blocks take ``seq_len - 1`` stream tokens after it."""
    if bos is None:
        return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    blocks, i = [], 0
    while len(blocks) < n_blocks:
        if stream[i] == bos:
            i += 1
        blocks.append([bos] + stream[i : i + seq_len - 1])  # the stream holds n_blocks * seq_len tokens: enough
        i += seq_len - 1
    return torch.tensor(blocks, dtype=torch.long)


def build_calibration(
    tokenizer: Any,
    *,
    source: str | Path | None,
    model: Any = None,
    n_tokens: int,
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    min_val_sequences: int = 1,
    max_len: int | None = None,
    chat_template: bool = False,
    sample_batch_size: int | None = None,
    sampling_dir: Path | None = None,
    progress: Progress | None = None,
) -> CalibrationData:
    """Packed, shuffled train/validation token blocks from text data or from the teacher's own samples.

    Args:
        tokenizer: the teacher's tokenizer.
        source: a file, folder or HF dataset name (see ``read_texts``); ``None`` samples text from ``model``.
        model: the teacher; needed for ``source=None``, and its config bounds ``seq_len``.
        n_tokens: training tokens wanted (rounded up to whole blocks); ``0`` builds validation blocks only.
        seq_len: tokens per block.
        val_fraction: share of all blocks held out, so validation has ``n_tokens * f / (1 - f)`` tokens, and at
            least ``min_val_sequences`` blocks.
        seed: block shuffle (and teacher sampling) seed.
        max_len: the model's context length when no ``model`` is passed.
        chat_template: render instruction/chat records with the tokenizer's chat template.
        sample_batch_size: sequences generated at once when sampling from the teacher (None: on CUDA all that
            are needed as far as a quarter of the GPU's memory holds their KV cache, 64 on the CPU).
        sampling_dir: where teacher sampling keeps its progress, so that a killed run resumes it (see
            :func:`sample_teacher_tokens`); None keeps nothing.
        progress: shows teacher sampling, or the reading and tokenizing of ``source``.

    Raises:
        DataError: ``seq_len`` longer than the model's context, too little data for one training and
            ``min_val_sequences`` validation blocks, or any ``read_texts`` error.
        ConfigError: ``val_fraction`` outside ``[0, 1]`` or non-positive sizes.
    """
    if seq_len < 2 or n_tokens < 0 or min_val_sequences < 1:
        raise ConfigError(f"need seq_len >= 2, n_tokens >= 0, min_val_sequences >= 1; "
                          f"got {seq_len}, {n_tokens}, {min_val_sequences}")
    if not 0 <= val_fraction <= 1 or (val_fraction == 1 and n_tokens > 0):
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1) (1 only with n_tokens=0)")
    from linearize.io.loading import context_length

    context = context_length(model.config) if model is not None else max_len
    if context is not None and seq_len > context:
        raise DataError(f"seq_len {seq_len} is longer than the model's context of {context} tokens; "
                        f"use seq_len <= {context}")

    n_train = math.ceil(n_tokens / seq_len)
    n_valid = min_val_sequences if val_fraction == 1 else max(
        min_val_sequences, round(n_train * val_fraction / (1 - val_fraction)))
    needed = (n_train + n_valid) * seq_len

    if source is None:
        if model is None:
            raise DataError("source=None means calibrating on text sampled from the teacher, which needs model=; "
                            "or pass a text file or folder")
        docs = sample_teacher_tokens(model, tokenizer, n_tokens=needed, seq_len=seq_len,
                                     batch_size=sample_batch_size, seed=seed, resume_dir=sampling_dir,
                                     progress=progress)
        stream = torch.cat(docs)[:needed].tolist()
        desc = f"{len(docs):,} documents sampled from the teacher (seed {seed}, temperature 1.0, top_p 0.95)"
    else:
        texts = read_chat_texts(source, tokenizer) if chat_template else read_texts(source)
        stream, n_docs = _text_token_stream(tokenizer, texts, needed, chat_template, progress)
        desc = f"{data_name(source)} ({n_docs:,} documents{', chat template' if chat_template else ''})"

    n_blocks = len(stream) // seq_len
    if n_blocks < needed // seq_len:
        min_blocks = min_val_sequences + (1 if n_train else 0)
        if n_blocks < min_blocks:
            raise DataError(f"{desc} gives only {len(stream):,} tokens; at least {min_blocks * seq_len:,} are needed "
                            f"for {min_blocks} blocks of seq_len {seq_len} ({needed:,} asked for); "
                            "add data or lower seq_len")
        n_valid = max(min_val_sequences, round(n_blocks * val_fraction))
        n_train = n_blocks - n_valid
        warnings.warn(f"{desc} gives only {len(stream):,} of the {needed:,} tokens asked for: using {n_train} "
                      f"training and {n_valid} validation blocks", stacklevel=2)

    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    blocks = _cut_blocks(stream, seq_len, n_blocks, bos if adds_bos else None)  # (K, T)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    blocks = blocks[order]
    valid, train = blocks[:n_valid], blocks[n_valid : n_valid + n_train]
    return CalibrationData(train=train.contiguous(), valid=valid.contiguous(), source_desc=desc,
                           n_tokens=train.numel() + valid.numel())
