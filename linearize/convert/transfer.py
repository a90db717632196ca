"""Attention transfer: train only the feature maps (and hybrid mix factors) so every linear layer mimics its
softmax teacher.

Teacher forcing: each step runs the frozen teacher once and records, for every trained layer, the q, k, v its
attention computed and that attention's output (the target), then trains each student layer on its own record.
The trained layers run the teacher's attention themselves during that forward
(:attr:`~linearize.modules.attention.HybridLinearAttention.exact_softmax`: the base attention's own q/k/v/o
projections and RoPE, exact causal softmax attention on them, which is what the base module computes), the other
layers run their original modules; a forward hook on each trained layer's attention keeps its inputs and output.
So nothing is computed twice: no second q/k/v projection and no second softmax attention per layer. No gradient
flows between layers or through the network, so memory and compute are those of one teacher forward plus one
student attention per layer. The teacher forward stops right after the last trained layer's attention.

Block-wise (``TransferConfig.layers_per_block``): consecutive blocks of student layers are trained one after the
other, each with the same steps, batches and learning-rate schedule as joint training, and each step's teacher
forward stops after the block's last layer, so memory holds one block's recorded inputs and optimizer state.
Every layer's trajectory depends only on its own gradients (AdamW is per parameter), so with ``grad_clip`` 0 the
result equals joint training; clipping couples the layers one optimizer holds (the norm is over all their
gradients), so with clipping the two differ.

Losses (``TransferConfig.loss``):
- ``mse``: mean squared error between student and teacher attention outputs per head, before the output
  projection (LoLCATs), scaled by ``mse_scale`` (1000 in LoLCATs' code; AdamW is nearly scale-free, the scale only
  sets the balance in ``both``);
- ``xent``: Hedgehog's cross-entropy between the teacher's softmax weights and the student's normalised weights,
  computed over blocks of ``xent_block`` query rows with a backward per block, so memory is O(block * T);
- ``both``: the sum.

Several processes (``processes``, an ``accelerate.Accelerator``: ``torchrun -m linearize.convert ...``): data
parallel over the same global batch. Step ``n``'s ``batch_size`` sequences (:func:`~linearize.run.loop.step_indices`)
are split into equal contiguous shares, one per process; each process runs the teacher forward and every layer's
loss and backward on its share, then the gradients are averaged over the processes (one all-reduce per bucket,
:func:`average_gradients`) before clipping and the optimizer step. The losses are means over a share, and the shares
are equal, so the averaged gradient is the gradient of the whole batch's mean: every process takes the one-process
step (to the rounding of the sum's order). Before/after measurements are sharded by batch and summed; block files
are written by the main process only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from linearize.convert.config import TransferConfig
from linearize.errors import ConfigError
from linearize.kernels.mse import mse as mse_loss
from linearize.modules.attention import exact_softmax, window_dropout, window_dropped
from linearize.run.loop import StepHook, run_loop, step_indices
from linearize.run.processes import Processes, average_gradients, broadcast_from_main, share
from linearize.run.progress import Progress, QuietProgress


# ---------------------------------------------------------------------------------------------------------------
# Installing teacher / student attention modules
# ---------------------------------------------------------------------------------------------------------------
def attention_modules(model: nn.Module, adapter) -> dict[int, nn.Module]:
    blocks = adapter.blocks(model)
    return {i: getattr(b, adapter.attention_attr) for i, b in enumerate(blocks)}


@contextlib.contextmanager
def installed(model: nn.Module, adapter, modules: dict[int, nn.Module]) -> Iterator[None]:
    """Temporarily put ``modules`` (layer index -> attention module) into the model."""
    blocks = adapter.blocks(model)
    previous = {i: getattr(blocks[i], adapter.attention_attr) for i in modules}
    for i, m in modules.items():
        setattr(blocks[i], adapter.attention_attr, m)
    try:
        yield
    finally:
        for i, m in previous.items():
            setattr(blocks[i], adapter.attention_attr, m)


class StopForward(Exception):
    """Raised by the hook of :func:`record_attention`'s ``stop_at`` layer once it has recorded: the rest of the
    forward is not needed (the caller catches it)."""


Record = tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]
"""One layer's teacher record: q [B, H, T, d], k / v [B, Hk, T, d] (post-RoPE), the teacher's attention output
[B, H, T, D] on them, before the output projection, and q, k before RoPE when the feature maps read those
(``feature_input: unrotated``; else None)."""


@contextlib.contextmanager
def record_attention(students: dict[int, nn.Module], stop_at: int | None = None
                     ) -> Iterator[dict[int, Record]]:
    """Every forward inside the block records each of ``students``' :data:`Record` (run them in
    :func:`~linearize.modules.attention.exact_softmax` mode, so that the output is the teacher's); with
    ``stop_at``, that layer's hook raises :class:`StopForward` right after recording."""
    store: dict[int, Record] = {}
    handles = []
    for i, m in students.items():
        def hook(mod, args, kwargs, out, i=i):
            q, k, v = args[:3]
            phi_in = kwargs.get("phi_in")
            store[i] = (q.detach(), k.detach(), v.detach(), out.detach(),
                        None if phi_in is None else tuple(x.detach() for x in phi_in))
            if i == stop_at:
                raise StopForward
        handles.append(m.linear_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------
def layer_losses(student: nn.Module, record: Record, cfg: TransferConfig, backward: bool) -> dict[str, float]:
    """Transfer loss of one student layer on its teacher record; runs backward when asked (per query block for
    the cross-entropy, so the O(T^2) weights never exist at once)."""
    la = student.linear_attn
    q, k, v, target, phi_in = record
    out: dict[str, float] = {}
    if cfg.loss in ("mse", "both"):
        with torch.set_grad_enabled(backward):  # fused on CUDA: loss and gradient in one pass, no fp32 copies
            mse = mse_loss(la(q, k, v, phi_in=phi_in), target, backend=la.settings.backend)
            if backward:
                (cfg.mse_scale * mse).backward()
        out["mse"] = mse.item()
    if cfg.loss in ("xent", "both"):
        T = q.shape[2]
        total = 0.0
        for r0 in range(0, T, cfg.xent_block):
            rows = slice(r0, min(T, r0 + cfg.xent_block))
            with torch.no_grad():
                teacher_w = _softmax_weights(q, k, la.scale, rows)
            with torch.set_grad_enabled(backward):
                student_w = la.attention_weights(q, k, rows, phi_in)
                # sum over keys, mean over (batch, head, row); blocks weighted by their share of rows
                xent = -(teacher_w * torch.log(student_w + 1e-12)).sum(-1).mean() * (rows.stop - rows.start) / T
                if backward:
                    xent.backward()
            total += xent.item()
        out["xent"] = total
    return out


def _softmax_weights(q: Tensor, k: Tensor, scale: float, rows: slice) -> Tensor:
    H, T = q.shape[1], k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q[:, :, rows].float(), k.float()) * scale
    i = torch.arange(T, device=q.device)[rows][:, None]
    j = torch.arange(T, device=q.device)[None, :]
    return torch.softmax(s.masked_fill(j > i, float("-inf")), dim=-1)


def total_loss(losses: dict[str, float], cfg: TransferConfig) -> float:
    return cfg.mse_scale * losses.get("mse", 0.0) + losses.get("xent", 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The stage: a step function on the shared loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TransferResult:
    steps: int
    """Optimizer steps, summed over blocks (block-wise, every block runs all the steps)."""
    tokens: int
    """Tokens trained on, summed over blocks like ``steps``."""
    seconds: float
    layer_loss_before: dict[int, float] = field(default_factory=dict)
    layer_loss_after: dict[int, float] = field(default_factory=dict)
    """Empty when the run stopped early (``stop_after``)."""
    resumed_from: int = 0
    """Steps (counted like ``steps``) done before this call: finished blocks and the resumed block's."""
    blocks: list[list[int]] = field(default_factory=list)
    """The layers trained together, in order: one block of every student layer without ``layers_per_block``."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _teacher_records(model: nn.Module, adapter, teacher: dict[int, nn.Module], students: dict[int, nn.Module],
                     ids: Tensor, layers: Iterable[int] | None = None) -> dict[int, Record]:
    """One frozen teacher forward; the :data:`Record` of every layer in ``layers`` (default: every student).
    Every student layer runs the teacher's attention itself, the other layers their ``teacher`` module (module
    docstring), so a layer's input does not depend on which layers are recorded (block-wise equals joint). The
    forward stops right after the last recorded layer: later layers do not run."""
    wanted = {i: students[i] for i in (students if layers is None else layers)}
    with torch.no_grad(), installed(model, adapter, {**teacher, **students}), \
            exact_softmax(s.linear_attn for s in students.values()), \
            record_attention(wanted, stop_at=max(wanted, default=None)) as rec:
        try:
            model.base_model(input_ids=ids, use_cache=False)
        except StopForward:
            pass
    return rec


def evaluate_layers(
    model: nn.Module, adapter, teacher: dict[int, nn.Module], students: dict[int, nn.Module],
    batches: Tensor, cfg: TransferConfig, batch_size: int, progress: Progress | None = None,
    name: str = "measuring every layer's transfer loss", processes: Processes | None = None,
    all_students: dict[int, nn.Module] | None = None,
) -> dict[int, float]:
    """Mean transfer loss per layer of ``students`` over ``batches`` [N, L] (no training); ``name`` is the progress
    task's. With several ``processes`` (every one calls this) process ``r`` measures batches ``r, r + P, ...`` and the
    sums are added up, so every process returns the one-process numbers (to the order of a float64 sum).
    ``all_students`` (default ``students``): every student layer of the model, each running the teacher's attention
    in the forward (:func:`_teacher_records`)."""
    sums = {i: 0.0 for i in students}
    starts = range(0, batches.shape[0], batch_size)
    world, rank = (processes.num_processes, processes.process_index) if processes is not None else (1, 0)
    mine = starts[rank::world]
    with (progress or QuietProgress()).task(name, len(mine), "batches") as task:
        for n, b0 in enumerate(mine, 1):
            ids = batches[b0 : b0 + batch_size].to(_device(model))
            rec = _teacher_records(model, adapter, teacher, all_students or students, ids, students)
            for i, s in students.items():
                with torch.no_grad():
                    sums[i] += total_loss(layer_losses(s, rec[i], cfg, backward=False), cfg)
            task.update(n)
    if world > 1:
        summed = processes.reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=processes.device),
                                  reduction="sum").tolist()
        sums = dict(zip(sums, summed))
    return {i: v / max(len(starts), 1) for i, v in sums.items()}


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------
def transfer_blocks(layers: Iterable[int], layers_per_block: int | None) -> list[list[int]]:
    """``layers`` in order, in consecutive blocks of ``layers_per_block`` (the last one may be shorter); one block
    of all of them when None."""
    layers = sorted(layers)
    n = layers_per_block or max(1, len(layers))
    return [layers[k : k + n] for k in range(0, len(layers), n)]


def _span(layers: list[int]) -> str:
    """``layers 0-3``, ``layer 5``, ``layers 0-2, 4``."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return f"layer{'s' if len(layers) > 1 else ''} {text}"


def _check_layout(root: Path, blockwise: bool) -> None:
    """Refuse checkpoints of the other mode (joint: a loop checkpoint in ``root``; block-wise: ``block-*`` in it)."""
    if not root.is_dir():
        return
    joint = (root / "meta.json").is_file()
    if joint if blockwise else any(root.glob("block-*")):
        kind = "joint" if joint else "block-wise"
        raise ConfigError(f"{root} holds a {kind} attention-transfer checkpoint; resume with the same "
                          "layers_per_block, or start over (--overwrite / overwrite: true)")


def _save_finished_block(path: Path, named: list[tuple[str, nn.Parameter]], record: dict[str, Any]) -> None:
    """A finished block's trained parameters, with its record (JSON) in the file's metadata. Written beside and
    renamed into place, so the file exists only complete: its presence marks the block finished."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in named}, str(tmp), metadata={"record": json.dumps(record)})
    os.replace(tmp, path)


def _load_finished_block(path: Path, named: list[tuple[str, nn.Parameter]], total: int) -> dict[str, Any]:
    """Put a finished block's parameters back; its record."""
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["record"])
        if sorted(f.keys()) != sorted(n for n, _ in named) or record["steps"] != total:
            raise ConfigError(f"{path} was written for other trainable parameters or another number of steps; "
                              "resume with the same settings, or start over (--overwrite / overwrite: true)")
        with torch.no_grad():
            for n, p in named:
                p.copy_(f.get_tensor(n).to(p.device, p.dtype))
    return record


# ---------------------------------------------------------------------------------------------------------------
# The stage: a step function on the shared loop, once per block
# ---------------------------------------------------------------------------------------------------------------
def run_transfer(
    model: nn.Module,
    adapter,
    teacher: dict[int, nn.Module],
    students: dict[int, nn.Module],
    train: Tensor,
    valid: Tensor,
    cfg: TransferConfig,
    *,
    work_dir: Path,
    seed: int = 0,
    max_steps: int | None = None,
    progress: Progress | None = None,
    on_step: StepHook | None = None,
    stop_after: int | None = None,
    processes: Processes | None = None,
) -> TransferResult:
    """Train ``students`` (their ``linear_attn`` parameters only) to mimic ``teacher`` modules, layer by layer:
    all layers jointly, or with ``cfg.layers_per_block`` one block after the other (module docstring).

    Args:
        model: the model whose blocks hold the attention modules (any module installed; this swaps as needed).
        teacher / students: layer index -> softmax attention module / linear attention module (sharing weights).
        train / valid: token blocks [N, L]; one step consumes ``cfg.batch_size`` blocks, in a seeded order per
            epoch (:func:`~linearize.run.loop.step_indices`); every block sees the same order.
        work_dir: checkpoints go to ``work_dir / "transfer-ckpt"`` (block-wise: its ``block-NN`` folders, and a
            finished block's parameters in ``block-NN.done.safetensors``); an existing checkpoint is resumed and
            finished blocks are skipped.
        max_steps: steps per block (default: one pass over ``train``).
        progress: see :func:`~linearize.run.loop.run_loop`; block-wise, each block's loop is its own task.
        on_step: see :func:`~linearize.run.loop.run_loop`; block-wise, steps and total count over all blocks.
        stop_after: stop (as if killed) after this many steps of this call, counted over blocks; for tests of
            resume.
        processes: the process group (an ``accelerate.Accelerator``; every process calls this with the same
            arguments); default one process. Each step's batch is split over the processes and the gradients are
            averaged (module docstring); the students start from the main process's values, only the main process
            writes checkpoints and shows progress, and every process returns the same result.

    Raises:
        ConfigError: nothing to train, a checkpoint of the other mode or settings, or (several processes) a batch
            size that does not split evenly over them, or fewer training sequences than one batch.
    """
    device = _device(model)
    main = processes is None or processes.is_main_process
    progress = (progress or QuietProgress()) if main else QuietProgress()
    first, end = share(cfg.batch_size, processes)
    if processes is not None and processes.num_processes > 1 and train.shape[0] < cfg.batch_size:
        raise ConfigError(f"only {train.shape[0]} calibration sequences for --batch-size {cfg.batch_size} on "
                          f"{processes.num_processes} processes; raise --tokens or lower --batch-size")
    torch.manual_seed(seed)
    for p in [*model.parameters(), *(p for s in students.values() for p in s.linear_attn.parameters())]:
        p.requires_grad_(False)
    total = max_steps or max(1, train.shape[0] // cfg.batch_size)
    root = Path(work_dir) / "transfer-ckpt"
    blockwise = cfg.layers_per_block is not None
    _check_layout(root, blockwise)
    blocks = transfer_blocks(students, cfg.layers_per_block)
    if not blocks:
        raise ConfigError("nothing to train: no parameter requires a gradient (every layer stays softmax)")
    # every process starts from the main one's maps (a random initialisation may differ between processes)
    broadcast_from_main([t for s in students.values() for t in s.linear_attn.state_dict().values()], processes)
    if processes is not None:
        processes.wait_for_everyone()  # everyone has read the checkpoints' layout before the main one changes it
    width = max(2, len(str(len(blocks) - 1)))
    out = TransferResult(0, 0, 0.0, blocks=blocks)
    remaining = stop_after
    for b, layers in enumerate(blocks):
        block = {i: students[i] for i in layers}
        named = [(f"{i}.{n}", p) for i, s in block.items() for n, p in s.linear_attn.named_parameters()]
        if blockwise:
            tag = f"{_span(layers)} (block {b + 1}/{len(blocks)})"
            ckpt, done = root / f"block-{b:0{width}d}", root / f"block-{b:0{width}d}.done.safetensors"
            name, measuring = f"attention transfer, {tag}", f"measuring the transfer loss of {tag}"
        else:
            ckpt, done = root, None
            name, measuring = "attention transfer", "measuring every layer's transfer loss"
        if done is not None and done.is_file():
            record = _load_finished_block(done, named, total)
            progress.log(f"{name}: finished in an earlier run")
            out.steps += record["steps"]
            out.resumed_from += record["steps"]
            out.tokens += record["tokens"]
            out.seconds += record["seconds"]
            out.layer_loss_before.update({int(k): v for k, v in record["layer_loss_before"].items()})
            out.layer_loss_after.update({int(k): v for k, v in record["layer_loss_after"].items()})
            if main:
                shutil.rmtree(ckpt, ignore_errors=True)  # a kill between the marker and this removal leaves it
            continue
        if remaining is not None and remaining <= 0:  # stop_after reached at the end of the previous block
            break
        before = {} if ckpt.exists() else evaluate_layers(model, adapter, teacher, block, valid, cfg,
                                                          cfg.batch_size, progress, measuring, processes, students)
        for _, p in named:
            p.requires_grad_(True)

        trained = [p for _, p in named]

        def step(index: int, block: dict[int, nn.Module] = block,
                 params: list[nn.Parameter] = trained) -> Tensor:
            # this process's share of the step's global batch (all of it with one process)
            ids = train[step_indices(index, train.shape[0], cfg.batch_size, seed)[first:end]].to(device)
            rec = _teacher_records(model, adapter, teacher, students, ids, block)
            loss = 0.0
            drop = window_dropped(cfg.window_dropout, index, seed)
            with window_dropout((s.linear_attn for s in block.values()), drop):
                for i, s in block.items():
                    loss += total_loss(layer_losses(s, rec[i], cfg, backward=True), cfg)
            average_gradients(params, processes)  # before run_loop clips and steps
            return torch.tensor(loss / max(1, len(block)))

        hook = on_step
        if on_step is not None and blockwise:
            def hook(done_steps: int, _total: int, loss: float, tps: float, offset: int = b * total) -> None:
                on_step(offset + done_steps, len(blocks) * total, loss, tps)

        try:
            result = run_loop(
                named, step, cfg=cfg, total_steps=total, tokens_per_step=cfg.batch_size * train.shape[1],
                checkpoint_dir=ckpt, name=name, extra_meta={"layer_loss_before": before}, processes=processes,
                progress=progress, on_step=hook, stop_after=remaining,
            )
        finally:
            for _, p in named:
                p.requires_grad_(False)
        out.steps += result.steps
        out.resumed_from += result.resumed_from
        out.tokens += result.tokens
        out.seconds += result.seconds
        before = {int(k): v for k, v in result.meta["layer_loss_before"].items()}
        out.layer_loss_before.update(before)
        if remaining is not None:
            remaining -= result.steps - result.resumed_from
        if not result.finished:
            break
        after = evaluate_layers(model, adapter, teacher, block, valid, cfg, cfg.batch_size, progress, measuring,
                                processes, students)
        out.layer_loss_after.update(after)
        if done is not None:
            if main:
                _save_finished_block(done, named, {"layers": layers, "steps": result.steps, "tokens": result.tokens,
                                                   "seconds": result.seconds, "layer_loss_before": before,
                                                   "layer_loss_after": after})
                shutil.rmtree(ckpt, ignore_errors=True)
            if processes is not None:
                processes.wait_for_everyone()
    else:
        return out
    out.layer_loss_after = {}  # stopped early: the contract of stop_after
    return out
