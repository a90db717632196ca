"""``linearize convert``: load a teacher, build calibration data, run attention transfer, export.

Resumable: everything a run needs is kept in a work folder beside the output (``.<out>.work``): the settings, the
tokenised calibration data, the pre-training measurements and transfer checkpoints. Re-running the same command
after a kill continues from the last checkpoint; the export appears (atomically) only when the run is done, and
the work folder is removed then.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from linearize.convert.surgery import linearize_model
from linearize.convert.transfer import (
    TransferConfig,
    attention_modules,
    installed,
    run_transfer,
)
from linearize.errors import ConfigError, DataError, LinearizeError
from linearize.evaluate import compare_to_teacher
from linearize.export import existing_ancestor, is_complete_export, output_path_problem, save_linearized
from linearize.locking import output_lock
from linearize.models import classes_for
from linearize.modules.attention import LinearAttentionConfig


@dataclass
class ConvertOptions:
    """Everything ``linearize convert`` needs; the CLI fills it from flags, recipes from YAML."""

    model: str
    """Hub id, local folder, or .gguf file of the teacher."""
    out: Path
    attention: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    data: str | None = None
    """Calibration text (file, folder, or dataset name); None = text sampled from the teacher itself."""
    tokens: int = 200_000
    """Training tokens for attention transfer (0 = export the untrained map)."""
    seq_len: int = 256
    val_tokens: int | None = None
    """Held-out tokens for the report (default: 5% of ``tokens``, at least 4 sequences)."""
    dtype: str | None = None
    """Teacher dtype: float32 / bfloat16 / float16 (default: bfloat16 on CUDA, float32 on CPU)."""
    device: str | None = None
    overwrite: bool = False

    def fingerprint(self) -> dict:
        """The settings a resumed run must share, with paths normalised (absolute, no trailing /)."""
        from linearize.loading import model_reference

        d = asdict(self)
        d["out"] = str(Path(self.out).absolute())
        d["model"] = model_reference(self.model)
        if self.data is not None:
            d["data"] = model_reference(self.data)
        d.pop("overwrite")
        return d


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def check_device(device: str | None, *, flag: str) -> str:
    """``device`` (None = cuda when available) if this PyTorch can use it.

    Raises:
        ConfigError: not a device name, or a CUDA device this PyTorch cannot see.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {device!r} is not a device; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise ConfigError(f"{flag} {device}: this PyTorch ({torch.__version__}, {build}) has no CUDA GPU; "
                              f"use {flag} cpu")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{flag} {device}: only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise ConfigError(f"{flag} {device!r}: linearize runs on cpu or cuda")
    return device


def _resolve_device_dtype(opts: ConvertOptions) -> tuple[str, torch.dtype]:
    device = check_device(opts.device, flag="--device")
    name = opts.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"dtype={name!r} must be one of {sorted(dtypes)}")
    return device, dtypes[name]


def check_inputs(opts: ConvertOptions) -> tuple[str, torch.dtype]:
    """Every check that needs no weights, before any heavy work: output path, device and dtype, calibration path,
    architecture and context length (from config.json / GGUF metadata), window vs sequence length, free disk space
    for the export. Returns (device, dtype).

    Raises:
        LinearizeError: one line naming the input and the fix (ConfigError / DataError / ModelLoadError subclasses).
    """
    from linearize.data import _looks_like_path
    from linearize.loading import inspect_source

    out = Path(opts.out)
    problem = output_path_problem(out)
    if problem:
        raise LinearizeError(f"--out {problem}; choose another --out")
    device, dtype = _resolve_device_dtype(opts)
    if opts.data is not None and _looks_like_path(str(opts.data)) and not Path(opts.data).expanduser().exists():
        raise DataError(f"--data {opts.data} does not exist; pass a text/jsonl/json/parquet file, a folder of them, "
                        "or a dataset name")
    if opts.seq_len <= 0 or opts.tokens < 0:
        raise ConfigError(f"--seq-len must be positive and --tokens non-negative (got {opts.seq_len}, {opts.tokens})")
    window = opts.attention.window
    if opts.tokens > 0 and window >= opts.seq_len:
        raise ConfigError(f"--window {window} must be smaller than --seq-len {opts.seq_len}: with every key inside the "
                          "window the linear part gets no training signal (raise --seq-len or lower --window)")
    info = inspect_source(opts.model)
    if info.model_type is not None:
        if info.model_type.startswith("linearized_"):
            raise ConfigError(f"{opts.model} is already linearized ({info.model_type}); convert its teacher instead, "
                              "or finetune it with `linearize finetune` (model.source: this folder)")
        classes_for(info.model_type)  # UnsupportedArchitectureError naming the supported ones, before any load
    if info.context is not None:
        for name, value in (("--seq-len", opts.seq_len), ("--window", window)):
            if value > info.context:
                raise ConfigError(f"{name} {value} is beyond the model's context of {info.context} tokens; use at most "
                                  f"{info.context}")
    if info.n_params:
        need = int(info.n_params * torch.finfo(dtype).bits / 8 * 1.05) + (64 << 20)
        free = shutil.disk_usage(existing_ancestor(out)).free
        if free < need:
            raise LinearizeError(f"not enough free disk space for the export at {out}: about {need / 2**20:,.0f} MiB "
                                 f"needed, {free / 2**20:,.0f} MiB free; free some space or choose another --out")
    return device, dtype


def describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable ``key: old -> new`` lines between two fingerprints."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _prepare_work(work: Path, fingerprint: dict, *, overwrite: bool, log: Callable[[str], None]) -> None:
    """Create or reuse the work folder. Unfinished work with other settings is refused (naming them), unless
    ``overwrite``, or unless it holds nothing worth resuming (no calibration data yet: e.g. a run that failed on
    bad input)."""
    settings_file = work / "settings.json"
    if work.exists():
        previous = json.loads(settings_file.read_text()) if settings_file.exists() else {}
        if previous != fingerprint:
            if overwrite or not (work / "calibration.safetensors").exists():
                shutil.rmtree(work)
            else:
                diff = "; ".join(describe_differences(previous, fingerprint)[:6])
                raise LinearizeError(
                    f"{work} holds an unfinished run with different settings ({diff}); rerun with the same settings to "
                    "resume, or pass --overwrite to discard it and start over"
                )
        else:
            log(f"resuming the unfinished run in {work}")
    work.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(fingerprint, indent=2))


def convert(opts: ConvertOptions, *, log: Callable[[str], None] = print, progress=None, stop_after: int | None = None) -> Path:
    """Run the whole conversion and return the export folder. See the module docstring for resume semantics."""
    out = Path(opts.out)
    if is_complete_export(out) and not opts.overwrite:
        raise LinearizeError(f"{out} already holds a complete export; pass --overwrite to replace it")
    device, dtype = check_inputs(opts)
    work = _work_dir(out)
    with output_lock(out):
        return _convert_locked(opts, out, work, device, dtype, log=log, progress=progress, stop_after=stop_after)


def _convert_locked(opts: ConvertOptions, out: Path, work: Path, device: str, dtype: torch.dtype, *,
                    log: Callable[[str], None], progress, stop_after: int | None) -> Path:
    from linearize.data import build_calibration
    from linearize.loading import load_teacher, model_reference

    _prepare_work(work, json.loads(json.dumps(opts.fingerprint())), overwrite=opts.overwrite, log=log)
    t_start = time.perf_counter()
    model, tokenizer = load_teacher(opts.model, dtype=dtype, device=device)
    _, model_cls = classes_for(model.config.model_type)  # fails early, in one line, if unsupported
    adapter = model_cls.adapter
    n_layers = len(adapter.blocks(model))
    bad = [i for i in opts.attention.softmax_layers if i >= n_layers]
    if bad:
        raise ConfigError(f"--keep-softmax-layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")

    # -- calibration data (cached in the work folder so a resumed run sees identical batches) --------------------
    calib_file = work / "calibration.safetensors"
    if calib_file.exists():
        saved = load_file(str(calib_file))
        train, valid = saved["train"], saved["valid"]
        source_desc = json.loads((work / "calibration.json").read_text())["source"]
    else:
        val_tokens = opts.val_tokens or max(4 * opts.seq_len, opts.tokens // 20)
        log(f"building calibration data ({opts.tokens:,} + {val_tokens:,} tokens, seq_len {opts.seq_len}) "
            f"from {opts.data or 'text sampled from the teacher'}")
        calib = build_calibration(
            tokenizer, source=opts.data, model=model, n_tokens=opts.tokens, seq_len=opts.seq_len,
            val_fraction=val_tokens / max(1, opts.tokens + val_tokens), seed=opts.transfer.seed,
            sampling_dir=work / "sampling",  # a kill while the teacher writes its text keeps what it wrote
        )
        train, valid, source_desc = calib.train, calib.valid, calib.source_desc
        save_file({"train": train.contiguous(), "valid": valid.contiguous()}, str(calib_file))
        (work / "calibration.json").write_text(json.dumps({"source": source_desc}))

    teacher = attention_modules(model, adapter)
    students = {
        i: adapter.build(m, opts.attention, i) for i, m in teacher.items() if i not in opts.attention.softmax_layers
    }
    for s in students.values():
        s.linear_attn.to(device)

    def teacher_ctx():
        return installed(model, adapter, teacher)

    def student_ctx():
        return installed(model, adapter, students)

    eval_batch = max(1, min(opts.transfer.batch_size, 8))
    before_file = work / "before.json"
    if before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        log("measuring the untrained feature map against the teacher")
        before = compare_to_teacher(model, teacher_ctx, student_ctx, valid, eval_batch)
        before_file.write_text(json.dumps(before))

    result = None
    if opts.tokens > 0 and train.shape[0] > 0:
        result = run_transfer(
            model, adapter, teacher, students, train, valid, opts.transfer, work_dir=work,
            progress=progress, stop_after=stop_after,
        )
        if stop_after is not None and result.layer_loss_after == {}:
            raise KeyboardInterrupt(f"stopped after {result.steps} steps (checkpoint saved)")
    after = compare_to_teacher(model, teacher_ctx, student_ctx, valid, eval_batch)

    teacher_ref = model_reference(opts.model)  # absolute for local teachers: finetune may run from elsewhere
    linearize_model(model, opts.attention, teacher=teacher_ref, prebuilt=students)
    report = {
        "teacher": teacher_ref,
        "architecture": model.config.model_type,
        "settings": opts.fingerprint(),
        "calibration": {"source": source_desc, "train_sequences": int(train.shape[0]),
                        "valid_sequences": int(valid.shape[0]), "seq_len": int(train.shape[1])},
        "untrained": before,
        "trained": after,
        "kl_reduction": before["kl"] / max(after["kl"], 1e-12),
        "layer_loss_before": result.layer_loss_before if result else {},
        "layer_loss_after": result.layer_loss_after if result else {},
        "steps": result.steps if result else 0,
        "transfer_seconds": result.seconds if result else 0.0,
        "resumed_from_step": result.resumed_from if result else 0,
        "total_seconds": time.perf_counter() - t_start,
        "device": device,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    }
    save_linearized(
        model, out, tokenizer=tokenizer, overwrite=opts.overwrite,
        extra_files={"transfer_report.json": json.dumps(report, indent=2)},
    )
    shutil.rmtree(work, ignore_errors=True)
    return out
