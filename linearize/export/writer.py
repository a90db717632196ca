"""HF-native export: safetensors + config.json (+ tokenizer), loadable by ``AutoModelForCausalLM.from_pretrained``.

Two ways to load the result:
- after ``import linearize`` (which registers the ``linearized_*`` model types), plainly;
- with ``trust_remote_code=True`` without importing linearize: ``config.json``'s ``auto_map`` points at a small
  ``modeling_linearize.py`` written next to the weights, which imports the classes from the installed package.

Every ``save_pretrained`` of a linearized config or model (and so ``push_to_hub``, and a re-save of a loaded export)
writes the ``auto_map`` and the shim together (:func:`linearize.models.remote_code.write_remote_code`), so no saved folder points at a file it
lacks. :func:`save_linearized` adds the tokenizer, the reports and a model card (``README.md``,
:mod:`linearize.export.card`), with no local path in any file (:mod:`linearize.io.portable`), writes to a temporary folder
beside the destination and renames it into place when complete, so an interrupted export never looks finished. No
pickle: weights are safetensors only.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from linearize.errors import LinearizeError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["WRITTEN_BY", "check_export_folder", "check_output_file", "existing_ancestor",
           "is_complete_export", "is_linearize_export", "is_linearize_file", "marked_json", "output_path_problem",
           "png_metadata", "result_rows", "save_linearized", "write_output_file", "written_by"]


def __getattr__(name: str):
    # SHIM_NAME (linearize.models.remote_code's) loads on first use: importing this module loads neither torch nor
    # the model classes, so the output checks eval and bench run before anything else take a fraction of a second
    if name == "SHIM_NAME":
        from linearize.models.remote_code import SHIM_NAME

        return SHIM_NAME
    raise AttributeError(f"module 'linearize.export.writer' has no attribute {name!r}")


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists (absolute)."""
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def output_path_problem(out: Path) -> str | None:
    """Why ``out`` cannot become an export folder (an existing file; its folder or nearest existing parent not
    writable), or None."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        return f"{out} exists and is a file, not a folder"
    parent = existing_ancestor(out)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{out}: cannot write in {parent} (read-only or no permission)"
    return None


def is_complete_export(path: Path) -> bool:
    """A folder that looks like a finished model: ``config.json`` and safetensors weights (a teacher folder too)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def is_linearize_export(path: Path) -> bool:
    """A finished export written by linearize: a complete export whose ``config.json`` names one of our model types
    (``linearized_*``). The only kind of folder ``--overwrite`` may replace."""
    path = Path(path)
    if not is_complete_export(path):
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("model_type", "")).startswith("linearized_")


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_export_folder(out: str | Path, *, overwrite: bool, sources: tuple[str | Path, ...] = (),
                        flag: str = "--out") -> Path:
    """The rules every writer of an export folder follows, checked before any heavy work; returns ``out``.

    linearize never removes what it did not write. ``out`` may be a new path, an empty folder, or (with
    ``overwrite``) a finished linearize export, which the new export replaces. Refused whatever ``overwrite`` says:
    an empty name; the working directory or a folder holding it; a source (``sources``: the teacher, the model being
    finetuned) or a folder holding one; an existing file; a non-empty folder that is not a linearize export. (A
    run's unfinished work lives beside ``out``, in ``.<name>.work``, never inside it.)

    Raises:
        LinearizeError: one line naming ``flag``, the folder and the fix.
    """
    if str(out).strip() == "":
        raise LinearizeError(f"{flag} is empty; name a new folder for the export")
    out = Path(out).expanduser()
    problem = output_path_problem(out)
    if problem:
        raise LinearizeError(f"{flag} {problem}; choose another {flag}")
    real = _resolved(out)
    cwd = _resolved(Path.cwd())
    if real == cwd or real in cwd.parents:
        raise LinearizeError(f"{flag} {out} is the working directory{'' if real == cwd else ' or holds it'}; an "
                             "export replaces its folder, so name a new folder (e.g. --out my-model-linearized)")
    for source in sources:
        if source is None or not Path(str(source)).expanduser().exists():
            continue  # a hub id: nothing on disk to protect
        src = _resolved(Path(str(source)))
        if real == src or real in src.parents:
            raise LinearizeError(f"{flag} {out} {'is' if real == src else 'holds'} the source model {source}; an "
                                 "export replaces its folder, so name a new folder")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and not is_linearize_export(out):
            shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
            raise LinearizeError(f"{flag} {out} is a folder holding other files ({shown}), not a linearize export; "
                                 "linearize never replaces a folder it did not write, --overwrite or not: choose "
                                 f"another {flag} (a new or empty folder)")
        if entries and not overwrite:
            raise LinearizeError(f"{out} already holds a linearize export; pass --overwrite to replace it, or choose "
                                 f"another {flag}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Result files (eval's and bench's --json / --plot): the same rule as export folders, for single files
# ---------------------------------------------------------------------------------------------------------------
WRITTEN_BY = "written_by"
"""The top-level key of every result JSON linearize writes; its value is :func:`written_by`. PNGs carry the same
text in their ``Software`` text chunk (:func:`png_metadata`)."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_RESULT_BYTES = 64 << 20  # linearize's results are far smaller: a larger file is not one of them


def written_by() -> str:
    """``"linearize X.Y.Z"``: the marker of a file linearize wrote."""
    from linearize import __version__

    return f"linearize {__version__}"


def png_metadata() -> dict[str, str]:
    """``savefig(..., metadata=png_metadata())``: the PNG's ``Software`` text chunk says linearize wrote it."""
    return {"Software": written_by()}


def marked_json(payload: dict | list) -> str:
    """``payload`` as the indented text of a result file, marked as linearize's: a dict gains ``written_by`` (first),
    a list of rows becomes ``{"written_by": ..., "rows": [...]}`` (read back by :func:`result_rows`)."""
    body = {"rows": payload} if isinstance(payload, list) else {k: v for k, v in payload.items() if k != WRITTEN_BY}
    return json.dumps({WRITTEN_BY: written_by(), **body}, indent=1) + "\n"


def result_rows(data: dict | list) -> list:
    """The rows of a bench result as :func:`marked_json` wrote them (``data["rows"]``), or a bare list (files written
    before the marker)."""
    return data.get("rows", []) if isinstance(data, dict) else data


def _png_text(path: Path, key: str) -> str | None:
    """The value of ``key`` in a PNG's tEXt chunks (None: not a PNG, or no such chunk before the image data)."""
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            size, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"tEXt" and size < 1 << 16:
                name, _, value = f.read(size).partition(b"\0")
                if name.decode("latin-1") == key:
                    return value.decode("latin-1")
                f.seek(4, os.SEEK_CUR)  # CRC
            elif kind in (b"IDAT", b"IEND"):
                return None
            else:
                f.seek(size + 4, os.SEEK_CUR)


def is_linearize_file(path: str | Path) -> bool:
    """A result file linearize wrote: a JSON object whose ``written_by`` names linearize, or a PNG whose ``Software``
    text chunk does. The only kind of file ``--overwrite`` may replace."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _MAX_RESULT_BYTES:
            return False
        software = _png_text(path, "Software")
        if software is not None:
            return software.startswith("linearize ")
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get(WRITTEN_BY, "")).startswith("linearize ")


def check_output_file(path: str | Path, *, overwrite: bool, flag: str) -> Path:
    """The rule every writer of a result file follows, checked before any heavy work; returns ``path``.

    linearize never replaces a file it did not write. ``path`` may be a new file in a folder that exists or can be
    made, or (with ``overwrite``) a file linearize wrote (:func:`is_linearize_file`). Refused whatever ``overwrite``
    says: an empty name; a folder; a file linearize did not write.

    Raises:
        LinearizeError: one line naming ``flag``, the path and the fix.
    """
    if str(path).strip() == "":
        raise LinearizeError(f"{flag} is empty; name a file")
    path = Path(path).expanduser()
    if path.is_dir():
        raise LinearizeError(f"{flag} {path} is a folder; name a file (e.g. {path / 'result.json'})")
    if path.exists() or path.is_symlink():
        if not is_linearize_file(path):
            raise LinearizeError(f"{flag} {path} exists and was not written by linearize; linearize never replaces a "
                                 f"file it did not write, --overwrite or not: choose another {flag}")
        if not overwrite:
            raise LinearizeError(f"{flag} {path} holds an earlier linearize result; pass --overwrite to replace it, "
                                 f"or choose another {flag}")
    parent = existing_ancestor(path.parent)
    if not parent.is_dir():
        raise LinearizeError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LinearizeError(f"{flag} {path}: cannot write in {parent} (read-only or no permission); choose another "
                             f"{flag}")
    return path


def write_output_file(path: str | Path, data: str | bytes) -> Path:
    """Write a result file (its folder made when missing) through a temporary file beside it, so an interrupted
    write never leaves half a file; the caller checked ``path`` with :func:`check_output_file`.

    Raises:
        LinearizeError: the write failed (disk full, permissions), naming the file.
    """
    path = Path(path).expanduser()
    parent = existing_ancestor(path.parent)
    if not parent.is_dir():
        raise LinearizeError(f"cannot write {path}: {parent} is a file, not a folder")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise LinearizeError(f"cannot write {path}: {why}") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_linearized(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    adapter_dir: str | Path | None = None,
    delta_base: str | None = None,
) -> Path:
    """Write ``model`` (a ``Linearized*`` model), its tokenizer and ``extra_files`` to ``out_dir`` atomically.

    ``delta_base`` (the reference of the model the conversion started from) writes a delta export instead: only the
    parameters linearization added, rebuilt on that base by ``from_pretrained`` (``models/delta.py``); valid only
    when every base weight is unchanged (stage 1).

    ``adapter_dir`` (a folder written by a peft model's ``save_pretrained``, wrapping ``model``) is moved to
    ``out_dir/adapter`` and names the export folder itself as its base, as ``"."`` (no path): the base weights and
    feature maps it was trained with (not those of the folder finetuning started from). The folder also gets a model
    card (``README.md``, :mod:`linearize.export.card`), and no file in it names a local path (:mod:`linearize.io.portable`).

    Raises:
        LinearizeError: ``out_dir`` breaks a rule of :func:`check_export_folder` (e.g. it is a folder linearize did
            not write, or holds an export and ``overwrite`` is False).
    """
    out = Path(out_dir).absolute()
    check_export_folder(out, overwrite=overwrite)  # again at the end of a long run: never replace what we did not write
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise LinearizeError(f"cannot write the export to {out}: {e.strerror}; choose another output") from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; an export gets the modes a plain save_pretrained gives
    try:
        try:
            _write_export(model, tmp, out, tokenizer, extra_files, adapter_dir, delta_base)
        except OSError as e:
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise LinearizeError(f"writing the export to {out} failed: {why}; nothing was left there (free some "
                                 "space or choose another output, then rerun the same command)") from None
        if out.exists():  # an empty folder or, with overwrite, a linearize export (check_export_folder)
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))  # a fresh name, never a user's
            out.rename(backup)  # onto the empty folder mkdtemp made
            tmp.rename(out)
            shutil.rmtree(backup)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_export(model: nn.Module, tmp: Path, out: Path, tokenizer, extra_files, adapter_dir,
                  delta_base: str | None = None) -> None:
    """Everything an export holds, written into ``tmp``: weights and config (or a delta), the adapter, tokenizer,
    reports (their local paths replaced by names, :mod:`linearize.io.portable`), the model card, normal file modes."""
    from linearize.export.card import CARD_NAME, write_card

    if delta_base is not None:
        from linearize.models.delta import write_delta

        write_delta(model, tmp, delta_base)
    else:
        model.save_pretrained(tmp, safe_serialization=True)  # writes the remote-code shim too
    if adapter_dir is not None:
        shutil.copytree(str(adapter_dir), str(tmp / "adapter"))  # copied: a failed export keeps the source
        _retarget_adapter(tmp / "adapter")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(_portable_file(name, text))
    if CARD_NAME not in (extra_files or {}):
        write_card(tmp, name=out.name)
    _normal_modes(tmp)


def _portable_file(name: str, text: str) -> str:
    """A report as the export keeps it: every absolute path in it replaced by ``local:<name>``."""
    from linearize.io.portable import portable_json, portable_text

    if name.endswith(".json"):
        try:
            return json.dumps(portable_json(json.loads(text)), indent=2)
        except ValueError:
            pass
    return "\n".join(portable_text(line) for line in text.split("\n"))


def _normal_modes(folder: Path) -> None:
    """The modes a plain ``save_pretrained`` gives under the umask (0644 files, 0755 folders with umask 022): some
    writers (safetensors through a temporary file, ``mkdtemp``) leave 0600 / 0700."""
    mask = _umask()
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _retarget_adapter(adapter_dir: Path) -> None:
    """Name the export holding the adapter (its base weights and the feature maps it was trained with) as the
    adapter's base model: ``"."`` in adapter_config.json, a relative name that holds wherever the folder goes (peft
    resolves it against the working directory: ``AutoPeftModelForCausalLM.from_pretrained("adapter")`` inside the
    export; ``PeftModel.from_pretrained(model, EXPORT, subfolder="adapter")`` anywhere). The card peft wrote loses its
    ``base_model`` (a local path) and any other local path."""
    from huggingface_hub import ModelCard

    from linearize.io.portable import portable_text

    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "."
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    card_path = adapter_dir / "README.md"
    if card_path.is_file():
        card = ModelCard.load(card_path)
        card.data.base_model = None
        card.data.tags = [t for t in card.data.tags or [] if not t.startswith("base_model:")] or None
        card.content = "\n".join(portable_text(line) for line in str(card).split("\n"))
        card.save(card_path)
