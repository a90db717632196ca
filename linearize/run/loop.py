"""The run skeleton both training stages share: the work folder, the step loop, its schedule and checkpoints.

- :class:`WorkFolder`: a stage's resumable work beside its output (``.<out>.work``): the settings it runs with
  (a fingerprint; unfinished work with other settings is refused, naming the differences), artefacts built once
  and reused by a resumed run (tokenised data, measurements), and checkpoints. Removed when the export is done.
- :func:`run_loop`: AdamW over the trainable parameters, warmup + decay from transformers' schedules, gradient
  clipping, optional autocast, a checkpoint every ``checkpoint_every`` steps (and on Ctrl-C), resume from the last
  checkpoint, progress and an ``on_step`` hook. A stage supplies only its step function (forward + backward of one
  step) and its parameters; data order comes from :func:`step_indices`, a pure function of (seed, step), so a
  resumed run, or one on another number of processes, sees the same batches.
- :class:`SingleProcess`: the process group of a run without ``accelerate`` (attention transfer); finetuning
  passes its ``accelerate.Accelerator``, which has the same methods.

Attention transfer (``convert/transfer.py``) and LoRA finetuning (``finetune/train.py``) are both a step function
plus this loop.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from linearize.errors import ConfigError, LinearizeError
from linearize.run.checkpoint import Interrupted, deferred_interrupt, load_training_state, save_training_state
from linearize.run.processes import Processes, SingleProcess
from linearize.run.progress import Progress, QuietProgress
from linearize.settings import LoopConfig

StepHook = Callable[[int, int, float, float], None]
"""on_step(step, total_steps, loss, tokens_per_second), called on the main process after every step."""


def lr_schedule(cfg: LoopConfig, total: int) -> Callable[[int], float]:
    """``factor(step)``: the multiplier on ``cfg.lr`` for 0-based ``step`` of ``total``, from transformers'
    schedules (``warmup * total`` warmup steps). A step uses the schedule's value after it is counted, so no step
    runs at learning rate 0 and the last one reaches the floor."""
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_wsd_schedule,
    )

    warm = int(cfg.warmup * total)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # the schedules are LambdaLRs
    if cfg.schedule == "cosine":
        sched = get_cosine_with_min_lr_schedule_with_warmup(probe, warm, total, min_lr_rate=cfg.min_lr_frac)
    elif cfg.schedule == "linear":
        sched = get_wsd_schedule(probe, warm, num_decay_steps=max(1, total - warm), num_stable_steps=0,
                                 decay_type="linear", min_lr_ratio=cfg.min_lr_frac)
    else:
        sched = get_constant_schedule_with_warmup(probe, warm)
    factor = sched.lr_lambdas[0]
    return lambda step: float(factor(step + 1))


def lr_factor(step: int, total: int, cfg: LoopConfig) -> float:
    """Multiplier on ``cfg.lr`` at 0-based ``step`` (see :func:`lr_schedule`)."""
    return lr_schedule(cfg, total)(step)


def step_indices(step: int, n_seqs: int, batch_size: int, seed: int) -> Tensor:
    """Global sequence indices of optimizer step ``step``: a seeded permutation per epoch."""
    per_epoch = max(1, n_seqs // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n_seqs, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return order[pos * batch_size : (pos + 1) * batch_size]


# ---------------------------------------------------------------------------------------------------------------
# The work folder
# ---------------------------------------------------------------------------------------------------------------
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


class WorkFolder:
    """A stage's resumable work folder (see the module docstring).

    Args:
        path: the folder (``<parent>/.<out>.work``).
        fingerprint: the settings a resumed run must share (JSON-able; paths already normalised).
        what: how messages name the stage's run ("conversion", "finetuning run").
        discard_hint: how the user discards unfinished work ("pass --overwrite", "set overwrite=true ...").
        worth_keeping: a file whose presence makes unfinished work worth resuming; without it (a run that failed on
            its input before building anything) work with other settings is replaced silently.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any], *, what: str, discard_hint: str,
                 worth_keeping: str):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.what, self.discard_hint, self.worth_keeping = what, discard_hint, worth_keeping
        self.resumed = False

    @staticmethod
    def beside(out: Path) -> Path:
        """Where the work folder of the export ``out`` lives."""
        out = Path(out)
        return out.parent / f".{out.name}.work"

    def open(self, *, overwrite: bool, progress: Progress) -> "WorkFolder":
        """Create the folder, or reuse it when it holds a run with the same settings.

        Raises:
            LinearizeError: it holds unfinished work worth keeping with other settings, and not ``overwrite``.
        """
        settings = self.path / "settings.json"
        if self.path.exists():
            if not settings.is_file() and any(self.path.iterdir()):  # never remove a folder linearize did not write
                raise LinearizeError(f"{self.path} holds files but no settings.json, so it is not a linearize work "
                                     "folder; move it away (linearize keeps a run's unfinished work there)")
            previous = json.loads(settings.read_text()) if settings.is_file() else {}
            if previous != self.fingerprint:
                if overwrite or not (self.path / self.worth_keeping).exists():
                    shutil.rmtree(self.path)
                else:
                    diff = "; ".join(describe_differences(previous, self.fingerprint)[:6])
                    raise LinearizeError(
                        f"{self.path} holds an unfinished {self.what} with different settings ({diff}); rerun with "
                        f"the same settings to resume it, or {self.discard_hint} to discard it and start over with "
                        "the other settings")
            else:
                self.resumed = True
                progress.log(f"resuming the unfinished {self.what} in {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(self.fingerprint, indent=2))
        return self

    def tensors(self, name: str, build: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]]
                ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)`` saved as ``name.safetensors`` + ``name.json``, built by ``build`` the first time."""
        tfile, mfile = self.path / f"{name}.safetensors", self.path / f"{name}.json"
        if not (tfile.is_file() and mfile.is_file()):
            tensors, meta = build()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tfile))
            mfile.write_text(json.dumps(meta))
        return load_file(str(tfile)), json.loads(mfile.read_text())

    def record(self, name: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A JSON artefact (``name.json``), built by ``build`` the first time."""
        f = self.path / f"{name}.json"
        if not f.is_file():
            f.write_text(json.dumps(build()))
        return json.loads(f.read_text())

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The step loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoopResult:
    steps: int
    """Steps completed (== total_steps unless stopped)."""
    total_steps: int
    tokens: int
    """Tokens trained on, including steps before a resume."""
    seconds: float
    """Training time, including steps before a resume."""
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)
    """Loss of every step (averaged over processes), including steps before a resume."""
    finished: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    """The stage's own values saved with the checkpoints (``extra_meta``), as restored on resume."""


def run_loop(
    named_params: list[tuple[str, torch.nn.Parameter]],
    step_fn: Callable[[int], Tensor],
    *,
    cfg: LoopConfig,
    total_steps: int,
    tokens_per_step: int,
    checkpoint_dir: Path,
    name: str,
    processes: Processes | None = None,
    autocast: Callable[[], ContextManager] | None = None,
    extra_meta: dict[str, Any] | None = None,
    progress: Progress | None = None,
    on_step: StepHook | None = None,
    stop_after: int | None = None,
) -> LoopResult:
    """Train ``named_params`` for ``total_steps`` steps of ``step_fn``, resuming from ``checkpoint_dir``.

    Args:
        named_params: the trainable parameters in a fixed order (the optimizer's and the checkpoint's).
        step_fn: ``step -> loss`` (a detached scalar tensor): forward and backward of one whole optimizer step,
            gradients accumulated into the parameters (the loop zeroes them before and steps after).
        tokens_per_step: tokens one step consumes over all processes (for the throughput shown).
        name: what progress and log lines call the loop ("attention transfer", "finetuning").
        processes: the process group (an ``accelerate.Accelerator``); default one process.
        autocast: context manager factory around ``step_fn`` (e.g. ``accelerator.autocast``).
        extra_meta: the stage's values saved with every checkpoint (restored into ``LoopResult.meta``).
        on_step: called after every step on the main process (Ctrl-C inside it stops at that step boundary).
        stop_after: stop (as if killed) after this many steps of this call, leaving a checkpoint; for tests.

    Raises:
        Interrupted: Ctrl-C (one process): the step finished and a checkpoint was saved.
        ConfigError: nothing to train, or a checkpoint written for other parameters.
    """
    procs = processes or SingleProcess(named_params[0][1].device if named_params else "cpu")
    progress = progress or QuietProgress()
    params = [p for _, p in named_params]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses, tokens_before, seconds_before, meta = 0, [], 0, 0.0, dict(extra_meta or {})
    if checkpoint_dir.exists():
        saved = load_training_state(checkpoint_dir, named_params, opt)
        start, losses = saved["step"], saved["losses"]
        tokens_before, seconds_before = saved["tokens"], saved["seconds"]
        meta = saved["stage"]
        progress.log(f"resuming {name} at step {start} of {total_steps} from {checkpoint_dir}")
    raw_opt, opt = opt, procs.prepare_optimizer(opt)
    factor = lr_schedule(cfg, total_steps)
    t0 = time.perf_counter()
    tokens_done, done = 0, start

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - t0

    def checkpoint() -> None:
        procs.wait_for_everyone()
        if procs.is_main_process:
            save_training_state(checkpoint_dir, named_params, raw_opt,
                                {"step": done, "losses": losses, "tokens": tokens_before + tokens_done,
                                 "seconds": elapsed(), "stage": meta})
        procs.wait_for_everyone()

    show = progress.task(name, total_steps, "steps") if procs.is_main_process else QuietProgress().task(name, None)
    # Ctrl-C stops at a step boundary with a checkpoint (one process; several would not stop at the same step)
    with show, deferred_interrupt(enabled=procs.num_processes == 1) as interrupted:
        show.update(start)
        for step in range(start, total_steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor(step)
            opt.zero_grad(set_to_none=True)
            with autocast() if autocast is not None else contextlib.nullcontext():
                loss = step_fn(step)
            if cfg.grad_clip > 0:
                procs.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            losses.append(procs.reduce(loss.detach().reshape(()).to(procs.device), reduction="mean").item())
            tokens_done += tokens_per_step
            done = step + 1
            tps = tokens_done / max(time.perf_counter() - t0, 1e-9)
            if procs.is_main_process:
                show.update(done, f"loss {losses[-1]:.4g} | {tps:,.0f} tok/s")
                if on_step is not None:
                    on_step(done, total_steps, losses[-1], tps)
            stopping = stop_after is not None and done - start >= stop_after and done < total_steps
            interrupting = interrupted() and done < total_steps
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps) or stopping \
                    or interrupting:
                checkpoint()
            if interrupting:
                raise Interrupted(f"stopped after step {done} of {total_steps}; checkpoint saved")
            if stopping:
                return LoopResult(done, total_steps, tokens_before + tokens_done, elapsed(), start, losses,
                                  finished=False, meta=meta)
    opt.zero_grad(set_to_none=True)
    return LoopResult(done, total_steps, tokens_before + tokens_done, elapsed(), start, losses, meta=meta)


__all__ = [
    "LoopConfig", "LoopResult", "StepHook", "WorkFolder", "describe_differences",
    "lr_factor", "lr_schedule", "run_loop", "step_indices",
]
