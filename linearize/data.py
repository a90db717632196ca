"""Calibration data for attention transfer: read text, or sample it from the teacher, then pack it into blocks.

    from linearize.data import build_calibration
    calib = build_calibration(tok, source="shared/data/train-text/alpaca-cleaned", n_tokens=100_000, seq_len=512,
                              model=model)
    calib.train.shape, calib.valid.shape   # (196, 512), (10, 512): shuffled, disjoint blocks
    calib = build_calibration(tok, source=None, model=model, n_tokens=100_000, seq_len=512)  # data-free

Sources (``read_texts``):
- a file or a folder (searched recursively, in sorted order) of ``.txt`` (one document per file), ``.jsonl``,
  ``.json`` (a list of records or one record) and ``.parquet`` files, each optionally ``.xz`` or ``.gz`` compressed;
- records carry a ``text`` field, or an instruction/chat format that is flattened to plain text: Alpaca
  ``instruction``/``input``/``output`` (plus LIMA's ``history`` turns), ``prompt``/``response`` (or ``completion``,
  as in P3/T0), GSM8K ``question``/``answer``, and ``conversations``/``messages`` lists of ``{role|from,
  content|value}`` turns. ``read_chat_texts`` renders the same records with a tokenizer's chat template instead;
- an HF dataset name (``name`` or ``name:config``) when the string is no path and ``datasets`` is installed.

Packing (``build_calibration``): each document is tokenized with the tokenizer's own special tokens (BOS where it
adds one) and ends with EOS; documents are concatenated, cut into ``seq_len`` blocks (the tail is dropped), the
blocks are shuffled with ``seed``, and the first ones are held out for validation. Reading stops as soon as enough
tokens are collected, so a 50 MB corpus costs no more than the tokens used.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from linearize.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSION_SUFFIXES = (".xz", ".gz")
# A document is cut to this many characters per still-needed token before tokenizing: far above the ~2-5 chars per
# token of real tokenizers, so no needed token is lost, while a 1 MB book is not tokenized to use 2k of its tokens.
_CHARS_PER_TOKEN_BOUND = 16
_TOKENIZE_BATCH = 64  # documents per tokenizer call (fast tokenizers encode a batch in parallel)

_ROLE_NAMES = {
    "user": "user", "human": "user", "prompter": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}
_KNOWN_FORMATS = ("`text`, instruction/input/output, prompt/response (or completion), question/answer, "
                  "or conversations/messages")


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


# ---------------------------------------------------------------------------------------------------------------
# Records -> messages -> text


def _clean(text: Any) -> str:
    if not isinstance(text, str):
        return ""
    # P3/T0 completions keep GPT-2's literal end marker; the packer adds the tokenizer's own EOS instead.
    return text.removesuffix("<|endoftext|>").strip()


def _turns(raw: Sequence[Any]) -> list[dict[str, str]]:
    """``[{role|from, content|value|text}, ...]`` or plain strings (alternating user/assistant) -> messages."""
    messages = []
    for i, turn in enumerate(raw):
        if isinstance(turn, str):
            role, content = ("user", "assistant")[i % 2], turn
        elif isinstance(turn, Mapping):
            role = str(turn.get("role", turn.get("from", ("user", "assistant")[i % 2]))).lower()
            content = turn.get("content", turn.get("value", turn.get("text")))
        else:
            continue
        if _clean(content):
            messages.append({"role": _ROLE_NAMES.get(role, role), "content": _clean(content)})
    return messages


def record_to_messages(record: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """Chat messages of an instruction or conversation record; ``None`` when the format is not one of those.

    Handles Alpaca/LIMA (``instruction``, ``input``, ``output``, optional ``history`` of ``[user, assistant]``),
    ``prompt`` + ``response``/``completion``/``output``, GSM8K ``question``/``answer``, and
    ``conversations``/``messages`` turn lists (ShareGPT ``from``/``value`` or OpenAI ``role``/``content``).
    """
    for key in ("conversations", "messages"):
        if isinstance(record.get(key), list):
            return _turns(record[key])
    if "instruction" in record and ("output" in record or "response" in record):
        history = []
        for pair in record.get("history") or []:
            history.extend(_turns(pair) if isinstance(pair, (list, tuple)) else [])
        user = "\n\n".join(t for t in (_clean(record["instruction"]), _clean(record.get("input"))) if t)
        reply = record.get("output", record.get("response"))
        return history + _turns([user, _clean(reply)])
    if "prompt" in record:
        for key in ("response", "completion", "output"):
            if key in record:
                return _turns([record["prompt"], record[key]])
    if "question" in record and "answer" in record:
        return _turns([record["question"], record["answer"]])
    return None


def record_to_text(record: Any, where: str, tokenizer: Any = None) -> str:
    """Plain text of one record: its ``text`` field, or its messages joined by blank lines.

    With ``tokenizer``, instruction/chat records are rendered with ``tokenizer.apply_chat_template`` instead.

    Raises:
        DataError: the record is not a string or dict, or has no known text format (the message names the keys).
    """
    if isinstance(record, str):
        return record
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object or string per record, got {type(record).__name__}")
    if "text" in record and (isinstance(record["text"], str) or record["text"] is None):
        return record["text"] or ""
    messages = record_to_messages(record)
    if messages is None:
        raise DataError(f"{where}: unknown record format with keys {sorted(record)}; expected {_KNOWN_FORMATS}")
    if tokenizer is None:
        return "\n\n".join(m["content"] for m in messages)
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # templates raise on e.g. non-alternating roles
        raise DataError(f"{where}: the chat template rejected this record ({str(e).splitlines()[0]})") from e


# ---------------------------------------------------------------------------------------------------------------
# Files, folders, HF datasets -> records


def _data_suffix(path: Path) -> str | None:
    """``.jsonl`` for ``x.jsonl.xz``; ``None`` when the file is not a readable text format."""
    name = path.name.lower()
    for comp in COMPRESSION_SUFFIXES:
        name = name.removesuffix(comp)
    return next((s for s in TEXT_SUFFIXES if name.endswith(s)), None)


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow: pip install 'linearize[data]'") from e
    if path.name.endswith((".xz", ".gz")):  # parquet needs random access: decompress into memory
        opener = lzma.open if path.name.endswith(".xz") else gzip.open
        with opener(path, "rb") as f:
            handle: Any = io.BytesIO(f.read())
    else:
        handle = str(path)
    try:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e


def _file_records(path: Path, limit_chars: int | None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` pairs of one file; ``where`` is ``file:line`` or ``file[index]`` for error messages."""
    kind = _data_suffix(path)
    if kind == ".parquet":
        for i, row in enumerate(_parquet_rows(path)):
            yield f"{path}[{i}]", row
        return
    try:
        with _open_text(path) as f:
            if kind == ".txt":
                yield str(path), f.read(limit_chars) if limit_chars is not None else f.read()
            elif kind == ".jsonl":
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield f"{path}:{line_no}", json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            else:  # .json: one record or a list of them
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
                for i, record in enumerate(data if isinstance(data, list) else [data]):
                    yield f"{path}[{i}]", record
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({str(e).splitlines()[0]})") from e


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if _data_suffix(path) is None:
            raise DataError(f"{path}: unsupported file type; use {', '.join(TEXT_SUFFIXES)} (optionally .xz or .gz)")
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and _data_suffix(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        seen = sorted(p.name for p in path.rglob("*") if p.is_file())[:5]
        raise DataError(f"{path} holds no readable data files ({', '.join(TEXT_SUFFIXES)}, optionally .xz/.gz); "
                        f"found {seen if seen else 'no files at all'}")
    return files


def _looks_like_path(text: str) -> bool:
    low = text.lower()
    return (text.startswith(("./", "../", "/", "~", ".\\")) or "\\" in text or text.count("/") > 1
            or any(low.endswith(s + c) for s in TEXT_SUFFIXES for c in ("", *COMPRESSION_SUFFIXES)))


def _hf_records(name: str) -> Iterator[tuple[str, Any]]:
    import datasets  # checked importable by the caller

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train", streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load HF dataset {name!r} ({reason}); pass a local file or folder instead") from e
    if first is None:
        return
    yield f"HF dataset {name}[0]", first
    for i, row in enumerate(rows, 1):
        yield f"HF dataset {name}[{i}]", row


def _records(source: str | Path, limit_chars: int | None = None) -> Iterator[tuple[str, Any]]:
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        for file in _local_files(path):
            yield from _file_records(file, limit_chars)
        return
    if isinstance(source, Path) or _looks_like_path(text):
        raise DataError(f"{text} does not exist; pass a text/jsonl/json/parquet file, a folder of them, "
                        "or an HF dataset name")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(f"{text!r} is not an existing file or folder, and the `datasets` package needed to load it "
                        "as an HF dataset is not installed (pip install 'linearize[data]')") from None
    yield from _hf_records(text)


def _texts(source: str | Path, limit_chars: int | None, tokenizer: Any) -> Iterator[str]:
    total = 0
    for where, record in _records(source, limit_chars):
        text = record_to_text(record, where, tokenizer)
        if not text.strip():
            continue
        if limit_chars is not None:
            text = text[: limit_chars - total]
        total += len(text)
        yield text
        if limit_chars is not None and total >= limit_chars:
            return
    if total == 0:
        raise DataError(f"{source} contains no text (every document is empty)")


def read_texts(source: str | Path, *, limit_chars: int | None = None) -> Iterator[str]:
    """Yield the plain-text documents of a file, a folder or an HF dataset name (see the module docstring).

    Empty documents are skipped. ``limit_chars`` stops after that many characters (the last document is cut).

    Raises:
        DataError: nonexistent path, a folder without data files, an unknown record format (naming the file and
            the keys seen), unreadable or empty data, an HF dataset that cannot be loaded.
    """
    return _texts(source, limit_chars, tokenizer=None)


def read_chat_texts(source: str | Path, tokenizer: Any, *, limit_chars: int | None = None) -> Iterator[str]:
    """Like ``read_texts``, but instruction/chat records are rendered with ``tokenizer``'s chat template.

    Plain ``text`` records pass through unchanged.

    Raises:
        DataError: as ``read_texts``, or the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; read the data as plain text instead")
    return _texts(source, limit_chars, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Teacher sampling (data-free calibration)


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    stops = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


@torch.no_grad()
def sample_teacher_tokens(
    model: Any,
    tokenizer: Any,
    *,
    n_tokens: int,
    seq_len: int,
    batch_size: int = 8,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    prompts: Sequence[str] | None = None,
    resume_dir: Path | None = None,
) -> list[torch.Tensor]:
    """Let the frozen teacher write its own calibration documents, as token ids (no re-tokenization drift).

    With ``resume_dir``, the documents so far and the sampler's RNG state are saved there after every batch, so a
    run killed while sampling continues where it stopped, with the samples an uninterrupted run draws.

    Each document starts at BOS (EOS for tokenizers without one), optionally followed by one of ``prompts`` (batch
    ``i`` uses ``prompts[i % len(prompts)]``, so a batch needs no padding), and runs until the model emits EOS or
    the document reaches ``seq_len`` tokens. Sampling is seeded and leaves the global RNG untouched.

    Returns:
        1-D int64 CPU tensors, one per document, together holding at least ``n_tokens`` tokens; a document ends with
        EOS only when the model ended it.

    Raises:
        ConfigError: ``temperature <= 0`` (greedy decoding from one start token repeats one sample) or bad sizes.
        DataError: the tokenizer has neither BOS nor EOS to start from.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0: greedy decoding from BOS gives identical samples")
    if n_tokens < 1 or seq_len < 2 or batch_size < 1:
        raise ConfigError(f"need n_tokens >= 1, seq_len >= 2, batch_size >= 1; got {n_tokens}, {seq_len}, {batch_size}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError("the tokenizer has no BOS or EOS token to start teacher sampling from; pass text data")
    starts = [[start] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts] if prompts else [[start]]
    too_long = [len(s) for s in starts if len(s) >= seq_len]
    if too_long:
        raise ConfigError(f"a prompt has {too_long[0]} tokens, not shorter than seq_len={seq_len}")
    stops = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    device = next(model.parameters()).device
    docs: list[torch.Tensor] = []
    # Sampling never reads attention weights, so run it on SDPA (~1.5x faster than eager on CPU, same samples) and
    # restore the teacher's implementation afterwards.
    impl = getattr(model.config, "_attn_implementation", None)
    switched = False
    if impl == "eager" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
            switched = True
        except Exception:  # custom attention modules (e.g. an already linearized model) keep their own path
            pass
    try:
        _sample_loop(model, starts, stops, pad, device, docs, n_tokens, seq_len, batch_size, seed, temperature,
                     top_p, resume_dir)
    finally:
        if switched:
            model.set_attn_implementation(impl)
    return docs


def _sample_loop(model: Any, starts: list[list[int]], stops: set[int], pad: int, device: torch.device,
                 docs: list[torch.Tensor], n_tokens: int, seq_len: int, batch_size: int, seed: int,
                 temperature: float, top_p: float, resume_dir: Path | None = None) -> None:
    collected = 0
    cuda = device.type == "cuda"
    settings = {"n_tokens": n_tokens, "seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                "temperature": temperature, "top_p": top_p, "starts": starts, "device": device.type}
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(seed)
        step = 0
        saved = _load_sampling_state(resume_dir, settings) if resume_dir is not None else None
        if saved is not None:
            step, restored, cpu_rng, cuda_rng = saved
            docs.extend(restored)
            collected = sum(d.numel() for d in restored)
            torch.set_rng_state(cpu_rng)
            if cuda and cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
        while collected < n_tokens:
            prefix = starts[step % len(starts)]
            rows = min(batch_size, math.ceil((n_tokens - collected) / seq_len))  # a short last batch
            ids = torch.tensor([prefix] * rows, device=device)  # (B, P)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0, max_new_tokens=seq_len - len(prefix), pad_token_id=pad,
                eos_token_id=sorted(stops) or None,
            ).cpu()  # (B, <= seq_len)
            for row in out:
                new = row[len(prefix):]
                hits = [i for i, t in enumerate(new.tolist()) if t in stops]
                doc = row[: len(prefix) + hits[0] + 1] if hits else row
                docs.append(doc.long())
                collected += doc.numel()
            step += 1
            if resume_dir is not None and collected < n_tokens:
                _save_sampling_state(resume_dir, settings, step, docs, device if cuda else None)


def _save_sampling_state(folder: Path, settings: dict, step: int, docs: list[torch.Tensor],
                         cuda_device: torch.device | None) -> None:
    """Documents (concatenated + lengths) and RNG states as safetensors, settings as JSON; replaced atomically."""
    from safetensors.torch import save_file

    tensors = {"tokens": torch.cat(docs), "lengths": torch.tensor([d.numel() for d in docs]),
               "cpu_rng": torch.get_rng_state()}
    if cuda_device is not None:
        tensors["cuda_rng"] = torch.cuda.get_rng_state(cuda_device)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.tmp.safetensors"
    save_file(tensors, str(tmp))
    (folder / "meta.tmp.json").write_text(json.dumps({"settings": settings, "step": step}))
    tmp.replace(folder / "state.safetensors")  # the tensors first: meta names a step only once they are in place
    (folder / "meta.tmp.json").replace(folder / "meta.json")


def _load_sampling_state(folder: Path, settings: dict):
    """(step, documents, cpu RNG, cuda RNG or None) saved with the same settings, or None."""
    from safetensors.torch import load_file

    meta_file, state_file = folder / "meta.json", folder / "state.safetensors"
    if not (meta_file.is_file() and state_file.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("settings") != json.loads(json.dumps(settings)):
        return None
    t = load_file(str(state_file))
    if int(t["lengths"].numel()) == 0:
        return None
    docs = list(torch.split(t["tokens"], t["lengths"].tolist()))
    return meta["step"], docs, t["cpu_rng"], t.get("cuda_rng")


# ---------------------------------------------------------------------------------------------------------------
# Packing


def _model_max_len(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _text_token_stream(tokenizer: Any, texts: Iterator[str], needed: int, chat: bool) -> tuple[list[int], int]:
    """Tokenize documents into one stream (BOS per document where the tokenizer adds it, EOS after each) until
    ``needed`` tokens are collected; returns ``(stream, documents used)``."""
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
    for text in texts:
        remaining = needed - len(stream)
        text = text[: max(4096, remaining * _CHARS_PER_TOKEN_BOUND)]
        pending.append(text)
        pending_chars += len(text)
        # Tokenize once the pending text surely covers the remaining tokens, or the batch is full.
        if len(pending) >= _TOKENIZE_BATCH or pending_chars >= remaining * _CHARS_PER_TOKEN_BOUND:
            flush()
            pending_chars = 0
            if len(stream) >= needed:
                break
    if pending:
        flush()
    return stream[:needed], n_docs


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
    sample_batch_size: int = 64,
    sampling_dir: Path | None = None,
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
        sample_batch_size: sequences generated at once when sampling from the teacher.
        sampling_dir: where teacher sampling keeps its progress, so that a killed run resumes it (see
            :func:`sample_teacher_tokens`); None keeps nothing.

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
    context = _model_max_len(model) if model is not None else max_len
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
                                     batch_size=sample_batch_size, seed=seed, resume_dir=sampling_dir)
        stream = torch.cat(docs)[:needed].tolist()
        desc = f"{len(docs):,} documents sampled from the teacher (seed {seed}, temperature 1.0, top_p 0.95)"
    else:
        texts = read_chat_texts(source, tokenizer) if chat_template else read_texts(source)
        stream, n_docs = _text_token_stream(tokenizer, texts, needed, chat_template)
        desc = f"{source} ({n_docs:,} documents{', chat template' if chat_template else ''})"

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

    blocks = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)  # (K, T)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    blocks = blocks[order]
    valid, train = blocks[:n_valid], blocks[n_valid : n_valid + n_train]
    return CalibrationData(train=train.contiguous(), valid=valid.contiguous(), source_desc=desc,
                           n_tokens=train.numel() + valid.numel())
