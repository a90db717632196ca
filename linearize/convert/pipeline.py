"""``linearize convert``: load a teacher, build calibration data, run attention transfer, export.

Resumable: everything a run needs is kept in a work folder beside the output (``.<out>.work``,
:class:`~linearize.run.loop.WorkFolder`): the settings, the tokenised calibration data, the pre-training
measurements and transfer checkpoints. Re-running the same command after a kill continues from the last
checkpoint; the export appears (atomically) only when the run is done, and the work folder is removed then.

Several processes (``torchrun --nproc_per_node N -m linearize.convert ...``, ``accelerate launch -m linearize
convert ...``; :func:`launched_processes`): every process loads the teacher and runs attention transfer on its share
of each step's batch (``convert/transfer.py``); the main process alone holds the output's lock, opens the work
folder, builds the calibration data (the others read ``calibration.safetensors`` once it is written), measures the
model before and after, chooses softmax layers, exports and logs. The others wait for each of those steps and stop
with an error if the main process failed in it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from linearize.convert.config import DEFAULT_SEQ_LEN, ConvertConfig
from linearize.convert.selection import (
    extra_softmax_count,
    recall_blocks_needed,
    select_layers,
    select_window_only,
)
from linearize.convert.surgery import linearize_model
from linearize.convert.transfer import attention_modules, installed, run_transfer
from linearize.errors import ConfigError, DataError, LinearizeError
from linearize.export.writer import check_export_folder, existing_ancestor, save_linearized
from linearize.io.devices import check_device, resolve_dtype
from linearize.io.sources import ModelSpec, data_name, data_sources, looks_like_path
from linearize.metrics import compare_to_teacher
from linearize.models import classes_for
from linearize.models.sliding import cache_geometry, kept_local_layers, layer_kinds, sliding_window
from linearize.run.locking import output_lock
from linearize.run.loop import StepHook, WorkFolder
from linearize.run.processes import Processes, on_main, share
from linearize.run.progress import Progress, QuietProgress

T = TypeVar("T")


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
            from linearize.io.loading import inspect_source

            try:
                context = inspect_source(self.model.source).context
            except LinearizeError:  # check_inputs reports the unreadable source in its own words
                context = None
            seq_len = min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
            object.__setattr__(self, "settings", self.settings.replace(seq_len=seq_len))

    def fingerprint(self) -> dict:
        """The settings a resumed run must share (flat), with paths normalised (absolute, no trailing /)."""
        from linearize.io.loading import data_reference, model_reference

        d = {"model": model_reference(self.model.source), "dtype": self.model.dtype, "device": self.model.device,
             "out": str(self.out.absolute()), "seed": self.seed, **self.settings.model_dump(mode="json")}
        if self.settings.data is not None:
            d["data"] = data_reference(self.settings.data)
        return json.loads(json.dumps(d))


def check_inputs(job: ConvertJob) -> tuple[str, torch.dtype]:
    """Every check that needs no weights, before any heavy work: output path (the rules of
    :func:`~linearize.export.writer.check_export_folder`), device and dtype, calibration sources (they exist and can be
    read: :func:`~linearize.data.records.check_data_source`),
    architecture and context length (from config.json / GGUF metadata), window vs sequence length, free disk space
    for the export. Returns (device, dtype).

    Raises:
        LinearizeError: one line naming the input and the fix (ConfigError / DataError / ModelLoadError subclasses).
    """
    from linearize.data.records import check_data_source
    from linearize.io.loading import inspect_source

    cfg, out = job.settings, job.out
    check_export_folder(out, overwrite=job.overwrite, sources=(job.model.source,))
    device = check_device(job.model.device, flag="--device")
    dtype = resolve_dtype(job.model.dtype, device)
    for one in data_sources(cfg.data):
        if looks_like_path(one) and not Path(one).expanduser().exists():
            raise DataError(f"--data {one} does not exist; pass a text/jsonl/json/parquet file, a folder of them, "
                            "a dataset name, or a comma-separated list of them")
        check_data_source(one)  # readable files, pyarrow for parquet, datasets for a dataset name
    if cfg.tokens > 0 and cfg.window >= cfg.seq_len:
        raise ConfigError(f"--window {cfg.window} must be smaller than --seq-len {cfg.seq_len}: with every key inside "
                          "the window the linear part gets no training signal (raise --seq-len or lower --window)")
    info = inspect_source(job.model.source)
    if info.model_type is not None:
        if info.model_type.startswith("linearized_"):
            raise ConfigError(f"{job.model.source} is already linearized ({info.model_type}); convert its teacher "
                              "instead, or finetune it with `linearize finetune` (model.source: this folder)")
        classes_for(info.model_type)  # UnsupportedArchitectureError naming the supported ones, before any load
        if info.kind == "folder":  # --layers against the teacher's local layers (a GGUF or hub id: once loaded)
            from transformers import AutoConfig

            kept_local_layers(cfg.layers, AutoConfig.from_pretrained(job.model.source), seq_len=_transfer_length(cfg))
    if info.context is not None:
        for name, value in (("--seq-len", cfg.seq_len), ("--window", cfg.window),
                            ("--recall-context", cfg.recall_context or 0)):
            if value > info.context:
                raise ConfigError(f"{name} {value} is beyond the model's context of {info.context} tokens; use at most "
                                  f"{info.context}")
    selecting = cfg.auto_softmax_layers is not None or cfg.state_budget is not None or cfg.window_only_on
    if cfg.recall_context and cfg.selection_score != "kl" and selecting and cfg.tokens > 0:
        blocks = cfg.held_out_tokens // cfg.seq_len
        need = recall_blocks_needed(cfg.recall_context, cfg.seq_len)
        if blocks < need:
            raise ConfigError(f"--recall-context {cfg.recall_context} joins {need} held-out blocks of --seq-len "
                              f"{cfg.seq_len} per probe, but --val-tokens gives about {blocks}: raise --val-tokens to "
                              f"at least {need * cfg.seq_len} or shorten --recall-context")
    if info.n_params:
        need = int(info.n_params * torch.finfo(dtype).bits / 8 * 1.05) + (64 << 20)
        free = shutil.disk_usage(existing_ancestor(out)).free
        if free < need:
            raise LinearizeError(f"not enough free disk space for the export at {out}: about {need / 2**20:,.0f} MiB "
                                 f"needed, {free / 2**20:,.0f} MiB free; free some space or choose another --out")
    return device, dtype


def _transfer_length(cfg: ConvertConfig) -> int | None:
    """The sequence length at which the students run the teacher's attention as exact softmax (attention transfer,
    layer scoring), or None when neither runs."""
    scoring = cfg.auto_softmax_layers is not None or cfg.state_budget is not None
    return cfg.seq_len if cfg.tokens > 0 or scoring else None


def convert(job: ConvertJob, *, progress: Progress | None = None, log: Callable[[str], None] | None = None,
            on_step: StepHook | None = None, stop_after: int | None = None,
            processes: Processes | None = None) -> Path:
    """Run the whole conversion and return the export folder. See the module docstring for resume semantics.

    Args:
        progress: where progress and log lines go (default: ``log`` lines only, or nothing); main process only.
        on_step: called after every transfer step (see :func:`~linearize.run.loop.run_loop`).
        stop_after: stop after this many transfer steps, leaving a checkpoint (raises KeyboardInterrupt); tests.
        processes: the process group when every process of a distributed launch calls this
            (:func:`launched_processes`); default one process. On CUDA each process uses its own GPU.
    """
    main = processes is None or processes.is_main_process
    progress = (progress or QuietProgress(log)) if main else QuietProgress()
    device, dtype = check_inputs(job)
    if processes is not None and processes.num_processes > 1:
        share(job.settings.batch_size, processes)  # a batch that does not split fails before any heavy work
        if device.startswith("cuda"):
            device = str(processes.device)
        progress.log(f"attention transfer on {processes.num_processes} processes ({device} on the main one)")
    work = WorkFolder(WorkFolder.beside(job.out), job.fingerprint(), what="conversion",
                      discard_hint="pass --overwrite", worth_keeping="calibration.safetensors")
    with contextlib.ExitStack() as held:
        def open_work() -> None:
            held.enter_context(output_lock(job.out))
            work.open(overwrite=job.overwrite, progress=progress)

        on_main(processes, open_work)
        return _run(job, work, device, dtype, progress, on_step, stop_after, processes)


@contextlib.contextmanager
def _linear_part_off(model, adapter, students: dict):
    """The students installed with their recurrent part switched off (sinks + window only): the conversion's own
    linear-off row, the StreamingLLM-like baseline ``linearize eval`` prints beside every model."""
    from linearize.modules.attention import linear_part_off

    with installed(model, adapter, students), linear_part_off(s.linear_attn for s in students.values()):
        yield


def _run(job: ConvertJob, work: WorkFolder, device: str, dtype: torch.dtype, progress: Progress,
         on_step: StepHook | None, stop_after: int | None, processes: Processes | None = None) -> Path:
    from linearize.io.loading import load_model, model_reference
    from linearize.io.portable import portable_reference, settings_digest

    cfg = job.settings
    t_start = time.perf_counter()
    model, tokenizer = load_model(job.model.source, dtype=dtype, device=device)
    adapter = classes_for(model.config.model_type)[1].adapter  # fails early, in one line, if unsupported
    n_layers = len(adapter.blocks(model))
    for flag, layers in (("--softmax-layers", cfg.softmax_layers), ("--window-only-layers", cfg.window_only_layers)):
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise ConfigError(f"{flag} {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    local = kept_local_layers(cfg.layers, model.config, seq_len=_transfer_length(cfg))
    if local:  # from here on they are softmax layers: no student, no candidate for selection
        cfg = cfg.replace(softmax_layers=sorted(set(cfg.softmax_layers) | set(local)))
        progress.log(f"converting the global layers only: the local layers {local} keep their sliding-window "
                     "attention (--layers all converts them too)")
    elif cfg.sinks and {"local", "global"} <= set(layer_kinds(model.config)):  # `all` asked for on a mixed model
        progress.log(f"warning: --layers all converts the local layers too, and with --sinks {cfg.sinks} every query "
                     f"keeps the first tokens, which the teacher's local layers stop seeing {sliding_window(model.config)} "
                     "tokens later (Gemma 3 270M: 171 against 17.9 WikiText perplexity for --layers global); --sinks 0 "
                     "or --layers global avoid it (docs/convert.md)")
    geometry = cache_geometry(model.config.to_dict(), cfg.attention(), model.dtype.itemsize)
    n_extra = extra_softmax_count(cfg, geometry)  # a budget below the minimum fails here, before any heavy work
    train, valid, source_desc = _calibration(job, work, model, tokenizer, progress, processes)

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

    before = on_main(processes, lambda: work.record("before", measure))  # main only: the others need no numbers
    result = None
    if cfg.tokens > 0 and train.shape[0] > 0:
        result = run_transfer(model, adapter, teacher, students, train, valid, cfg.transfer(), work_dir=work.path,
                              seed=job.seed, progress=progress, on_step=on_step, stop_after=stop_after,
                              processes=processes)
        if stop_after is not None and result.layer_loss_after == {}:
            raise KeyboardInterrupt(f"stopped after {result.steps} steps (checkpoint saved)")

    def finish(attention=attention) -> None:  # measure, choose softmax and window-only layers, export: main alone
        for i in attention.window_only_layers:  # trained like the others; the export reads their exact part alone
            students[i].linear_attn.linear_off = True
        after = measure()
        selection = None
        if n_extra is not None:  # score the trained students, keep the most sensitive layers softmax
            selection = work.record("selection", lambda: select_layers(
                cfg, geometry, n_extra, model, adapter, teacher, students, valid, measure_batch,
                kl_all_linear=after["kl"], progress=progress, record=work.record,
                candidates=[i for i in students if i not in attention.window_only_layers]))
            for i in selection["chosen"]:
                del students[i]  # its trained map is dropped: the layer keeps the teacher's attention
            attention = attention.replace(softmax_layers=selection["softmax_layers"])
            if selection["chosen"]:
                selection["trained_all_linear"] = after
                after = work.record("after-selection", measure)  # the exported model

        window_only = None
        if cfg.window_only_on and students:  # switch the linear part off where that brings the model closer
            window_only = work.record("window-only", lambda: select_window_only(
                cfg, model, adapter, teacher, students, valid, measure_batch, progress=progress, record=work.record))
            for i in window_only["chosen"]:
                students[i].linear_attn.linear_off = True
            attention = attention.replace(window_only_layers=window_only["window_only_layers"])
            if window_only["chosen"]:
                window_only["trained"] = after
                after = work.record("after-window-only", measure)  # the exported model

        linear_off = None
        if attention.window and students:  # the same model reading only its exact part: the baseline it must beat
            linear_off = work.record("linear-off", lambda: compare_to_teacher(
                model, lambda: installed(model, adapter, teacher), lambda: _linear_part_off(model, adapter, students),
                valid, measure_batch, progress=progress))

        teacher_ref = model_reference(job.model.source)  # absolute: a delta export loads its base from it
        linearize_model(model, attention, teacher=portable_reference(teacher_ref), prebuilt=students)  # hub id/name
        report = {
            "teacher": teacher_ref,
            "architecture": model.config.model_type,
            "settings": job.fingerprint(),  # its paths become names in the export; the digest still tells a rerun
            "settings_digest": settings_digest(job.fingerprint()),
            "calibration": {"source": source_desc, "train_sequences": int(train.shape[0]),
                            "valid_sequences": int(valid.shape[0]), "seq_len": int(train.shape[1])},
            "untrained": before,
            "trained": after,
            "linear_off": linear_off,
            "kl_reduction": before["kl"] / max(after["kl"], 1e-12),
            "selection": selection,
            "window_only": window_only,
            "local_layers": local,
            "layer_loss_before": result.layer_loss_before if result else {},
            "layer_loss_after": result.layer_loss_after if result else {},
            "transfer_blocks": result.blocks if result else [],
            "steps": result.steps if result else 0,
            "tokens": result.tokens if result else 0,
            "transfer_seconds": result.seconds if result else 0.0,
            "resumed_from_step": result.resumed_from if result else 0,
            "total_seconds": time.perf_counter() - t_start,
            "device": device,
            "processes": processes.num_processes if processes is not None else 1,
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        }
        progress.log(f"exporting to {job.out}")
        save_linearized(model, job.out, tokenizer=tokenizer, overwrite=job.overwrite,
                        extra_files={"transfer_report.json": json.dumps(report, indent=2)},
                        delta_base=teacher_ref if cfg.export == "delta" else None)
        work.remove()

    on_main(processes, finish)
    return job.out


def _calibration(job: ConvertJob, work: WorkFolder, model, tokenizer, progress: Progress,
                 processes: Processes | None = None):
    """(train, valid, description): tokenised calibration blocks, built once and kept in the work folder so that a
    resumed run sees identical batches. With several processes the main one builds them and the others read the
    file once it is written."""
    cfg = job.settings

    def build():
        from linearize.data import build_calibration

        val_tokens = cfg.held_out_tokens
        progress.log(f"building calibration data ({cfg.tokens:,} + {val_tokens:,} tokens, seq_len {cfg.seq_len}) "
                     f"from {data_name(cfg.data) or 'text sampled from the teacher'}")
        calib = build_calibration(
            tokenizer, source=cfg.data, model=model, n_tokens=cfg.tokens, seq_len=cfg.seq_len,
            val_fraction=val_tokens / max(1, cfg.tokens + val_tokens), seed=job.seed,
            sampling_dir=work.path / "sampling",  # a kill while the teacher writes its text keeps what it wrote
            progress=progress,
        )
        return {"train": calib.train, "valid": calib.valid}, {"source": calib.source_desc}

    built: Any = on_main(processes, lambda: work.tensors("calibration", build))
    tensors, meta = built if built is not None else work.tensors("calibration", build)
    return tensors["train"], tensors["valid"], meta["source"]
