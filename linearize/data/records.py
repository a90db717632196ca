"""Text sources: files, folders and HF datasets -> records -> plain text (or chat-template text).

- a file or a folder (searched recursively, in sorted order) of ``.txt`` (one document per file), ``.jsonl``,
  ``.json`` (a list of records or one record) and ``.parquet`` files, each optionally ``.xz`` or ``.gz`` compressed;
- records carry a ``text`` field, or an instruction/chat format that is flattened to plain text: Alpaca
  ``instruction``/``input``/``output`` (plus LIMA's ``history`` turns), ``prompt``/``response`` (or ``completion``,
  as in P3/T0), GSM8K ``question``/``answer``, and ``conversations``/``messages`` lists of ``{role|from,
  content|value}`` turns. ``read_chat_texts`` renders the same records with a tokenizer's chat template instead;
- an HF dataset name (``name`` or ``name:config``) when the string is no path and ``datasets`` is installed.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from linearize.errors import DataError
from linearize.io.sources import data_sources, looks_like_path

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSION_SUFFIXES = (".xz", ".gz")

_ROLE_NAMES = {
    "user": "user", "human": "user", "prompter": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}
_KNOWN_FORMATS = ("`text`, instruction/input/output, prompt/response (or completion), question/answer, "
                  "or conversations/messages")


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
    if isinstance(source, Path) or looks_like_path(text):
        raise DataError(f"{text} does not exist; pass a text/jsonl/json/parquet file, a folder of them, "
                        "or an HF dataset name")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(f"{text!r} is not an existing file or folder, and the `datasets` package needed to load it "
                        "as an HF dataset is not installed (pip install 'linearize[data]')") from None
    yield from _hf_records(text)


def check_data_source(source: str | Path) -> None:
    """What reading ``source`` needs, checked before any model loads: a file or folder holds readable data files
    (and ``pyarrow`` imports where they include parquet), a dataset name needs ``datasets``. (Whether a path exists
    is its caller's check.)

    Raises:
        DataError: one line naming the source and the fix (the install command of a missing package).
    """
    import importlib.util

    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        parquet = next((f for f in _local_files(path) if _data_suffix(f) == ".parquet"), None)
        if parquet is not None and importlib.util.find_spec("pyarrow") is None:
            raise DataError(f"reading {parquet} needs pyarrow: pip install 'linearize[data]'")
    elif not looks_like_path(text) and importlib.util.find_spec("datasets") is None:
        raise DataError(f"{text!r} is not an existing file or folder, and the `datasets` package needed to load it "
                        "as an HF dataset is not installed (pip install 'linearize[data]')")


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


def _mixture(sources: Sequence[str | Path], limit_chars: int | None, tokenizer: Any) -> Iterator[str]:
    """Documents of several sources interleaved so that each has given about the same number of characters so far:
    the next document comes from the source that has given the fewest (documents stay whole)."""
    streams = [_texts(s, None, tokenizer) for s in sources]
    given = [0] * len(streams)
    live = set(range(len(streams)))
    total = 0
    while live:
        i = min(live, key=lambda j: (given[j], j))
        text = next(streams[i], None)
        if text is None:
            live.discard(i)
            continue
        if limit_chars is not None:
            text = text[: limit_chars - total]
        given[i] += len(text)
        total += len(text)
        yield text
        if limit_chars is not None and total >= limit_chars:
            return


def _read(source: str | Path | Sequence[str | Path], limit_chars: int | None, tokenizer: Any) -> Iterator[str]:
    sources = data_sources(source)
    if len(sources) == 1:
        return _texts(sources[0], limit_chars, tokenizer)
    return _mixture(sources, limit_chars, tokenizer)


def read_texts(source: str | Path | Sequence[str | Path], *, limit_chars: int | None = None) -> Iterator[str]:
    """Yield the plain-text documents of a file, a folder or an HF dataset name (see the module docstring), or of
    a list of them mixed evenly by characters (each document whole; see ``_mixture``).

    Empty documents are skipped. ``limit_chars`` stops after that many characters (the last document is cut).

    Raises:
        DataError: nonexistent path, a folder without data files, an unknown record format (naming the file and
            the keys seen), unreadable or empty data, an HF dataset that cannot be loaded.
    """
    return _read(source, limit_chars, tokenizer=None)


def read_chat_texts(source: str | Path | Sequence[str | Path], tokenizer: Any, *,
                    limit_chars: int | None = None) -> Iterator[str]:
    """Like ``read_texts``, but instruction/chat records are rendered with ``tokenizer``'s chat template.

    Plain ``text`` records pass through unchanged.

    Raises:
        DataError: as ``read_texts``, or the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; read the data as plain text instead")
    return _read(source, limit_chars, tokenizer=tokenizer)


