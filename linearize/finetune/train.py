"""LoRA finetuning's step function (run on the shared loop of ``linearize.run.loop``) and validation loss.

One optimizer step consumes ``batch_size`` packed sequences in total, split evenly over the processes
(``accelerate launch`` = DDP) and, on each process, into micro-batches of ``micro_batch_size`` (gradient
accumulation; gradients are synchronised once per step). The global order of sequences depends only on the seed,
so a run resumed from a checkpoint, or run on another number of GPUs, sees the same batches.

Loss per micro-batch: mean next-token cross-entropy, or with distillation
``(1 - w) * CE + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per token. With ``loss_chunk`` > 0
(the default) the forwards return final hidden states and the LM head runs on ``loss_chunk`` rows at a time,
recomputed in the backward pass (``linearize.finetune.loss``): no [B, T, vocab] logits of student or teacher exist.

Checkpoints (``<work>/ckpt``, written by the shared loop; safetensors + JSON, no pickle) hold the trainable
parameters by name, AdamW's moments, the step and the loss history; LoRA dropout is re-seeded from (seed, step) at
every step, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.errors import ConfigError
from linearize.finetune.config import DistillConfig, FinetuneConfig
from linearize.finetune.lora import trainable_parameters
from linearize.finetune.loss import (
    causal_lm,
    chunked_loss,
    chunked_nll,
    distill_loss,
    hidden_states_out,
    next_token_loss,
    plain_head,
)
from linearize.finetune.teacher import Teacher
from linearize.modules.attention import linear_attention_layers, window_dropout, window_dropped
from linearize.run.loop import LoopResult, StepHook, run_loop, step_indices
from linearize.run.progress import Progress, QuietProgress


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------
def split_batch(cfg: FinetuneConfig, num_processes: int) -> tuple[int, int]:
    """(sequences per process per step, micro-batch size).

    Raises:
        ConfigError: batch_size does not split evenly over the processes or into micro-batches.
    """
    if cfg.batch_size % num_processes:
        raise ConfigError(f"finetune.batch_size={cfg.batch_size} must be a multiple of the number of processes "
                          f"({num_processes})")
    per_proc = cfg.batch_size // num_processes
    micro = min(cfg.micro_batch_size or per_proc, per_proc)
    if per_proc % micro:
        raise ConfigError(f"finetune.micro_batch_size={micro} must divide the {per_proc} sequences each of the "
                          f"{num_processes} processes gets per step (batch_size / processes)")
    return per_proc, micro


# ---------------------------------------------------------------------------------------------------------------
# Losses (next_token_loss and distill_loss, the full-logits definitions, live in linearize.finetune.loss)
# ---------------------------------------------------------------------------------------------------------------
def micro_batch_loss(model: nn.Module, ids: Tensor, *, lm: nn.Module, loss_chunk: int, kd: DistillConfig | None = None,
                     teacher: Teacher | Callable[[Tensor], Tensor] | None = None,
                     autocast: Callable[[], AbstractContextManager] = nullcontext) -> Tensor:
    """The training loss of one micro-batch ``ids`` [B, T], with grad (call ``backward`` on it).

    Args:
        model: the model as trained (peft, DDP-wrapped): the forward goes through ``model(...)``.
        lm: the transformers causal LM inside it (:func:`~linearize.finetune.loss.causal_lm` of the unwrapped model).
        loss_chunk: rows of logits per chunk (0: full logits). Chunking needs a plain head on the student and, with
            distillation, a :class:`Teacher` with one; otherwise the full-logits path runs.
        kd / teacher: distillation settings (weight > 0) and teacher, or None.
        autocast: the context the model's forward runs under (``accelerator.autocast``), for the head's chunks.
    """
    head = plain_head(lm) if loss_chunk > 0 else None
    if kd is not None and not (isinstance(teacher, Teacher) and teacher.head is not None):
        head = None
    if head is not None:
        with hidden_states_out(lm) as head:
            hidden = model(input_ids=ids, use_cache=False).logits
        t_hidden = None
        if kd is not None:
            with torch.no_grad():
                t_hidden = teacher.hidden(ids)
        return chunked_loss(hidden, ids, head, chunk=loss_chunk, teacher_hidden=t_hidden,
                            teacher_head=teacher.head if kd is not None else None,
                            kd_weight=kd.weight if kd is not None else 0.0,
                            temperature=kd.temperature if kd is not None else 1.0, autocast=autocast)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = next_token_loss(logits, ids)
    if kd is not None:
        with torch.no_grad():
            t_logits = teacher.logits(ids) if isinstance(teacher, Teacher) else teacher(ids)
        loss = (1 - kd.weight) * loss + kd.weight * distill_loss(logits, t_logits, kd.temperature)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model: nn.Module, blocks: Tensor, batch_size: int, accelerator,
                    context: Callable[[], AbstractContextManager] | None = None, *,
                    loss_chunk: int = 1024, progress: Progress | None = None,
                    name: str = "validation loss") -> dict[str, float]:
    """Mean next-token loss and perplexity over ``blocks`` [N, L], sharded over the processes and summed.

    ``context`` is entered around each batch's forward and its loss (the head's chunks run inside it too);
    ``loss_chunk`` rows of logits at a time where the model has a plain head (0: full logits). ``progress`` shows
    this process's batches as the task ``name``.
    """
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = blocks[rank::world]
    lm = causal_lm(accelerator.unwrap_model(model))
    chunked = loss_chunk > 0 and plain_head(lm) is not None
    nll = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    starts = range(0, mine.shape[0], batch_size)
    with (progress or QuietProgress()).task(name, len(starts), "batches") as task:
        for done, b0 in enumerate(starts, 1):
            ids = mine[b0 : b0 + batch_size].to(accelerator.device)
            with context() if context is not None else nullcontext():
                if chunked:
                    with hidden_states_out(lm) as head:
                        hidden = model(input_ids=ids, use_cache=False).logits
                    nll[0] += chunked_nll(hidden, ids, head, chunk=loss_chunk, autocast=accelerator.autocast)
                else:
                    logits = model(input_ids=ids, use_cache=False).logits
                    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
                    nll[0] -= lp.gather(-1, ids[:, 1:, None]).sum().double()
            nll[1] += ids[:, 1:].numel()
            task.update(done)
    nll = accelerator.reduce(nll, reduction="sum")
    model.train(was_training)
    loss = (nll[0] / nll[1].clamp_min(1)).item()
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(nll[1].item())}


# ---------------------------------------------------------------------------------------------------------------
# The stage: a step function on the shared loop
# ---------------------------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    train_ids: Tensor,
    cfg: FinetuneConfig,
    *,
    seed: int,
    accelerator,
    work_dir: Path,
    teacher: Teacher | Callable[[Tensor], Tensor] | None = None,
    progress: Progress | None = None,
    on_step: StepHook | None = None,
    stop_after: int | None = None,
) -> LoopResult:
    """Train the trainable parameters of ``model`` on ``train_ids`` [N, L].

    Args:
        model: the LoRA-wrapped model, already ``accelerator.prepare``-d (DDP under ``accelerate launch``).
        train_ids: packed token sequences; ``cfg.tokens // (batch_size * L)`` steps are taken (at least 1).
        teacher: the distillation teacher (required when ``cfg.kd`` is set): a :class:`Teacher` (chunked logits), or
            an ``ids -> logits`` callable (full logits).
        work_dir: checkpoints go to ``work_dir / "ckpt"``; an existing one is resumed.
        progress / on_step / stop_after: see :func:`~linearize.run.loop.run_loop`.

    Raises:
        ConfigError: the batch does not split over the processes, or a checkpoint does not match the model.
    """
    unwrapped = accelerator.unwrap_model(model)
    lm = causal_lm(unwrapped)
    named = trainable_parameters(unwrapped)
    per_proc, micro = split_batch(cfg, accelerator.num_processes)
    L = train_ids.shape[1]
    if train_ids.shape[0] < cfg.batch_size:
        raise ConfigError(f"only {train_ids.shape[0]} training sequences for finetune.batch_size={cfg.batch_size}; "
                          "raise finetune.tokens or lower the batch size")
    total = max(1, min(cfg.tokens // (cfg.batch_size * L), train_ids.shape[0] // cfg.batch_size))
    kd = cfg.kd if cfg.kd is not None and cfg.kd.weight > 0 else None
    if kd is not None and teacher is None:
        raise ConfigError("finetune.kd is set but no teacher was given")
    rank = accelerator.process_index
    n_micro = per_proc // micro
    model.train()

    def step(index: int) -> Tensor:
        mine = step_indices(index, train_ids.shape[0], cfg.batch_size, seed)[rank * per_proc : (rank + 1) * per_proc]
        torch.manual_seed(seed * 100_003 + index * 1009 + rank)  # LoRA dropout: same masks after a resume
        step_loss = torch.zeros((), device=accelerator.device)
        drop = window_dropped(cfg.window_dropout, index, seed)
        for m in range(n_micro):
            ids = train_ids[mine[m * micro : (m + 1) * micro]].to(accelerator.device)
            with accelerator.no_sync(model) if m < n_micro - 1 else nullcontext():  # gradients synced once per step
                with window_dropout(linear_attention_layers(model), drop):
                    loss = micro_batch_loss(model, ids, lm=lm, loss_chunk=cfg.loss_chunk, kd=kd, teacher=teacher,
                                            autocast=accelerator.autocast)
                accelerator.backward(loss / n_micro)
            step_loss += loss.detach() / n_micro
        return step_loss

    result = run_loop(named, step, cfg=cfg, total_steps=total, tokens_per_step=cfg.batch_size * L,
                      checkpoint_dir=Path(work_dir) / "ckpt", name="finetuning", processes=accelerator,
                      progress=progress, on_step=on_step, stop_after=stop_after)
    if result.finished:
        for _, p in named:
            p.requires_grad_(False)
    return result
