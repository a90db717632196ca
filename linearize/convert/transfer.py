"""Attention transfer: train only the feature maps (and hybrid mix factors) so every linear layer mimics its
softmax teacher.

Teacher forcing: each step runs the frozen teacher once (original softmax attention modules installed), records
every attention module's input (hidden states and RoPE tables) with forward pre-hooks, and then trains each
student layer on its own recorded input. No gradient flows between layers or through the network, so memory and
compute are those of one teacher forward plus one attention per layer.

Losses (``TransferConfig.loss``):
- ``mse``: mean squared error between student and teacher attention outputs per head, before the output
  projection (LoLCATs), scaled by ``mse_scale`` (1000 in LoLCATs' code; AdamW is nearly scale-free, the scale only
  sets the balance in ``both``);
- ``xent``: Hedgehog's cross-entropy between the teacher's softmax weights and the student's normalised weights,
  computed over blocks of ``xent_block`` query rows with a backward per block, so memory is O(block * T);
- ``both``: the sum.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from linearize.convert.config import TransferConfig
from linearize.progress import Progress, QuietProgress
from linearize.training import StepHook, run_loop, step_indices


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


@contextlib.contextmanager
def capture_attention_inputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, tuple[Tensor, Any]]]:
    """Record (hidden_states, position_embeddings) given to each module during a forward."""
    store: dict[int, tuple[Tensor, Any]] = {}
    handles = []
    for i, m in modules.items():
        def hook(mod, args, kwargs, i=i):
            hs = args[0] if args else kwargs["hidden_states"]
            store[i] = (hs.detach(), kwargs.get("position_embeddings"))
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------
def layer_losses(student: nn.Module, hidden: Tensor, pos, cfg: TransferConfig, backward: bool) -> dict[str, float]:
    """Transfer loss of one student layer on its recorded input; runs backward when asked (per query block for
    the cross-entropy, so the O(T^2) weights never exist at once)."""
    la = student.linear_attn
    with torch.no_grad():
        q, k, v = student.qkv(hidden, pos)
    out: dict[str, float] = {}
    if cfg.loss in ("mse", "both"):
        with torch.no_grad():
            target = la.exact_softmax_attention(q, k, v).float()
        with torch.set_grad_enabled(backward):
            o = la(q, k, v).float()
            mse = torch.mean((o - target) ** 2)
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
                student_w = la.attention_weights(q, k, rows)
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
    tokens: int
    seconds: float
    layer_loss_before: dict[int, float] = field(default_factory=dict)
    layer_loss_after: dict[int, float] = field(default_factory=dict)
    """Empty when the run stopped early (``stop_after``)."""
    resumed_from: int = 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _teacher_inputs(model: nn.Module, adapter, teacher: dict[int, nn.Module], ids: Tensor) -> dict[int, tuple]:
    """One frozen teacher forward; every attention module's recorded input."""
    with torch.no_grad(), installed(model, adapter, teacher), capture_attention_inputs(teacher) as rec:
        model.base_model(input_ids=ids, use_cache=False)
    return rec


def evaluate_layers(
    model: nn.Module, adapter, teacher: dict[int, nn.Module], students: dict[int, nn.Module],
    batches: Tensor, cfg: TransferConfig, batch_size: int, progress: Progress | None = None,
) -> dict[int, float]:
    """Mean transfer loss per layer over ``batches`` [N, L] (no training)."""
    sums = {i: 0.0 for i in students}
    starts = range(0, batches.shape[0], batch_size)
    with (progress or QuietProgress()).task("measuring every layer's transfer loss", len(starts), "batches") as task:
        for n, b0 in enumerate(starts, 1):
            rec = _teacher_inputs(model, adapter, teacher, batches[b0 : b0 + batch_size].to(_device(model)))
            for i, s in students.items():
                with torch.no_grad():
                    sums[i] += total_loss(layer_losses(s, *rec[i], cfg, backward=False), cfg)
            task.update(n)
    return {i: v / max(len(starts), 1) for i, v in sums.items()}


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
) -> TransferResult:
    """Train ``students`` (their ``linear_attn`` parameters only) to mimic ``teacher`` modules, layer by layer.

    Args:
        model: the model whose blocks hold the attention modules (any module installed; this swaps as needed).
        teacher / students: layer index -> softmax attention module / linear attention module (sharing weights).
        train / valid: token blocks [N, L]; one step consumes ``cfg.batch_size`` blocks, in a seeded order per
            epoch (:func:`~linearize.training.step_indices`).
        work_dir: checkpoints go to ``work_dir / "transfer-ckpt"``; an existing checkpoint is resumed.
        max_steps: total steps (default: one pass over ``train``).
        progress / on_step: see :func:`~linearize.training.run_loop`.
        stop_after: stop (as if killed) after this many steps of this call; for tests of resume.
    """
    device = _device(model)
    progress = progress or QuietProgress()
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    named = [(f"{i}.{n}", p) for i, s in students.items() for n, p in s.linear_attn.named_parameters()]
    for _, p in named:
        p.requires_grad_(True)
    total = max_steps or max(1, train.shape[0] // cfg.batch_size)
    ckpt = Path(work_dir) / "transfer-ckpt"
    before: dict[int, float] = {}
    if not ckpt.exists():
        before = evaluate_layers(model, adapter, teacher, students, valid, cfg, cfg.batch_size, progress)

    def step(index: int) -> Tensor:
        ids = train[step_indices(index, train.shape[0], cfg.batch_size, seed)].to(device)
        rec = _teacher_inputs(model, adapter, teacher, ids)
        loss = 0.0
        for i, s in students.items():
            loss += total_loss(layer_losses(s, *rec[i], cfg, backward=True), cfg)
        return torch.tensor(loss / max(1, len(students)))

    result = run_loop(
        named, step, cfg=cfg, total_steps=total, tokens_per_step=cfg.batch_size * train.shape[1],
        checkpoint_dir=ckpt, name="attention transfer", extra_meta={"layer_loss_before": before},
        progress=progress, on_step=on_step, stop_after=stop_after,
    )
    before = {int(k): v for k, v in result.meta["layer_loss_before"].items()}
    if not result.finished:
        return TransferResult(result.steps, result.tokens, result.seconds, before, {}, result.resumed_from)
    after = evaluate_layers(model, adapter, teacher, students, valid, cfg, cfg.batch_size, progress)
    for _, p in named:
        p.requires_grad_(False)
    return TransferResult(total, result.tokens, result.seconds, before, after, result.resumed_from)
