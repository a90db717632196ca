"""Which layers stay exact softmax: KL-guided scores and a cache budget (``auto_softmax_layers`` / ``state_budget``);
and which linear layers read their exact part alone (``auto_window_only``, last section).

Scores (the KL-guided layer selection of Li, Yang et al., ICLR 2026): after attention transfer, with every candidate
layer linear, measure the model's next-token KL(teacher || student) on the held-out calibration sequences; then,
for each candidate ``i``, make only layer ``i`` exact softmax again (``HybridLinearAttention.exact_softmax``: the
same q, k, v, no module swap) and measure again. ``score_i = KL_all_linear - KL_with_i_softmax``: how much KL the
model gets back when layer ``i`` keeps softmax (bigger = more sensitive). The ``K`` highest scores are kept.

Budget: one sequence's generation cache at ``L`` tokens is, per linear layer, the constant recurrent state + window
ring + sink keys (:func:`~linearize.models.cache.cache_bytes_per_sequence`) and, per softmax layer, its KV cache
``2 * n_kv_heads * head_dim * L * dtype_bytes``. :func:`count_for_budget` gives the largest ``K`` whose cache fits.

Everything but :func:`score_layers` (which runs the model) is arithmetic on plain values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from linearize.convert.config import ConvertConfig
from linearize.convert.transfer import installed
from linearize.errors import ConfigError
from linearize.metrics import TeacherLogits, compare_to_teacher
from linearize.models.cache import CacheGeometry
from linearize.modules.attention import exact_softmax, linear_part_off
from linearize.run.progress import Progress, QuietProgress
from linearize.settings import format_bytes

Record = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]]
"""``record(name, build)``: a JSON artefact built once (:meth:`~linearize.run.loop.WorkFolder.record`)."""


# ---------------------------------------------------------------------------------------------------------------
# Cache bytes
# ---------------------------------------------------------------------------------------------------------------
def count_for_budget(geometry: CacheGeometry, budget: int, context: int, *, fixed: int, candidates: int) -> int:
    """The largest number ``K <= candidates`` of extra softmax layers (on top of ``fixed`` explicit ones) whose cache
    per sequence at ``context`` tokens fits ``budget`` bytes: total <= budget, and ``K + 1`` would exceed it (or no
    candidate is left).

    Raises:
        ConfigError: the budget is below the cache with no extra softmax layer (the message states that minimum).
    """
    base = geometry.bytes_per_sequence(fixed, context)
    if budget < base:
        explicit = f" and the {fixed} softmax_layers" if fixed else ""
        raise ConfigError(
            f"state_budget={budget:,} B is below the smallest possible cache: {base:,} B ({format_bytes(base)}) per "
            f"sequence at budget_context={context} with every other layer linear{explicit}; give at least {base:,} B")
    step = geometry.softmax_layer_bytes(context) - geometry.linear_layer_bytes()
    if step <= 0:  # at this context a softmax layer costs no more than a linear one
        return candidates
    return min(candidates, (budget - base) // step)


def budget_bytes(cfg: ConvertConfig, geometry: CacheGeometry) -> int | None:
    """``state_budget`` in bytes: as given, or its share ("25%") of the teacher's KV cache at ``budget_context``."""
    b = cfg.state_budget
    if isinstance(b, str):
        return int(geometry.teacher_bytes(cfg.budget_context) * float(b[:-1]) / 100)
    return b


def extra_softmax_count(cfg: ConvertConfig, geometry: CacheGeometry) -> int | None:
    """How many layers beyond ``cfg.softmax_layers`` stay softmax: ``auto_softmax_layers``, or the count that
    ``state_budget`` allows at ``budget_context``; None when neither is set. Checked before any heavy work.

    Raises:
        ConfigError: the budget is below the minimum, or the count would leave no layer linear.
    """
    fixed = len(cfg.softmax_layers)
    candidates = geometry.n_layers - fixed
    if cfg.auto_softmax_layers is not None:
        if cfg.auto_softmax_layers >= candidates:
            raise ConfigError(
                f"auto_softmax_layers={cfg.auto_softmax_layers} leaves no linear layer: the model has "
                f"{geometry.n_layers} layers, {fixed} of them in softmax_layers; use at most {max(candidates - 1, 0)}")
        return cfg.auto_softmax_layers
    budget = budget_bytes(cfg, geometry)
    if budget is None:
        return None
    context = cfg.budget_context
    k = count_for_budget(geometry, budget, context, fixed=fixed, candidates=candidates)
    if k >= candidates:
        softmax, linear = geometry.softmax_layer_bytes(context), geometry.linear_layer_bytes()
        if softmax <= linear:
            raise ConfigError(
                f"at budget_context={context} a softmax layer's KV cache ({softmax:,} B) is no larger than a linear "
                f"layer's cache ({linear:,} B): nothing to save; raise budget_context")
        raise ConfigError(
            f"state_budget={budget:,} B holds the teacher's whole KV cache at budget_context={context} "
            f"({geometry.teacher_bytes(context):,} B): no layer would be linear; give less than that")
    return k


def choose_layers(scores: dict[int, float], k: int) -> list[int]:
    """The ``k`` layers with the highest scores (ties: the lower index), sorted."""
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------
def recall_blocks_needed(length: int, block: int) -> int:
    """Held-out blocks of ``block`` tokens that recall probes of ``length`` tokens need (:func:`copy_sequences`):
    one for the copied span, and the blocks its filler spans (none beyond the block itself when ``length`` is the
    block's)."""
    if length == block:
        return 2  # the filler is another block's middle
    m = max(1, block // 8)
    return -(-(length - 2 * m) // block) + 1


def copy_sequences(blocks: Tensor, length: int | None = None) -> tuple[Tensor, tuple[int, int]]:
    """Recall probes from held-out blocks [N, L]: each block's first ``m = L // 8`` tokens, then ``length - 2m``
    tokens of other blocks, then the same ``m`` tokens again. Returns (sequences [N, length], the second copy's
    span): predicting it well means copying from ``length - m`` tokens back, far beyond a sliding window.

    ``length`` (default ``L``): with ``L``, the filler is the previous block's middle; longer probes take the filler
    from the next blocks in order, from their starts (block ``i``'s probe: blocks ``i + 1, i + 2, ...``, cyclically),
    which needs more blocks than the filler spans so that the copied head appears only twice."""
    N, L = blocks.shape
    length = L if length is None else int(length)
    m = max(1, L // 8)
    if L < 3 * m or L < 3 or length < 3 * m:
        raise ConfigError(f"recall scoring needs sequences of at least 3 tokens with room for two copies, got {L}"
                          + (f" (probes of {length})" if length != L else ""))
    head = blocks[:, :m]
    if length == L:
        filler = blocks.roll(1, dims=0)[:, m : L - m]  # another document between the copies
    else:
        need = recall_blocks_needed(length, L) - 1  # whole blocks the filler takes
        if N < need + 1:
            raise ConfigError(f"recall probes of {length} tokens join {need} held-out blocks of {L} after each copied "
                              f"span, but there are only {N} blocks: raise val_tokens to at least {(need + 1) * L} or "
                              "shorten recall_context")
        chain = torch.cat([blocks.roll(-j, dims=0) for j in range(1, need + 1)], dim=1)  # blocks i+1, i+2, ...
        filler = chain[:, : length - 2 * m]
    return torch.cat([head, filler, head], dim=1), (length - m, length)


SCORE_KINDS = {"kl": ["kl"], "recall": ["recall"], "both": ["kl", "recall"]}
"""The held-out measurements each ``selection_score`` takes: next-token KL, KL on copy spans, or both."""


def _held_out_kl(model: nn.Module, adapter, teacher: dict[int, nn.Module], student_ctx, valid: Tensor,
                 probes: tuple[Tensor, tuple[int, int]] | None, batch_size: int, kind: str,
                 teacher_logits: dict[str, TeacherLogits] | None = None) -> float:
    """KL(teacher || the model under ``student_ctx()``) per token: on the held-out blocks ``valid`` (``kl``), or
    on the second copies of ``probes = copy_sequences(valid)`` (``recall``). ``teacher_logits``: one
    :class:`TeacherLogits` per kind, reused by every measurement of one selection (the teacher runs once)."""
    blocks, span = probes if kind == "recall" else (valid, None)
    kept = None if teacher_logits is None else teacher_logits.setdefault(kind, TeacherLogits())
    return compare_to_teacher(model, lambda: installed(model, adapter, teacher), student_ctx, blocks, batch_size,
                              span=span, teacher_logits=kept)["kl"]


def score_layers(
    model: nn.Module, adapter, teacher: dict[int, nn.Module], students: dict[int, nn.Module], valid: Tensor,
    batch_size: int, *, kl_all_linear: float | None = None, progress: Progress | None = None,
    record: Record | None = None, score: str = "kl", candidates: list[int] | None = None,
    recall_context: int | None = None,
) -> dict[str, Any]:
    """Sensitivity of every student layer (see the module docstring), on the held-out blocks ``valid`` [N, L].

    Args:
        teacher / students: layer index -> softmax attention module / trained linear attention module; every
            student is a candidate.
        kl_all_linear: the KL with every student installed, when already measured on ``valid`` (else measured).
        record: keeps each layer's measurement (a resumed run skips the layers it already measured).
        score: ``kl`` | ``recall`` | ``both`` (``ConvertConfig.selection_score``).
        candidates: the layers scored (default: every student; window-only layers are left out by the caller).
        recall_context: the recall probes' length (``ConvertConfig.recall_context``; None = the blocks').

    Returns:
        ``{"kl_all_linear", "kl_with_softmax": {layer: KL}, "scores": {layer: score}}``, and with recall
        ``"recall_all_linear"``, ``"recall_with_softmax"`` (the KL on the copy span of :func:`copy_sequences`).
    """
    progress = progress or QuietProgress()
    record = record or (lambda name, build: build())
    probes = copy_sequences(valid, recall_context) if score != "kl" else None
    teacher_logits: dict[str, TeacherLogits] = {}

    def kl(softmax: int | None, recall: bool) -> float:
        with exact_softmax([students[softmax].linear_attn] if softmax is not None else []):
            return _held_out_kl(model, adapter, teacher, lambda: installed(model, adapter, students), valid, probes,
                                batch_size, "recall" if recall else "kl", teacher_logits)

    out: dict[str, Any] = {}
    layers = sorted(students if candidates is None else candidates)
    kinds = SCORE_KINDS[score]
    for kind in kinds:
        recall = kind == "recall"
        base = kl_all_linear if kind == "kl" else None
        if base is None:
            base = record(f"{kind}-all-linear", lambda recall=recall: {"kl": kl(None, recall)})["kl"]
        with_softmax: dict[int, float] = {}
        what = "KL" if kind == "kl" else "KL on copied spans"
        with progress.task(f"scoring layers ({what} with one layer softmax)", len(layers), "layers") as task:
            for n, i in enumerate(layers, 1):
                with_softmax[i] = record(f"{kind}-softmax-layer-{i}", lambda i=i, recall=recall: {"kl": kl(i, recall)})["kl"]
                task.update(n, f"layer {i}: {base - with_softmax[i]:+.4g}")
        out[f"{kind}_all_linear"], out[f"{kind}_with_softmax"] = base, with_softmax
    if score == "both":  # each as the share of its all-linear KL that the layer gives back
        out["scores"] = {i: sum((out[f"{k}_all_linear"] - out[f"{k}_with_softmax"][i]) / max(out[f"{k}_all_linear"],
                                                                                           1e-12) for k in kinds)
                         for i in layers}
    else:
        out["scores"] = {i: out[f"{score}_all_linear"] - v for i, v in out[f"{score}_with_softmax"].items()}
    out.setdefault("kl_all_linear", kl_all_linear)
    out.setdefault("kl_with_softmax", {})
    return out


def select_layers(
    cfg: ConvertConfig, geometry: CacheGeometry, count: int, model: nn.Module, adapter,
    teacher: dict[int, nn.Module], students: dict[int, nn.Module], valid: Tensor, batch_size: int, *,
    kl_all_linear: float | None = None, progress: Progress | None = None, record: Record | None = None,
    candidates: list[int] | None = None,
) -> dict[str, Any]:
    """Score the trained ``students`` (or ``candidates`` among them) and choose the ``count`` most sensitive (``count`` from
    :func:`extra_softmax_count`). Returns the report's ``selection`` section (JSON-able; layer keys as text)."""
    progress = progress or QuietProgress()
    scored = {"kl_all_linear": kl_all_linear, "kl_with_softmax": {}, "scores": {}}
    if count > 0:
        scored = score_layers(model, adapter, teacher, students, valid, batch_size, kl_all_linear=kl_all_linear,
                              progress=progress, record=record, score=cfg.selection_score, candidates=candidates,
                              recall_context=cfg.recall_context)
    chosen = choose_layers(scored["scores"], count)
    softmax = sorted(set(cfg.softmax_layers) | set(chosen))
    context = cfg.budget_context
    per_sequence = geometry.bytes_per_sequence(len(softmax), context)
    teacher_bytes = geometry.teacher_bytes(context)
    if count > 0:
        progress.log(f"softmax layers chosen: {chosen} (scores "
                     + ", ".join(f"{i}: {scored['scores'][i]:.4g}" for i in sorted(scored["scores"])) + ")")
    progress.log(f"cache per sequence at {context:,} tokens: {format_bytes(per_sequence)} with softmax layers "
                 f"{softmax} (teacher KV cache {format_bytes(teacher_bytes)})")
    return {
        "mode": "state_budget" if cfg.state_budget is not None else "auto_softmax_layers",
        "count": count,
        "explicit_softmax_layers": list(cfg.softmax_layers),
        "chosen": chosen,
        "softmax_layers": softmax,
        "kl_all_linear": scored["kl_all_linear"],
        "kl_with_softmax": {str(i): v for i, v in scored["kl_with_softmax"].items()},
        "scores": {str(i): v for i, v in scored["scores"].items()},
        "score": cfg.selection_score,
        **({"recall_all_linear": scored["recall_all_linear"],
            "recall_with_softmax": {str(i): v for i, v in scored["recall_with_softmax"].items()},
            "recall_probe_tokens": cfg.recall_context or int(valid.shape[1])}
           if "recall_all_linear" in scored else {}),
        "state_budget": budget_bytes(cfg, geometry),
        **({"state_budget_share": cfg.state_budget} if isinstance(cfg.state_budget, str) else {}),
        "budget_context": context,
        "bytes_per_sequence": per_sequence,
        "teacher_kv_bytes": teacher_bytes,
    }


# ---------------------------------------------------------------------------------------------------------------
# Window-only layers
# ---------------------------------------------------------------------------------------------------------------
def greedy_window_only(objective: Callable[[frozenset[int]], float], candidates: list[int],
                       progress: Progress | None = None) -> dict[str, Any]:
    """Which ``candidates`` lose their linear part: ``objective(off)`` is the held-out score (lower is better) with
    the linear part off in the layers ``off``. Each candidate is measured alone; those that lower the score alone
    are tried in that order (best first, ties: the lower index), and each is kept when, added to the ones kept so
    far, it lowers the score further. ``len(candidates) + 1`` to ``2 * len(candidates)`` measurements.

    Returns ``{"base", "alone": {layer: score}, "chosen": [...], "score"}`` (``score``: the chosen set's)."""
    progress = progress or QuietProgress()
    base = objective(frozenset())
    alone: dict[int, float] = {}
    with progress.task("scoring layers (held-out score with one layer's linear part off)", len(candidates),
                       "layers") as task:
        for n, i in enumerate(candidates, 1):
            alone[i] = objective(frozenset({i}))
            task.update(n, f"layer {i}: {base - alone[i]:+.4g}")
    order = sorted((i for i in candidates if alone[i] < base), key=lambda i: (alone[i], i))
    chosen: list[int] = []
    best = base
    with progress.task("choosing window-only layers", len(order), "layers") as task:
        for n, i in enumerate(order, 1):
            value = objective(frozenset([*chosen, i])) if chosen else alone[i]
            if value < best:
                chosen.append(i)
                best = value
            task.update(n, f"{len(chosen)} chosen, score {best:.4g}")
    return {"base": base, "alone": alone, "chosen": sorted(chosen), "score": best}


def select_window_only(
    cfg: ConvertConfig, model: nn.Module, adapter, teacher: dict[int, nn.Module], students: dict[int, nn.Module],
    valid: Tensor, batch_size: int, *, progress: Progress | None = None, record: Record | None = None,
) -> dict[str, Any]:
    """``auto_window_only``: :func:`greedy_window_only` over the trained ``students`` not already window-only, on
    the held-out blocks ``valid`` with ``cfg.selection_score`` (kl: next-token KL; recall: KL on the copy spans of
    :func:`copy_sequences`; both: the two, each relative to its value with no layer switched, summed). Each
    measurement is kept by ``record`` (a resumed run skips it). Returns the report's ``window_only`` section."""
    record = record or (lambda name, build: build())
    kinds = SCORE_KINDS[cfg.selection_score]
    probes = copy_sequences(valid, cfg.recall_context) if cfg.selection_score != "kl" else None
    teacher_logits: dict[str, TeacherLogits] = {}

    @contextmanager
    def switched(off: frozenset[int]) -> Iterator[None]:
        with installed(model, adapter, students), linear_part_off(students[i].linear_attn for i in sorted(off)):
            yield

    def kl(off: frozenset[int], kind: str) -> float:
        name = f"window-only-{kind}-" + ("-".join(map(str, sorted(off))) or "none")
        return record(name, lambda: {"kl": _held_out_kl(model, adapter, teacher, lambda: switched(off), valid,
                                                         probes, batch_size, kind, teacher_logits)})["kl"]

    base = {kind: kl(frozenset(), kind) for kind in kinds}

    def objective(off: frozenset[int]) -> float:
        if len(kinds) == 1:
            return kl(off, kinds[0])
        return sum(kl(off, kind) / max(base[kind], 1e-12) for kind in kinds)

    already = [i for i in students if students[i].linear_attn.linear_off]
    candidates = sorted(i for i in students if i not in already)
    out = greedy_window_only(objective, candidates, progress)
    window_only = sorted(set(already) | set(out["chosen"]))
    (progress or QuietProgress()).log(
        f"window-only layers chosen: {out['chosen']} ({cfg.selection_score} score {out['base']:.4g} -> "
        f"{out['score']:.4g}); linear part off in {window_only}")
    return {"score_kind": cfg.selection_score, "explicit": already, "chosen": out["chosen"],
            **({"recall_probe_tokens": int(probes[0].shape[1])} if probes is not None else {}),
            "window_only_layers": window_only, "base": out["base"], "score": out["score"],
            "alone": {str(i): v for i, v in out["alone"].items()}, "base_parts": base}


__all__ = ["budget_bytes", "choose_layers", "copy_sequences", "count_for_budget", "extra_softmax_count",
           "greedy_window_only", "recall_blocks_needed", "score_layers", "select_layers", "select_window_only"]
