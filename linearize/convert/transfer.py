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
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor, nn

from linearize.checkpoint import Interrupted, deferred_interrupt, load_training_state, save_training_state
from linearize.errors import ConfigError


@dataclass
class TransferConfig:
    """Optimisation settings of attention transfer."""

    loss: Literal["mse", "xent", "both"] = "mse"
    """Which loss: mse (attention outputs), xent (attention weights), both."""
    mse_scale: float = 1000.0
    """Multiplier on the MSE term (LoLCATs uses 1000)."""
    lr: float = 1e-2
    """Peak AdamW learning rate (LoLCATs: 1e-2, no weight decay)."""
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    """Fraction of steps of linear warmup; then cosine decay to ``min_lr_frac * lr``."""
    min_lr_frac: float = 0.1
    batch_size: int = 8
    grad_clip: float = 1.0
    xent_block: int = 128
    """Query rows per block in the cross-entropy loss (memory O(block * T))."""
    checkpoint_every: int = 50
    """Steps between checkpoints (0 = only on Ctrl-C; a finished run needs none)."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.loss not in ("mse", "xent", "both"):
            problems.append(f"loss={self.loss!r} must be mse, xent or both")
        for name in ("lr", "batch_size", "xent_block", "mse_scale"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if not 0 <= self.warmup_frac < 1:
            problems.append(f"warmup_frac={self.warmup_frac} must be in [0, 1)")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every={self.checkpoint_every} must be >= 0 (0 = only at the end and on Ctrl-C)")
        if problems:
            raise ConfigError("; ".join(problems))


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
            target = la.softmax_attention(q, k, v).float()
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
# Checkpoints (safetensors + JSON; no pickle)
# ---------------------------------------------------------------------------------------------------------------
def _student_params(students: dict[int, nn.Module]) -> list[tuple[str, Tensor]]:
    return [(f"{i}.{n}", p) for i, s in students.items() for n, p in s.linear_attn.named_parameters()]


def save_checkpoint(path: Path, students: dict[int, nn.Module], opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    save_training_state(path, _student_params(students), opt, {"step": step, **extra})


def load_checkpoint(path: Path, students: dict[int, nn.Module], opt: torch.optim.Optimizer) -> dict:
    return load_training_state(path, _student_params(students), opt)


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TransferResult:
    steps: int
    tokens: int
    seconds: float
    layer_loss_before: dict[int, float] = field(default_factory=dict)
    layer_loss_after: dict[int, float] = field(default_factory=dict)
    resumed_from: int = 0


def lr_lambda(cfg: TransferConfig, total_steps: int) -> Callable[[int], float]:
    warm = max(1, int(cfg.warmup_frac * total_steps))

    def f(step: int) -> float:
        if step < warm:  # 1) linear warmup
            return (step + 1) / warm
        frac = (step - warm) / max(1, total_steps - warm)  # 2) cosine decay to min_lr_frac
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


def evaluate_layers(
    model: nn.Module, adapter, teacher: dict[int, nn.Module], students: dict[int, nn.Module],
    batches: Tensor, cfg: TransferConfig, batch_size: int,
) -> dict[int, float]:
    """Mean transfer loss per layer over ``batches`` [N, L] (no training)."""
    sums = {i: 0.0 for i in students}
    n = 0
    for b0 in range(0, batches.shape[0], batch_size):
        ids = batches[b0 : b0 + batch_size].to(_device(model))
        with torch.no_grad(), installed(model, adapter, teacher), capture_attention_inputs(teacher) as rec:
            model.base_model(input_ids=ids, use_cache=False)
        for i, s in students.items():
            with torch.no_grad():
                sums[i] += total_loss(layer_losses(s, *rec[i], cfg, backward=False), cfg)
        n += 1
    return {i: v / max(n, 1) for i, v in sums.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    max_steps: int | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
    stop_after: int | None = None,
) -> TransferResult:
    """Train ``students`` (their ``linear_attn`` parameters only) to mimic ``teacher`` modules, layer by layer.

    Args:
        model: the model whose blocks hold the attention modules (any module installed; this swaps as needed).
        teacher / students: layer index -> softmax attention module / linear attention module (sharing weights).
        train / valid: token blocks [N, L]; one step consumes ``cfg.batch_size`` blocks, cycling with a
            seeded order per epoch.
        work_dir: checkpoints go to ``work_dir / "transfer-ckpt"``; an existing checkpoint is resumed.
        max_steps: total steps (default: one pass over ``train``).
        progress: called as ``progress(step, total, loss, tokens_per_s)`` after every step.
        stop_after: stop (as if killed) after this many steps of this call; for tests of resume.
    """
    device = _device(model)
    torch.manual_seed(cfg.seed)
    params = [p for s in students.values() for p in s.linear_attn.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_batches = max(1, train.shape[0] // cfg.batch_size)
    total = max_steps or n_batches
    ckpt = work_dir / "transfer-ckpt"
    start, before = 0, {}
    if ckpt.exists():
        meta = load_checkpoint(ckpt, students, opt)
        start = meta["step"]
        before = {int(k): v for k, v in meta.get("layer_loss_before", {}).items()}
    schedule = lr_lambda(cfg, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s + start))
    if not before:
        before = evaluate_layers(model, adapter, teacher, students, valid, cfg, cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    orders = {}
    t0 = time.perf_counter()
    tokens_done = 0
    step = start
    with deferred_interrupt() as interrupted:
        for step in range(start, total):
            epoch, pos = divmod(step, n_batches)
            if epoch not in orders:
                gen.manual_seed(cfg.seed + epoch)
                orders = {epoch: torch.randperm(train.shape[0], generator=gen)}
            idx = orders[epoch][pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
            ids = train[idx].to(device)
            with torch.no_grad(), installed(model, adapter, teacher), capture_attention_inputs(teacher) as rec:
                model.base_model(input_ids=ids, use_cache=False)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for i, s in students.items():
                step_loss += total_loss(layer_losses(s, *rec[i], cfg, backward=True), cfg)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            tokens_done += ids.numel()
            if progress is not None:
                progress(step + 1, total, step_loss / max(1, len(students)), tokens_done / (time.perf_counter() - t0))
            done = step + 1
            stopping = stop_after is not None and done - start >= stop_after
            if done < total and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stopping
                                 or interrupted()):
                save_checkpoint(ckpt, students, opt, done, {"layer_loss_before": before})
            if interrupted() and done < total:
                raise Interrupted(f"stopped after step {done} of {total}; checkpoint saved")
            if stopping and done < total:
                return TransferResult(done, tokens_done, time.perf_counter() - t0, before, {}, start)
    after = evaluate_layers(model, adapter, teacher, students, valid, cfg, cfg.batch_size)
    for p in params:
        p.requires_grad_(False)
    return TransferResult(total, tokens_done, time.perf_counter() - t0, before, after, start)


def transfer_config_dict(cfg: TransferConfig) -> dict:
    return asdict(cfg)
