"""The LoRA training loop (accelerate), its checkpoints, and validation loss.

One optimizer step consumes ``batch_size`` packed sequences in total, split evenly over the processes
(``accelerate launch`` = DDP) and, on each process, into micro-batches of ``micro_batch_size`` (gradient
accumulation; gradients are synchronised once per step). The global order of sequences depends only on the seed,
so a run resumed from a checkpoint, or run on another number of GPUs, sees the same batches.

Loss per micro-batch: mean next-token cross-entropy, or with distillation
``(1 - w) * CE + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per token.

Checkpoints (``<work>/ckpt``; safetensors + JSON, no pickle) hold the trainable parameters by name, AdamW's
moments, the step and the loss history; LoRA dropout is re-seeded from (seed, step) at every step, so a resumed run
reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.checkpoint import Interrupted, deferred_interrupt, load_training_state, save_training_state
from linearize.errors import ConfigError
from linearize.finetune.lora import trainable_parameters
from linearize.recipes import FinetuneSection

Progress = Callable[[int, int, float, float], None]
"""progress(step, total_steps, loss, tokens_per_second), called on the main process after each step."""


# ---------------------------------------------------------------------------------------------------------------
# Schedule and batching
# ---------------------------------------------------------------------------------------------------------------
def lr_factor(step: int, total: int, cfg: FinetuneSection) -> float:
    """Multiplier on ``cfg.lr`` at 0-based ``step``."""
    warm = int(cfg.warmup * total)
    if step < warm:  # 1) linear warmup from lr / warm
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    frac = min(1.0, (step - warm) / max(1, total - warm))  # 2) decay to min_lr_frac * lr
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - cfg.min_lr_frac) * frac
    return cfg.min_lr_frac + (1.0 - cfg.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * frac))


def split_batch(cfg: FinetuneSection, num_processes: int) -> tuple[int, int]:
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


def step_indices(step: int, n_seqs: int, batch_size: int, seed: int) -> Tensor:
    """Global sequence indices of optimizer step ``step``: a seeded permutation per epoch."""
    per_epoch = max(1, n_seqs // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n_seqs, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return order[pos * batch_size : (pos + 1) * batch_size]


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------
def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher_T || student_T), mean over positions 0..L-2."""
    s = F.log_softmax(student[:, :-1].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[:, :-1].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Trainable parameters + AdamW state (safetensors) and ``meta`` (JSON), replaced atomically."""
    save_training_state(path, trainable_parameters(model), opt, meta)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model`` and ``opt``; returns the meta dict."""
    return load_training_state(path, trainable_parameters(model), opt)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model: nn.Module, blocks: Tensor, batch_size: int, accelerator,
                    context: Callable[[], ContextManager] | None = None) -> dict[str, float]:
    """Mean next-token loss and perplexity over ``blocks`` [N, L], sharded over the processes and summed."""
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = blocks[rank::world]
    nll = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for b0 in range(0, mine.shape[0], batch_size):
        ids = mine[b0 : b0 + batch_size].to(accelerator.device)
        with context() if context is not None else _null():
            logits = model(input_ids=ids, use_cache=False).logits
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll[0] -= lp.gather(-1, ids[:, 1:, None]).sum().double()
        nll[1] += ids[:, 1:].numel()
    nll = accelerator.reduce(nll, reduction="sum")
    model.train(was_training)
    loss = (nll[0] / nll[1].clamp_min(1)).item()
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(nll[1].item())}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    """Steps completed (== total unless stopped)."""
    total_steps: int
    tokens: int
    seconds: float
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)
    """Training loss of every step (all processes averaged), including steps before a resume."""
    finished: bool = True


def train(
    model: nn.Module,
    train_ids: Tensor,
    cfg: FinetuneSection,
    *,
    seed: int,
    accelerator,
    work_dir: Path,
    teacher: Callable[[Tensor], Tensor] | None = None,
    progress: Progress | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``train_ids`` [N, L].

    Args:
        model: the LoRA-wrapped model, already ``accelerator.prepare``-d (DDP under ``accelerate launch``).
        train_ids: packed token sequences; ``cfg.tokens // (batch_size * L)`` steps are taken (at least 1).
        teacher: ``ids -> logits`` of the distillation teacher (required when ``cfg.kd`` is set).
        work_dir: checkpoints go to ``work_dir / "ckpt"``; an existing one is resumed.
        stop_after: stop (as if killed) after this many steps of this call, leaving a checkpoint; for tests.

    Raises:
        ConfigError: the batch does not split over the processes, or a checkpoint does not match the model.
    """
    unwrapped = accelerator.unwrap_model(model)
    params = [p for _, p in trainable_parameters(unwrapped)]
    if not params:
        raise ConfigError("nothing to train: no LoRA or feature-map parameter requires a gradient")
    per_proc, micro = split_batch(cfg, accelerator.num_processes)
    L = train_ids.shape[1]
    if train_ids.shape[0] < cfg.batch_size:
        raise ConfigError(f"only {train_ids.shape[0]} training sequences for finetune.batch_size={cfg.batch_size}; "
                          "raise finetune.tokens or lower the batch size")
    total = max(1, min(cfg.tokens // (cfg.batch_size * L), train_ids.shape[0] // cfg.batch_size))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = work_dir / "ckpt"
    start, losses, tokens_before, seconds_before = 0, [], 0, 0.0
    if ckpt.exists():
        meta = load_checkpoint(ckpt, unwrapped, opt)
        start, losses = meta["step"], meta["losses"]
        tokens_before, seconds_before = meta["tokens"], meta["seconds"]
        log(f"resuming finetuning at step {start} of {total} from {ckpt}")
    raw_opt = opt
    opt = accelerator.prepare_optimizer(opt)
    wrapped = model
    rank = accelerator.process_index
    kd = cfg.kd
    if kd is not None and kd.weight > 0 and teacher is None:
        raise ConfigError("finetune.kd is set but no teacher was given")
    wrapped.train()
    t0 = time.perf_counter()
    tokens_done = 0
    done = start
    # Ctrl-C stops at a step boundary with a checkpoint (one process; several would not stop at the same step)
    with deferred_interrupt(enabled=accelerator.num_processes == 1) as interrupted:
        for step in range(start, total):
            idx = step_indices(step, train_ids.shape[0], cfg.batch_size, seed)
            mine = idx[rank * per_proc : (rank + 1) * per_proc]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total, cfg)
            torch.manual_seed(seed * 100_003 + step * 1009 + rank)  # LoRA dropout: same masks after a resume
            step_loss = torch.zeros((), device=accelerator.device)
            n_micro = per_proc // micro
            for m in range(n_micro):
                ids = train_ids[mine[m * micro : (m + 1) * micro]].to(accelerator.device)
                sync = accelerator.no_sync(wrapped) if m < n_micro - 1 else _null()
                with sync:
                    logits = wrapped(input_ids=ids, use_cache=False).logits
                    loss = next_token_loss(logits, ids)
                    if kd is not None and kd.weight > 0:
                        with torch.no_grad():
                            t_logits = teacher(ids)
                        loss = (1 - kd.weight) * loss + kd.weight * distill_loss(logits, t_logits, kd.temperature)
                    accelerator.backward(loss / n_micro)
                step_loss += loss.detach() / n_micro
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(accelerator.reduce(step_loss, reduction="mean").item())
            tokens_done += cfg.batch_size * L
            done = step + 1
            if progress is not None and accelerator.is_main_process:
                progress(done, total, losses[-1], tokens_done / max(time.perf_counter() - t0, 1e-9))
            stopping = stop_after is not None and done - start >= stop_after and done < total
            interrupting = interrupted() and done < total
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total) or stopping or interrupting:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(ckpt, unwrapped, raw_opt,
                                    {"step": done, "losses": losses, "tokens": tokens_before + tokens_done,
                                     "seconds": seconds_before + time.perf_counter() - t0})
                accelerator.wait_for_everyone()
            if interrupting:
                raise Interrupted(f"stopped after step {done} of {total}; checkpoint saved")
            if stopping:
                return TrainResult(done, total, tokens_before + tokens_done, seconds_before + time.perf_counter() - t0,
                                   start, losses, finished=False)
    for p in params:
        p.requires_grad_(False)
    return TrainResult(done, total, tokens_before + tokens_done, seconds_before + time.perf_counter() - t0, start,
                       losses)
