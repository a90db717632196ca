"""``linearize finetune recipe.yaml``: checkpoint -> (attention transfer) -> LoRA finetuning -> export.

Run folder (``recipe.output``)::

    <output>/converted/             stage 1 export (only when the recipe starts from a softmax checkpoint)
    <output>/.converted.work/       ... its resumable work folder while it runs (linearize.convert.pipeline)
    <output>/finetuned/             the finished model: merged LoRA + finetune_report.json (+ adapter/ with --no-merge)
    <output>/.finetuned.work/       settings, tokenised data, measurements before training, LoRA checkpoints

Every stage resumes: re-running the same command after a kill skips a finished conversion, continues an
unfinished one, and continues finetuning from the last checkpoint. The work folder is removed when the export is
complete. Under ``accelerate launch`` the conversion and the export run on the main process only; training and
evaluation run on every process (DDP).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from linearize.errors import ConfigError, DataError, LinearizeError
from linearize.export.writer import is_linearize_export, save_linearized
from linearize.finetune import teacher as teachers
from linearize.finetune.lora import apply_lora, resolve_targets, trainable_parameters
from linearize.finetune.teacher import Teacher, shared_teacher
from linearize.finetune.train import split_batch, train, validation_loss
from linearize.io.devices import resolve_dtype
from linearize.io.loading import linearize_section
from linearize.io.sources import data_name
from linearize.recipes import Recipe, check_recipe_paths
from linearize.run.locking import output_lock
from linearize.run.loop import StepHook, WorkFolder
from linearize.run.processes import make_processes, on_main
from linearize.run.progress import Progress, QuietProgress


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: where the linearized model comes from
# ---------------------------------------------------------------------------------------------------------------
def convert_job(recipe: Recipe, *, overwrite: bool = False):
    """The :class:`~linearize.convert.pipeline.ConvertJob` a recipe's ``model`` and ``convert`` sections stand for."""
    from linearize.convert.pipeline import ConvertJob

    return ConvertJob(model=recipe.model, out=recipe.converted_dir, settings=recipe.convert, seed=recipe.seed,
                      overwrite=overwrite)


def ensure_converted(recipe: Recipe, *, progress: Progress, on_step: StepHook | None = None,
                     processes=None) -> Path:
    """Run (or resume, or reuse) attention transfer into ``<output>/converted``; return that folder. With
    ``processes`` (an ``Accelerator`` of several processes) every process calls this and the transfer's batches are
    split over them (``convert(..., processes=)``)."""
    from linearize.convert.pipeline import convert
    from linearize.io.portable import settings_digest

    job = convert_job(recipe, overwrite=recipe.overwrite)
    out = recipe.converted_dir
    if is_linearize_export(out):
        report = out / "transfer_report.json"
        done = json.loads(report.read_text()) if report.is_file() else {}
        fingerprint = job.fingerprint()  # the report keeps its digest (its own settings name no local path)
        if done.get("settings_digest") == settings_digest(fingerprint) or done.get("settings") == fingerprint:
            progress.log(f"using the converted model in {out}")
            return out
        if not recipe.overwrite:
            raise LinearizeError(f"{out} was converted with other `convert` settings than this recipe's; "
                                 "delete it, or set overwrite=true (--set overwrite=true) to convert again")
    progress.log(f"converting {recipe.model.source} -> {out} (attention transfer on {recipe.convert.tokens:,} tokens)")
    return convert(job, progress=progress, on_step=on_step, processes=processes)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2 pieces
# ---------------------------------------------------------------------------------------------------------------
def fingerprint(recipe: Recipe, base: str) -> dict[str, Any]:
    """The settings a resumed run must share, with paths normalised (absolute, no trailing /)."""
    from linearize.io.loading import data_reference, model_reference

    # finetune.loss_chunk changes memory, not the run (the loss agrees to rounding): it may change on a resume
    d = recipe.model_dump(mode="json", exclude={"overwrite": True, "eval": True, "finetune": {"loss_chunk"}})
    d["base"] = model_reference(base)
    d["output"] = str(Path(recipe.output).expanduser().absolute())
    d["model"]["source"] = model_reference(recipe.model.source)
    for section in ("convert", "finetune"):
        if d[section].get("data"):
            d[section]["data"] = data_reference(d[section]["data"])
    return json.loads(json.dumps(d))


def _training_data(recipe: Recipe, tokenizer, model, teacher_source: str | None, work: WorkFolder, accelerator,
                   progress: Progress) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Tokenised train/valid blocks, built once on the main process and cached in the work folder."""
    f = recipe.finetune

    def build():
        from linearize.data import build_calibration
        from linearize.io.loading import load_model

        sampler = None
        if f.data is None:  # text sampled from the teacher: needs the softmax model, loaded just for this
            if not teacher_source:
                raise ConfigError("finetune.data is null (text sampled from the teacher), but the teacher of "
                                  f"{recipe.model.source} is unknown; set finetune.data")
            progress.log(f"loading the teacher {teacher_source} to sample training text")
            sampler, _ = load_model(teacher_source, dtype=resolve_dtype(recipe.model.dtype, accelerator.device),
                                    device=str(accelerator.device))
        val_tokens = f.val_tokens or max(4 * f.seq_len, f.tokens // 20)
        progress.log(f"building finetuning data ({f.tokens:,} + {val_tokens:,} tokens, seq_len {f.seq_len}) from "
                     f"{data_name(f.data) or 'text sampled from the teacher'}")
        chat = f.chat_template if f.chat_template is not None else bool(getattr(tokenizer, "chat_template", None))
        calib = build_calibration(
            tokenizer, source=f.data, model=sampler if sampler is not None else model, n_tokens=f.tokens,
            seq_len=f.seq_len, val_fraction=val_tokens / (f.tokens + val_tokens), seed=recipe.seed,
            chat_template=chat and f.data is not None, sampling_dir=work.path / "sampling", progress=progress,
        )
        return {"train": calib.train, "valid": calib.valid}, {"source": calib.source_desc}

    on_main(accelerator, lambda: work.tensors("data", build))
    tensors, meta = work.tensors("data", build)
    return tensors["train"], tensors["valid"], meta["source"]


def _distillation_teacher(recipe: Recipe, wrapped, peft_model, teacher_source: str | None, base: str, dtype,
                          accelerator, progress: Progress) -> Teacher | None:
    """The teacher of ``finetune.kd``, or None without distillation."""
    kd = recipe.finetune.kd
    if kd is None or kd.weight <= 0:
        return None
    if kd.teacher == "shared":
        return teachers.shared(wrapped, peft_model)
    if not teacher_source:
        raise ConfigError(f"finetune.kd.teacher=separate, but the teacher of {base} is unknown; use shared")
    from linearize.io.loading import load_model

    progress.log(f"loading the separate distillation teacher {teacher_source} (a second copy of the weights)")
    teacher_model, _ = load_model(teacher_source, dtype=dtype, device=str(accelerator.device))
    return teachers.separate(teacher_model, accelerator.autocast)


def _measure(recipe: Recipe, wrapped, peft_model, valid, text_blocks, accelerator, *, teacher: bool, who: str,
             progress: Progress) -> dict:
    """Loss and perplexity of the teacher (``teacher``: the shared base with its softmax attention) or the model on
    the held-out blocks and on ``eval.text``'s blocks, each pass shown as a task (``who``: what is measured)."""
    ctx = (lambda: shared_teacher(peft_model)) if teacher else None
    bs, chunk = recipe.finetune.eval_batch_size, recipe.finetune.loss_chunk
    out = {"valid": validation_loss(wrapped, valid, bs, accelerator, ctx, loss_chunk=chunk, progress=progress,
                                    name=f"measuring the {who} on held-out data")}
    if text_blocks is not None:
        out["text"] = validation_loss(wrapped, text_blocks, recipe.eval.batch_size, accelerator, ctx, loss_chunk=chunk,
                                      progress=progress, name=f"measuring the {who} on {Path(recipe.eval.text).name}")
    return out


def _eval_text_blocks(recipe: Recipe, tokenizer, model, progress: Progress) -> torch.Tensor | None:
    """``eval.text`` cut into blocks of ``eval.seq_len`` tokens, clamped to the model's context (logged, as
    ``linearize eval`` does); None when ``eval.text`` is unset."""
    from linearize.io.loading import context_length
    from linearize.metrics import text_blocks

    if not recipe.eval.text:
        return None
    path = Path(recipe.eval.text).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"eval.text: cannot read {path} as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    seq_len, limit = recipe.eval.seq_len, context_length(model.config)
    if limit is not None and seq_len > limit:
        progress.log(f"eval.seq_len {seq_len} > the model's context of {limit} tokens (max_position_embeddings): "
                     f"measuring {path.name} in blocks of {limit}")
        seq_len = limit
    return text_blocks(tokenizer, text, seq_len, recipe.eval.max_tokens)


def _export(recipe: Recipe, wrapped, tokenizer, dtype, base: str, report: dict, work: WorkFolder, accelerator,
            no_merge: bool) -> None:
    """Merged (or base + adapter/) export with the reports, on the main process; the work folder goes after it."""
    out = recipe.finetuned_dir
    transfer_report = Path(base) / "transfer_report.json"
    extra = {"finetune_report.json": json.dumps(report, indent=2)}
    if transfer_report.is_file():
        extra["transfer_report.json"] = transfer_report.read_text()
    final = accelerator.unwrap_model(wrapped)
    for p in final.parameters():  # feature maps trained in fp32 go back to the checkpoint's dtype
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    if no_merge:
        adapter_tmp = work.path / "adapter"
        final.save_pretrained(str(adapter_tmp), safe_serialization=True)
        save_linearized(final.unload(), out, tokenizer=tokenizer, overwrite=recipe.overwrite, extra_files=extra,
                        adapter_dir=adapter_tmp)
    else:
        save_linearized(final.merge_and_unload(), out, tokenizer=tokenizer, overwrite=recipe.overwrite,
                        extra_files=extra)
    work.remove()


def _with_lora(recipe: Recipe, model, progress: Progress):
    """(peft model, LoRA targets, trainable parameter count); gradient checkpointing on when asked."""
    f = recipe.finetune
    if f.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = resolve_targets(model, f.lora.target_modules)
    peft_model = apply_lora(model, f.lora, train_feature_maps=f.train_feature_maps, seed=recipe.seed)
    n_trainable = sum(p.numel() for _, p in trainable_parameters(peft_model))
    n_total = sum(p.numel() for p in peft_model.parameters())
    progress.log(f"LoRA r={f.lora.rank} alpha={f.lora.alpha} on {', '.join(targets)}"
                 f"{' + feature maps' if f.train_feature_maps else ''}: {n_trainable:,} trainable of {n_total:,} "
                 "parameters")
    return peft_model, targets, n_trainable


def _report(recipe: Recipe, base: str, teacher_source, data_desc: str, train_ids, valid, targets, n_trainable: int,
            before: dict, after: dict, result, accelerator, no_merge: bool, *, seconds: float) -> dict:
    """finetune_report.json."""
    from linearize.io.loading import model_reference

    return {
        "recipe": recipe.model_dump(mode="json"),
        "base": model_reference(base),
        "teacher": model_reference(teacher_source) if teacher_source else None,
        "data": {"source": data_desc, "train_sequences": int(train_ids.shape[0]),
                 "valid_sequences": int(valid.shape[0]), "seq_len": int(train_ids.shape[1])},
        "lora_targets": targets,
        "trainable_parameters": n_trainable,
        "teacher_metrics": before["teacher"],
        "before": before["transfer"],
        "after": after,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "tokens": result.tokens,
        "train_seconds": result.seconds,
        "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
        "train_loss": result.losses,
        "total_seconds": seconds,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "merged": not no_merge,
    }


def _one_run_per_output(run: Callable[..., Path]) -> Callable[..., Path]:
    """Check the recipe's paths first, then hold the output folder's lock (on the main process) while ``run`` runs,
    so that a second run on the same output is refused instead of "resuming" the live one."""

    @functools.wraps(run)
    def locked(recipe: Recipe, **kwargs) -> Path:
        check_recipe_paths(recipe)  # before stage 1: a missing eval.text used to fail after the conversion
        if int(os.environ.get("RANK", "0")) != 0:  # other ranks of a distributed launch: the main one holds it
            return run(recipe, **kwargs)
        with output_lock(recipe.finetuned_dir):
            return run(recipe, **kwargs)

    return locked


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
@_one_run_per_output
def run_recipe(
    recipe: Recipe,
    *,
    no_merge: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    on_step: StepHook | None = None,
    stop_after: int | None = None,
) -> Path:
    """Run a whole recipe and return the finished model's folder (``<output>/finetuned``).

    Features and the keys that control them: conversion first when ``model.source`` is a softmax checkpoint
    (``convert.*``); LoRA on ``finetune.lora.target_modules`` (peft), feature maps trained when
    ``finetune.train_feature_maps``; next-token loss plus optional distillation (``finetune.kd``); AdamW with warmup
    and cosine/linear decay (``finetune.lr``, ``warmup``, ``schedule``), gradient clipping (``grad_clip``); bf16
    autocast on CUDA; resumable checkpoints (``checkpoint_every``); validation loss/perplexity of teacher, model
    before and after finetuning (+ ``eval.text`` perplexity) in ``finetune_report.json``; export with LoRA merged,
    or base + ``adapter/`` when ``no_merge``.

    Args:
        progress: where progress and log lines go (default: ``log`` lines only, or nothing).
        on_step: called after every finetuning step (see :func:`~linearize.run.loop.run_loop`).
        stop_after: stop after this many training steps, leaving a checkpoint (raises KeyboardInterrupt); for tests.

    Raises:
        LinearizeError: a finished export exists (set overwrite=true), unfinished work with other settings, a bad
            model path, data or LoRA target (ConfigError / DataError / ModelLoadError subclasses).
    """
    from linearize.io.loading import load_model
    from linearize.io.portable import loadable_reference

    t_start = time.perf_counter()
    out = recipe.finetuned_dir
    if is_linearize_export(out) and not recipe.overwrite:
        raise LinearizeError(f"{out} already holds a finished model; set overwrite=true (--set overwrite=true) to "
                             "replace it, or choose another output")
    cpu = recipe.model.device == "cpu" or not torch.cuda.is_available()
    accelerator = make_processes(cpu=cpu, mixed_precision="no" if cpu else "bf16")  # bf16 autocast on CUDA
    main = accelerator.is_main_process
    progress = (progress or QuietProgress(log)) if main else QuietProgress()
    progress.log(f"training on {accelerator.num_processes} process(es), {accelerator.device}")
    if accelerator.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        progress.log("note: `accelerate launch --cpu` starts one process whatever --num_processes says (accelerate "
                     "runs several CPU processes only through mpirun); for N CPU processes use "
                     "`torchrun --nproc_per_node N -m linearize.finetune RECIPE`")

    # -- stage 1: conversion (main process), unless the source is already linearized -------------------------
    lin = linearize_section(recipe.model.source)
    if lin is not None:
        base, teacher_source = recipe.model.source, loadable_reference(lin.get("teacher"))  # None: local, by name
        progress.log(f"{base} is already linearized ({lin.get('feature_map')}, window {lin.get('window')}); "
                     "the `convert` section is ignored")
    else:
        # every process takes part in the transfer (its batches split over them); data and export stay on main
        ensure_converted(recipe, progress=progress,
                         processes=accelerator if accelerator.num_processes > 1 else None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        accelerator.wait_for_everyone()
        base, teacher_source = str(recipe.converted_dir), recipe.model.source
    split_batch(recipe.finetune, accelerator.num_processes)  # fail before any heavy work

    # -- stage 2: LoRA finetuning ---------------------------------------------------------------------------
    work = WorkFolder(WorkFolder.beside(out), fingerprint(recipe, base), what="finetuning run",
                      discard_hint="set overwrite=true (--set overwrite=true)", worth_keeping="data.safetensors")
    on_main(accelerator, lambda: work.open(overwrite=recipe.overwrite, progress=progress))
    dtype = resolve_dtype(recipe.model.dtype, accelerator.device)
    model, tokenizer = load_model(base, dtype=dtype, device=str(accelerator.device))
    train_ids, valid, data_desc = _training_data(recipe, tokenizer, model, teacher_source, work, accelerator,
                                                 progress)
    f = recipe.finetune
    peft_model, targets, n_trainable = _with_lora(recipe, model, progress)
    wrapped = accelerator.prepare(peft_model)
    teacher_fn = _distillation_teacher(recipe, wrapped, peft_model, teacher_source, base, dtype, accelerator,
                                       progress)
    text = _eval_text_blocks(recipe, tokenizer, model, progress)

    def measure_before() -> dict:
        progress.log("measuring teacher and transfer-only model on held-out data")
        return {"teacher": _measure(recipe, wrapped, peft_model, valid, text, accelerator, teacher=True,
                                    who="teacher", progress=progress),
                "transfer": _measure(recipe, wrapped, peft_model, valid, text, accelerator, teacher=False,
                                     who="transfer-only model", progress=progress)}

    before_file = work.path / "before.json"
    saved = before_file.is_file()  # the same on every process: only the on_main below writes it, after their check
    before = json.loads(before_file.read_text()) if saved else measure_before()
    if not saved:  # every process or none takes part (on_main is a collective)
        on_main(accelerator, lambda: before_file.write_text(json.dumps(before)))
    progress.log(f"validation loss: teacher {before['teacher']['valid']['loss']:.4f}, "
                 f"transfer-only {before['transfer']['valid']['loss']:.4f}")

    result = train(wrapped, train_ids, f, seed=recipe.seed, accelerator=accelerator, work_dir=work.path,
                   teacher=teacher_fn, progress=progress, on_step=on_step, stop_after=stop_after)
    if not result.finished:
        raise KeyboardInterrupt(f"stopped after {result.steps} of {result.total_steps} steps (checkpoint saved)")
    after = _measure(recipe, wrapped, peft_model, valid, text, accelerator, teacher=False, who="finetuned model",
                     progress=progress)
    progress.log(f"validation loss after finetuning: {after['valid']['loss']:.4f} (ppl {after['valid']['ppl']:.3f})")

    report = _report(recipe, base, teacher_source, data_desc, train_ids, valid, targets, n_trainable, before, after,
                     result, accelerator, no_merge, seconds=time.perf_counter() - t_start)
    accelerator.wait_for_everyone()  # every process's last step is done before the export reads the weights

    def export() -> None:
        _export(recipe, wrapped, tokenizer, dtype, base, report, work, accelerator, no_merge)
        progress.log(f"finished model: {out}" + (f" (LoRA adapter in {out / 'adapter'})" if no_merge else ""))

    on_main(accelerator, export)
    return out
