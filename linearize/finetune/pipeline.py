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
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from linearize.errors import ConfigError, LinearizeError
from linearize.export import is_complete_export, save_linearized
from linearize.finetune.lora import apply_lora, resolve_targets, trainable_parameters
from linearize.finetune.teacher import shared_teacher
from linearize.finetune.train import Progress, TrainResult, split_batch, train, validation_loss
from linearize.locking import output_lock
from linearize.recipes import Recipe, check_recipe_paths

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------------
# Where the model comes from
# ---------------------------------------------------------------------------------------------------------------
def linearize_section(source: str, *, allow_hub: bool = True) -> dict[str, Any] | None:
    """The ``linearize`` section of ``source``'s config.json (None for a softmax checkpoint or a .gguf file).

    Hub ids are looked up only when ``allow_hub`` (one small download of config.json; offline -> None, and the
    loader reports the real problem later).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        return json.loads(cfg.read_text()).get("linearize") if cfg.is_file() else None
    if path.exists() or source.endswith(".gguf") or not allow_hub:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "config.json")).read_text()).get("linearize")
    except Exception:
        return None


def convert_options(recipe: Recipe):
    """The :class:`~linearize.convert.pipeline.ConvertOptions` a recipe's ``convert`` section stands for."""
    from linearize.convert.pipeline import ConvertOptions

    c = recipe.convert
    return ConvertOptions(
        model=recipe.model.source, out=recipe.converted_dir, attention=c.attention_config(),
        transfer=c.transfer_config(recipe.seed), data=c.data, tokens=c.tokens, seq_len=c.seq_len,
        val_tokens=c.val_tokens, dtype=None if recipe.model.dtype == "auto" else recipe.model.dtype,
        device=recipe.model.device,
    )


def ensure_converted(recipe: Recipe, *, log: Log = print, progress=None) -> Path:
    """Run (or resume, or reuse) attention transfer into ``<output>/converted``; return that folder."""
    from linearize.convert.pipeline import convert

    opts = convert_options(recipe)
    out = recipe.converted_dir
    if is_complete_export(out):
        report = out / "transfer_report.json"
        done = json.loads(report.read_text()).get("settings") if report.is_file() else None
        if done == json.loads(json.dumps(opts.fingerprint())):
            log(f"using the converted model in {out}")
            return out
        if not recipe.overwrite:
            raise LinearizeError(f"{out} was converted with other `convert` settings than this recipe's; "
                                 "delete it, or set overwrite=true (--set overwrite=true) to convert again")
        opts.overwrite = True
    elif recipe.overwrite:
        opts.overwrite = True
    log(f"converting {recipe.model.source} -> {out} (attention transfer on {opts.tokens:,} tokens)")
    return convert(opts, log=log, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def make_accelerator(recipe: Recipe):
    """bf16 autocast on CUDA, fp32 on CPU; a long process-group timeout so other ranks can wait out stage 1."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    cpu = recipe.model.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16",
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])


def _dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    name = recipe.model.dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def fingerprint(recipe: Recipe, base: str) -> dict[str, Any]:
    """The settings a resumed run must share, with paths normalised (absolute, no trailing /)."""
    from linearize.loading import model_reference

    d = recipe.model_dump(mode="json", exclude={"overwrite", "eval"})
    d["base"] = model_reference(base)
    d["output"] = str(Path(recipe.output).expanduser().absolute())
    d["model"]["source"] = model_reference(recipe.model.source)
    for section in ("convert", "finetune"):
        if d[section].get("data"):
            d[section]["data"] = model_reference(d[section]["data"])
    return json.loads(json.dumps(d))


def _prepare_work(recipe: Recipe, base: str, log: Log) -> Path:
    work = recipe.output_dir / f".{recipe.finetuned_dir.name}.work"
    settings = work / "settings.json"
    fp = fingerprint(recipe, base)
    if work.exists():
        previous = json.loads(settings.read_text()) if settings.is_file() else None
        if previous != fp:
            if not recipe.overwrite:
                from linearize.convert.pipeline import describe_differences

                diff = "; ".join(describe_differences(previous or {}, fp)[:6])
                raise LinearizeError(f"{work} holds an unfinished finetuning run with other settings ({diff}); rerun "
                                     "the same recipe to resume, or set overwrite=true (--set overwrite=true) to "
                                     "discard it and start over")
            shutil.rmtree(work)
        else:
            log(f"resuming the unfinished finetuning run in {work}")
    work.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(fp, indent=2))
    return work


def _training_data(recipe: Recipe, tokenizer, model, teacher_source: str | None, work: Path, accelerator,
                   log: Log) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Tokenised train/valid blocks, built once on the main process and cached in the work folder."""
    f = recipe.finetune
    data_file, desc_file = work / "data.safetensors", work / "data.json"
    if accelerator.is_main_process and not data_file.is_file():
        from linearize.data import build_calibration
        from linearize.loading import load_teacher

        sampler = None
        if f.data is None:  # text sampled from the teacher: needs the softmax model, loaded just for this
            if not teacher_source:
                raise ConfigError("finetune.data is null (text sampled from the teacher), but the teacher of "
                                  f"{recipe.model.source} is unknown; set finetune.data")
            log(f"loading the teacher {teacher_source} to sample training text")
            sampler, _ = load_teacher(teacher_source, dtype=_dtype(recipe, accelerator.device),
                                      device=str(accelerator.device))
        val_tokens = f.val_tokens or max(4 * f.seq_len, f.tokens // 20)
        log(f"building finetuning data ({f.tokens:,} + {val_tokens:,} tokens, seq_len {f.seq_len}) from "
            f"{f.data or 'text sampled from the teacher'}")
        chat = f.chat_template if f.chat_template is not None else bool(getattr(tokenizer, "chat_template", None))
        calib = build_calibration(
            tokenizer, source=f.data, model=sampler if sampler is not None else model, n_tokens=f.tokens,
            seq_len=f.seq_len, val_fraction=val_tokens / (f.tokens + val_tokens), seed=recipe.seed,
            chat_template=chat and f.data is not None, sampling_dir=work / "sampling",
        )
        del sampler
        save_file({"train": calib.train.contiguous(), "valid": calib.valid.contiguous()}, str(data_file))
        desc_file.write_text(json.dumps({"source": calib.source_desc}))
    accelerator.wait_for_everyone()
    saved = load_file(str(data_file))
    return saved["train"], saved["valid"], json.loads(desc_file.read_text())["source"]


def _measure(recipe: Recipe, wrapped, peft_model, valid, text_blocks, accelerator, *, teacher: bool) -> dict:
    ctx = (lambda: shared_teacher(peft_model)) if teacher else None
    bs = recipe.finetune.eval_batch_size
    out = {"valid": validation_loss(wrapped, valid, bs, accelerator, ctx)}
    if text_blocks is not None:
        out["text"] = validation_loss(wrapped, text_blocks, recipe.eval.batch_size, accelerator, ctx)
    return out


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


@_one_run_per_output
def run_recipe(
    recipe: Recipe,
    *,
    no_merge: bool = False,
    log: Log = print,
    progress: Progress | None = None,
    transfer_progress=None,
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
        stop_after: stop after this many training steps, leaving a checkpoint (raises KeyboardInterrupt); for tests.

    Raises:
        LinearizeError: a finished export exists (set overwrite=true), unfinished work with other settings, a bad
            model path, data or LoRA target (ConfigError / DataError / ModelLoadError subclasses).
    """
    from linearize.evaluate import text_blocks as make_text_blocks
    from linearize.loading import load_teacher, model_reference

    t_start = time.perf_counter()
    out = recipe.finetuned_dir
    if is_complete_export(out) and not recipe.overwrite:
        raise LinearizeError(f"{out} already holds a finished model; set overwrite=true (--set overwrite=true) to "
                             "replace it, or choose another output")
    accelerator = make_accelerator(recipe)
    main_log: Log = log if accelerator.is_main_process else (lambda _m: None)
    main_log(f"training on {accelerator.num_processes} process(es), {accelerator.device}")
    if accelerator.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        main_log("note: `accelerate launch --cpu` starts one process whatever --num_processes says (accelerate runs "
                 "several CPU processes only through mpirun); for N CPU processes use "
                 "`torchrun --nproc_per_node N -m linearize.finetune RECIPE`")

    # -- stage 1: conversion (main process), unless the source is already linearized -------------------------
    lin = linearize_section(recipe.model.source)
    if lin is not None:
        base, teacher_source = recipe.model.source, lin.get("teacher")
        main_log(f"{base} is already linearized ({lin.get('feature_map')}, window {lin.get('window')}); "
                 "the `convert` section is ignored")
    else:
        if accelerator.is_main_process:
            ensure_converted(recipe, log=main_log, progress=transfer_progress)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        accelerator.wait_for_everyone()
        base, teacher_source = str(recipe.converted_dir), recipe.model.source
    split_batch(recipe.finetune, accelerator.num_processes)  # fail before any heavy work

    # -- stage 2: LoRA finetuning ---------------------------------------------------------------------------
    work = None
    if accelerator.is_main_process:
        work = _prepare_work(recipe, base, main_log)
    accelerator.wait_for_everyone()
    work = recipe.output_dir / f".{out.name}.work"
    dtype = _dtype(recipe, accelerator.device)
    model, tokenizer = load_teacher(base, dtype=dtype, device=str(accelerator.device), attn_implementation="sdpa")
    train_ids, valid, data_desc = _training_data(recipe, tokenizer, model, teacher_source, work, accelerator, main_log)
    if recipe.finetune.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    f = recipe.finetune
    targets = resolve_targets(model, f.lora.target_modules)
    peft_model = apply_lora(model, f.lora, train_feature_maps=f.train_feature_maps, seed=recipe.seed)
    n_trainable = sum(p.numel() for _, p in trainable_parameters(peft_model))
    n_total = sum(p.numel() for p in peft_model.parameters())
    main_log(f"LoRA r={f.lora.rank} alpha={f.lora.alpha} on {', '.join(targets)}"
             f"{' + feature maps' if f.train_feature_maps else ''}: {n_trainable:,} trainable of {n_total:,} parameters")
    wrapped = accelerator.prepare(peft_model)

    teacher_fn = None
    if f.kd is not None and f.kd.weight > 0:
        if f.kd.teacher == "shared":
            def teacher_fn(ids):
                with shared_teacher(peft_model):
                    return wrapped(input_ids=ids, use_cache=False).logits
        else:
            if not teacher_source:
                raise ConfigError(f"finetune.kd.teacher=separate, but the teacher of {base} is unknown; use shared")
            main_log(f"loading the separate distillation teacher {teacher_source} (a second copy of the weights)")
            teacher_model, _ = load_teacher(teacher_source, dtype=dtype, device=str(accelerator.device),
                                            attn_implementation="sdpa")
            teacher_model.requires_grad_(False)

            def teacher_fn(ids):
                with accelerator.autocast():
                    return teacher_model(input_ids=ids, use_cache=False).logits

    text = None
    if recipe.eval.text:
        path = Path(recipe.eval.text)
        if not path.is_file():
            raise ConfigError(f"eval.text={recipe.eval.text} is not a file (relative paths start at {Path.cwd()})")
        text = make_text_blocks(tokenizer, path.read_text(), recipe.eval.seq_len, recipe.eval.max_tokens)

    before_file = work / "before.json"
    if before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        main_log("measuring teacher and transfer-only model on held-out data")
        before = {"teacher": _measure(recipe, wrapped, peft_model, valid, text, accelerator, teacher=True),
                  "transfer": _measure(recipe, wrapped, peft_model, valid, text, accelerator, teacher=False)}
        if accelerator.is_main_process:
            before_file.write_text(json.dumps(before))
    main_log(f"validation loss: teacher {before['teacher']['valid']['loss']:.4f}, "
             f"transfer-only {before['transfer']['valid']['loss']:.4f}")

    result: TrainResult = train(
        wrapped, train_ids, f, seed=recipe.seed, accelerator=accelerator, work_dir=work, teacher=teacher_fn,
        progress=progress, stop_after=stop_after, log=main_log,
    )
    if not result.finished:
        raise KeyboardInterrupt(f"stopped after {result.steps} of {result.total_steps} steps (checkpoint saved)")
    after = _measure(recipe, wrapped, peft_model, valid, text, accelerator, teacher=False)
    main_log(f"validation loss after finetuning: {after['valid']['loss']:.4f} (ppl {after['valid']['ppl']:.3f})")

    # -- export (main process) ------------------------------------------------------------------------------
    report = {
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
        "total_seconds": time.perf_counter() - t_start,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "merged": not no_merge,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        transfer_report = Path(base) / "transfer_report.json"
        extra = {"finetune_report.json": json.dumps(report, indent=2)}
        if transfer_report.is_file():
            extra["transfer_report.json"] = transfer_report.read_text()
        final = accelerator.unwrap_model(wrapped)
        for p in final.parameters():  # feature maps trained in fp32 go back to the checkpoint's dtype
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        if no_merge:
            adapter_tmp = work / "adapter"
            shutil.rmtree(adapter_tmp, ignore_errors=True)
            final.save_pretrained(str(adapter_tmp), safe_serialization=True)
            base_model = final.unload()
            save_linearized(base_model, out, tokenizer=tokenizer, overwrite=recipe.overwrite, extra_files=extra,
                            adapter_dir=adapter_tmp)
        else:
            merged = final.merge_and_unload()
            save_linearized(merged, out, tokenizer=tokenizer, overwrite=recipe.overwrite, extra_files=extra)
        shutil.rmtree(work, ignore_errors=True)
        main_log(f"finished model: {out}" + (f" (LoRA adapter in {out / 'adapter'})" if no_merge else ""))
    accelerator.wait_for_everyone()
    return out
