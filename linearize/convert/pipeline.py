"""``linearize convert``: load a teacher, build calibration data, run attention transfer, export.

Resumable: everything a run needs is kept in a work folder beside the output (``.<out>.work``,
:class:`~linearize.training.WorkFolder`): the settings, the tokenised calibration data, the pre-training
measurements and transfer checkpoints. Re-running the same command after a kill continues from the last
checkpoint; the export appears (atomically) only when the run is done, and the work folder is removed then.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from linearize.convert.config import DEFAULT_SEQ_LEN, ConvertConfig
from linearize.convert.selection import CacheGeometry, extra_softmax_count, select_layers
from linearize.convert.surgery import linearize_model
from linearize.convert.transfer import attention_modules, installed, run_transfer
from linearize.devices import check_device, resolve_dtype
from linearize.errors import ConfigError, DataError, LinearizeError
from linearize.evaluate import compare_to_teacher
from linearize.export import existing_ancestor, is_complete_export, output_path_problem, save_linearized
from linearize.sources import ModelSpec, data_name, data_sources, looks_like_path
from linearize.locking import output_lock
from linearize.models import classes_for
from linearize.progress import Progress, QuietProgress
from linearize.training import StepHook, WorkFolder


@dataclass(frozen=True)
class ConvertJob:
    """One conversion: which teacher, where the export goes, the stage's settings. The CLI fills it from flags (or
    a recipe), ``linearize finetune`` from the recipe's ``model`` and ``convert`` sections."""

    model: ModelSpec
    """The teacher (hub id, local folder or .gguf) and how it loads."""
    out: Path
    settings: ConvertConfig = field(default_factory=ConvertConfig)
    seed: int = 0
    """Seeds calibration sampling and shuffling, data order and transfer."""
    overwrite: bool = False
    """Replace a finished export / discard an unfinished run with other settings."""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", ModelSpec(source=self.model))
        object.__setattr__(self, "out", Path(self.out))
        if self.settings.seq_len is None:  # the default: DEFAULT_SEQ_LEN, or the model's context if shorter
            from linearize.loading import inspect_source

            try:
                context = inspect_source(self.model.source).context
            except LinearizeError:  # check_inputs reports the unreadable source in its own words
                context = None
            seq_len = min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
            object.__setattr__(self, "settings", self.settings.replace(seq_len=seq_len))

    def fingerprint(self) -> dict:
        """The settings a resumed run must share (flat), with paths normalised (absolute, no trailing /)."""
        from linearize.loading import data_reference, model_reference

        d = {"model": model_reference(self.model.source), "dtype": self.model.dtype, "device": self.model.device,
             "out": str(self.out.absolute()), "seed": self.seed, **self.settings.model_dump(mode="json")}
        if self.settings.data is not None:
            d["data"] = data_reference(self.settings.data)
        return json.loads(json.dumps(d))


def check_inputs(job: ConvertJob) -> tuple[str, torch.dtype]:
    """Every check that needs no weights, before any heavy work: output path, device and dtype, calibration path,
    architecture and context length (from config.json / GGUF metadata), window vs sequence length, free disk space
    for the export. Returns (device, dtype).

    Raises:
        LinearizeError: one line naming the input and the fix (ConfigError / DataError / ModelLoadError subclasses).
    """
    from linearize.loading import inspect_source

    cfg, out = job.settings, job.out
    problem = output_path_problem(out)
    if problem:
        raise LinearizeError(f"--out {problem}; choose another --out")
    device = check_device(job.model.device, flag="--device")
    dtype = resolve_dtype(job.model.dtype, device)
    for one in data_sources(cfg.data):
        if looks_like_path(one) and not Path(one).expanduser().exists():
            raise DataError(f"--data {one} does not exist; pass a text/jsonl/json/parquet file, a folder of them, "
                            "a dataset name, or a comma-separated list of them")
    if cfg.tokens > 0 and cfg.window >= cfg.seq_len:
        raise ConfigError(f"--window {cfg.window} must be smaller than --seq-len {cfg.seq_len}: with every key inside "
                          "the window the linear part gets no training signal (raise --seq-len or lower --window)")
    info = inspect_source(job.model.source)
    if info.model_type is not None:
        if info.model_type.startswith("linearized_"):
            raise ConfigError(f"{job.model.source} is already linearized ({info.model_type}); convert its teacher "
                              "instead, or finetune it with `linearize finetune` (model.source: this folder)")
        classes_for(info.model_type)  # UnsupportedArchitectureError naming the supported ones, before any load
    if info.context is not None:
        for name, value in (("--seq-len", cfg.seq_len), ("--window", cfg.window)):
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


def convert(job: ConvertJob, *, progress: Progress | None = None, log: Callable[[str], None] | None = None,
            on_step: StepHook | None = None, stop_after: int | None = None) -> Path:
    """Run the whole conversion and return the export folder. See the module docstring for resume semantics.

    Args:
        progress: where progress and log lines go (default: ``log`` lines only, or nothing).
        on_step: called after every transfer step (see :func:`~linearize.training.run_loop`).
        stop_after: stop after this many transfer steps, leaving a checkpoint (raises KeyboardInterrupt); tests.
    """
    progress = progress or QuietProgress(log)
    if is_complete_export(job.out) and not job.overwrite:
        raise LinearizeError(f"{job.out} already holds a complete export; pass --overwrite to replace it")
    device, dtype = check_inputs(job)
    with output_lock(job.out):
        work = WorkFolder(WorkFolder.beside(job.out), job.fingerprint(), what="conversion",
                          discard_hint="pass --overwrite", worth_keeping="calibration.safetensors")
        work.open(overwrite=job.overwrite, progress=progress)
        return _run(job, work, device, dtype, progress, on_step, stop_after)


def _run(job: ConvertJob, work: WorkFolder, device: str, dtype: torch.dtype, progress: Progress,
         on_step: StepHook | None, stop_after: int | None) -> Path:
    from linearize.loading import load_model, model_reference

    cfg = job.settings
    t_start = time.perf_counter()
    model, tokenizer = load_model(job.model.source, dtype=dtype, device=device)
    adapter = classes_for(model.config.model_type)[1].adapter  # fails early, in one line, if unsupported
    n_layers = len(adapter.blocks(model))
    bad = [i for i in cfg.softmax_layers if i >= n_layers]
    if bad:
        raise ConfigError(f"--softmax-layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    geometry = CacheGeometry.from_config(model.config.to_dict(), cfg.attention(), model.dtype.itemsize)
    n_extra = extra_softmax_count(cfg, geometry)  # a budget below the minimum fails here, before any heavy work
    train, valid, source_desc = _calibration(job, work, model, tokenizer, progress)

    teacher = attention_modules(model, adapter)
    attention = cfg.attention()
    students = {i: adapter.build(m, attention, i) for i, m in teacher.items() if i not in cfg.softmax_layers}
    for s in students.values():
        s.linear_attn.to(device)

    measure_batch = max(1, min(cfg.batch_size, 8))

    def measure() -> dict:
        return compare_to_teacher(model, lambda: installed(model, adapter, teacher),
                                  lambda: installed(model, adapter, students), valid, measure_batch,
                                  progress=progress)

    before = work.record("before", measure)
    result = None
    if cfg.tokens > 0 and train.shape[0] > 0:
        result = run_transfer(model, adapter, teacher, students, train, valid, cfg.transfer(), work_dir=work.path,
                              seed=job.seed, progress=progress, on_step=on_step, stop_after=stop_after)
        if stop_after is not None and result.layer_loss_after == {}:
            raise KeyboardInterrupt(f"stopped after {result.steps} steps (checkpoint saved)")
    after = measure()
    selection = None
    if n_extra is not None:  # score the trained students, keep the most sensitive layers softmax
        selection = work.record("selection", lambda: select_layers(
            cfg, geometry, n_extra, model, adapter, teacher, students, valid, measure_batch,
            kl_all_linear=after["kl"], progress=progress, record=work.record))
        for i in selection["chosen"]:
            del students[i]  # its trained map is dropped: the layer keeps the teacher's attention
        attention = attention.replace(softmax_layers=selection["softmax_layers"])
        if selection["chosen"]:
            selection["trained_all_linear"] = after
            after = work.record("after-selection", measure)  # the exported model

    teacher_ref = model_reference(job.model.source)  # absolute for local teachers: finetune may run from elsewhere
    linearize_model(model, attention, teacher=teacher_ref, prebuilt=students)
    report = {
        "teacher": teacher_ref,
        "architecture": model.config.model_type,
        "settings": job.fingerprint(),
        "calibration": {"source": source_desc, "train_sequences": int(train.shape[0]),
                        "valid_sequences": int(valid.shape[0]), "seq_len": int(train.shape[1])},
        "untrained": before,
        "trained": after,
        "kl_reduction": before["kl"] / max(after["kl"], 1e-12),
        "selection": selection,
        "layer_loss_before": result.layer_loss_before if result else {},
        "layer_loss_after": result.layer_loss_after if result else {},
        "transfer_blocks": result.blocks if result else [],
        "steps": result.steps if result else 0,
        "transfer_seconds": result.seconds if result else 0.0,
        "resumed_from_step": result.resumed_from if result else 0,
        "total_seconds": time.perf_counter() - t_start,
        "device": device,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    }
    progress.log(f"exporting to {job.out}")
    save_linearized(model, job.out, tokenizer=tokenizer, overwrite=job.overwrite,
                    extra_files={"transfer_report.json": json.dumps(report, indent=2)},
                    delta_base=teacher_ref if cfg.export == "delta" else None)
    work.remove()
    return job.out


def _calibration(job: ConvertJob, work: WorkFolder, model, tokenizer, progress: Progress):
    """(train, valid, description): tokenised calibration blocks, built once and kept in the work folder so that a
    resumed run sees identical batches."""
    cfg = job.settings

    def build():
        from linearize.data import build_calibration

        val_tokens = cfg.val_tokens or max(4 * cfg.seq_len, cfg.tokens // 20)
        progress.log(f"building calibration data ({cfg.tokens:,} + {val_tokens:,} tokens, seq_len {cfg.seq_len}) "
                     f"from {data_name(cfg.data) or 'text sampled from the teacher'}")
        calib = build_calibration(
            tokenizer, source=cfg.data, model=model, n_tokens=cfg.tokens, seq_len=cfg.seq_len,
            val_fraction=val_tokens / max(1, cfg.tokens + val_tokens), seed=job.seed,
            sampling_dir=work.path / "sampling",  # a kill while the teacher writes its text keeps what it wrote
            progress=progress,
        )
        return {"train": calib.train, "valid": calib.valid}, {"source": calib.source_desc}

    tensors, meta = work.tensors("calibration", build)
    return tensors["train"], tensors["valid"], meta["source"]
