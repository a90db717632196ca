"""Throughput sweep for long generations: tokens/s and peak memory against batch size, for a linearized model and
its teacher, until each runs out of memory under a memory cap.

    linearize bench sweep                                  # SmolLM2-135M geometry, random weights, bf16
    linearize bench sweep EXPORT --compare TEACHER --lengths 1024,4096 --memory-limit 80GB --json s.json --plots d/
    linearize bench sweep EXPORT --models linear           # the export alone: no teacher weights load

Rows, per generated length N (prompt P, default 128) and batch B = 1, 2, 4, ... (each model stops at its first
out-of-memory batch, which is recorded):
  * ``teacher``: the softmax model as users run it by default (SDPA, transformers' ``DynamicCache``);
  * ``teacher static+compile``: transformers' fast path, a ``StaticCache`` of P + N positions and the forward
    compiled as ``generate()`` compiles it (``torch.compile(mode="reduce-overhead")``: inductor kernels replayed as
    CUDA graphs), at batches 1, 4, 16, ... (one compilation per batch size);
  * ``linear``: the linearized model (fused kernels; each decode step a CUDA-graph replay, ``models/graphs.py``);
  * ``linear+compile`` (not run unless asked for): the same with ``model.compile_decode = True``, the graph replaying
    inductor's fused kernels around the attention (one compilation per batch size, in the warm-up steps).

How each row is measured, so that a row costs seconds and not a 4,096-token generation:
  * decode time per token is the median of timed steps (each synchronised) after warm-up steps;
  * ``teacher``: its step grows with the context, so it is timed at the start (context P) and at the end
    (context P + N, a cache filled with random keys and values through ``DynamicCache.update``; the work does not
    depend on the values); the mean step over the generation is their average (the step is linear in the
    context: a fixed part plus the KV read); peak memory is the end's (weights + the full KV cache + a step);
  * ``teacher static+compile``: the static cache always spans P + N, so every step costs the same;
  * ``linear``: the state has one size at every context, so every step costs the same; measured after a real
    prefill of P tokens.
  * ``linear`` with softmax layers (an export that kept some, as the recipes' layouts do): their KV cache grows with
    the context, so the step is timed after the prefill and again with every layer moved on to P + N (the softmax
    layers' caches filled with random keys and values, the recurrent layers' positions moved on); the mean is their
    average, as for ``teacher``.
tokens/s = B / mean step. ``--memory-limit`` caps the CUDA allocator (``torch.cuda.set_per_process_memory_fraction``),
so "out of memory" means "does not fit in that much".

Against the teacher's physical limit (``bench/roofline.py``): before any model loads, the run measures what the GPU
copies at (``roofline.measure_copy_bandwidth``: a device-to-device copy of 1 GiB, read + write bytes over time; not
measured on CPU, where nothing is computed from it).
Per generated length N it computes the teacher's roofline: the best any serving engine reading only the filled
positions of a paged KV cache could do, at the largest batch whose cache at P + N and weights fit the memory limit
(the whole GPU without one). Every measured row then carries:
  * ``roofline_tok_per_s`` (and ``roofline_batch``) and ``vs_roofline``, its tokens/s over the roofline's;
  * ``step_GB``: the bytes its decode step moves (``roofline.step_bytes``: for ours the fp32 state read and written,
    the window ring, sinks and global-cache pairs read, the new key written, the weights, and the softmax layers'
    filled KV; for the teacher its KV, all of the static cache's), averaged over the generation's contexts;
    ``GB_per_s``, that over the step time; ``of_copy``, that over the copy bandwidth;
  * ``linear_layers`` / ``softmax_layers``: the layout the row ran.
The JSON holds the rows, the copy bandwidth (``copy_bandwidth``), the rooflines (``rooflines``) and the layout.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from linearize.bench.generate import _random_models, _real_models, _sync, smollm2_geometry
from linearize.bench.roofline import (
    COPY_BYTES,
    decode_weight_bytes,
    measure_copy_bandwidth,
    model_geometry,
    step_bytes,
    teacher_roofline,
)
from linearize.bench.table import check_outputs, check_sources, write_rows
from linearize.models.base import cache_kwarg_of, output_cache
from linearize.models.cache import CacheGeometry, RecurrentStateLayer, cache_nbytes
from linearize.modules.config import DEFAULT_WINDOW

__all__ = ["run_generate_sweep", "plot_sweep"]

MODELS = ("teacher", "teacher static+compile", "linear", "linear+compile")
DEFAULT_MODELS = MODELS[:3]
SWEEP_PLOTS = ("throughput-vs-batch.png", "memory-vs-length.png")
"""The PNGs :func:`plot_sweep` writes into ``--plots``."""


def _steps(call: Callable[[], Any], device: str, warmup: int, timed: int) -> float:
    """Median milliseconds of ``timed`` synchronised calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(timed):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _reset(device: str) -> None:
    gc.collect()  # the previous row's cache must be gone before its memory is given back and the peak reset
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _prefill(model, B: int, P: int, device: str):
    """A prompt of ``P`` random tokens for ``B`` sequences, as generate() prefills it (last position's logits).
    Returns (milliseconds, cache, the next token, the cache keyword of ``model``)."""
    ids = torch.randint(0, model.config.vocab_size, (B, P), device=device)
    _reset(device)
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, output_cache(out), out.logits[:, -1:].argmax(-1), \
        cache_kwarg_of(type(model))


def _kv_geometry(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim


@torch.no_grad()
def _teacher_dynamic(teacher, B: int, P: int, N: int, device: str, warmup: int, timed: int) -> dict:
    from transformers import DynamicCache

    prefill_ms, cache, tok, key = _prefill(teacher, B, P, device)
    start = _steps(lambda: teacher(tok, **{key: cache}, use_cache=True), device, warmup, timed)
    del cache
    _reset(device)
    layers, kv, hd = _kv_geometry(teacher.config)
    dt = next(teacher.parameters()).dtype
    cache = DynamicCache()
    for i in range(layers):  # the cache as it stands after P + N tokens
        cache.update(torch.randn(B, kv, P + N, hd, device=device, dtype=dt),
                     torch.randn(B, kv, P + N, hd, device=device, dtype=dt), i)
    end = _steps(lambda: teacher(tok, **{key: cache}, use_cache=True), device, warmup, timed)
    step = (start + end) / 2
    return {"prefill_ms": prefill_ms, "step_ms": step, "step_start_ms": start, "step_end_ms": end,
            "tok_per_s": B / step * 1e3, "cache_MiB": cache_nbytes(cache) / 2**20, "peak_GiB": _peak(device)}


@torch.no_grad()
def _teacher_static(teacher, B: int, P: int, N: int, device: str, warmup: int, timed: int) -> dict:
    from transformers import StaticCache

    key = cache_kwarg_of(type(teacher))
    _reset(device)
    torch.compiler.reset()  # a fresh compilation per batch size, as a new generate() call would make
    cache = StaticCache(config=teacher.config, max_cache_len=P + N)
    forward = teacher.forward
    tok = torch.randint(0, teacher.config.vocab_size, (B, 1), device=device)
    position = torch.tensor([P], device=device)
    # the same call every step (a fixed cache position): a static cache's step attends all P + N slots, so its
    # cost does not depend on the position
    args = dict(input_ids=tok, position_ids=position.view(1, 1).expand(B, 1), cache_position=position, use_cache=True,
                **{key: cache})
    # one eager call first, as generate()'s prefill is: a StaticCache allocates its tensors at its first update,
    # which inside a CUDA-graph-compiled call would land in the graph's pool and be overwritten by the next replay
    forward(**args)
    if device.startswith("cuda"):  # generate() compiles a static-cache decode on CUDA only; so does this row
        forward = torch.compile(forward, mode="reduce-overhead", fullgraph=False, dynamic=False)
    mark = torch.compiler.cudagraph_mark_step_begin  # each call a new step: its outputs may be overwritten
    # compiled once for this batch size in the warm-up
    step = _steps(lambda: mark() or forward(**args), device, max(warmup, 3), timed)
    return {"step_ms": step, "tok_per_s": B / step * 1e3, "cache_MiB": cache_nbytes(cache) / 2**20,
            "peak_GiB": _peak(device)}


def _advance(cache, cfg, B: int, N: int, dtype: torch.dtype, device: str) -> None:
    """Every layer of a linearized model's cache moved on by ``N`` tokens, as after generating them: recurrent
    layers count them (their state and ring keep one size; the values do not change the work), the others (softmax
    layers) take ``N`` random keys and values through their own ``update``."""
    _, kv, hd = _kv_geometry(cfg)
    for layer in cache.layers:
        if isinstance(layer, RecurrentStateLayer):
            layer.advance(N)
        else:
            layer.update(torch.randn(B, kv, N, hd, device=device, dtype=dtype),
                         torch.randn(B, kv, N, hd, device=device, dtype=dtype))


@torch.no_grad()
def _linear(student, B: int, P: int, N: int, device: str, warmup: int, timed: int, *,
            compiled: bool = False) -> dict:
    student.compile_decode = compiled
    if compiled:  # a fresh compilation per batch size: past dynamo's 8 per function, the step would run uncompiled
        torch.compiler.reset()
    prefill_ms, cache, tok, key = _prefill(student, B, P, device)
    step = _steps(lambda: student(tok, **{key: cache}, use_cache=True), device, warmup, timed)
    row = {"prefill_ms": prefill_ms, "step_ms": step}
    if not all(isinstance(layer, RecurrentStateLayer) for layer in cache.layers):  # softmax layers: step grows
        # to P + N, as the teacher's end (the start's steps already added warmup + timed tokens)
        _advance(cache, student.config, B, max(N - warmup - timed, 0), next(student.parameters()).dtype, device)
        end = _steps(lambda: student(tok, **{key: cache}, use_cache=True), device, warmup, timed)
        row.update(step_ms=(step + end) / 2, step_start_ms=step, step_end_ms=end)
    row.update(tok_per_s=B / row["step_ms"] * 1e3, cache_MiB=cache_nbytes(cache) / 2**20, peak_GiB=_peak(device))
    if compiled and student._compiled_decode().failed:
        row["note"] = "compilation failed (see the warning): ran uncompiled"
    return row


def _batches(max_batch: int, factor: int) -> list[int]:
    out, b = [], 1
    while b <= max_batch:
        out.append(b)
        b *= factor
    return out


@dataclass(frozen=True)
class _Layout:
    """What the rows' byte counts and the roofline need of the two models."""

    geometry: CacheGeometry
    softmax_layers: tuple[int, ...]
    weight_bytes: int
    """Weights a step of the linearized model reads (its feature maps' included)."""
    teacher_weight_bytes: int
    feature_map: str
    state_update: str

    @property
    def n_softmax(self) -> int:
        return len(self.softmax_layers)

    def as_dict(self) -> dict:
        g = self.geometry
        return {"layers": g.n_layers, "linear_layers": g.n_layers - self.n_softmax,
                "softmax_layers": list(self.softmax_layers), "window": g.window, "sinks": g.sinks,
                "global_cache": g.global_cache, "feature_map": self.feature_map, "state_update": self.state_update,
                "teacher_kv_bytes_per_token": g.teacher_bytes(1), "weight_bytes": self.weight_bytes,
                "teacher_weight_bytes": self.teacher_weight_bytes, "geometry": asdict(g)}


def _layout(student, teacher, dt: torch.dtype) -> _Layout:
    """The rows' layout; without a ``teacher`` (a sweep of the linearized rows only) its weights are the student's
    less what linearization added (the feature maps and mix factors): the same q/k/v/o, MLPs, norms and head."""
    from linearize.models.delta import added_parameters

    g, _ = model_geometry(student, torch.empty((), dtype=dt).element_size())
    lin = student.linear_config
    weights = decode_weight_bytes(student)
    if teacher is not None:
        teacher_weights = decode_weight_bytes(teacher)
    else:
        teacher_weights = weights - sum(t.numel() * t.element_size() for t in added_parameters(student).values())
    return _Layout(geometry=g, softmax_layers=tuple(sorted(i for i in lin.softmax_layers if i < g.n_layers)),
                   weight_bytes=weights, teacher_weight_bytes=teacher_weights,
                   feature_map=lin.feature_map, state_update=lin.state_update)


def _copy_bandwidth(given: float | None, device: str) -> dict:
    """``{"bytes_per_s", "how"}``: ``given``, else measured on CUDA (:func:`measure_copy_bandwidth`), else None."""
    if given is not None:
        return {"bytes_per_s": float(given), "how": "given"}
    measured = measure_copy_bandwidth(device)
    if measured is None:
        return {"bytes_per_s": None, "how": f"not measured ({device})"}
    return {"bytes_per_s": measured, "how": f"measured: device-to-device copy_ of {COPY_BYTES / 2**30:g} GiB, "
                                            "read + write bytes over time, median of 5"}


def _roofline(layout: _Layout, prompt: int, N: int, memory: int | None, bandwidth: float | None):
    if memory is None:
        return None
    return teacher_roofline(layout.geometry.teacher_bytes, weight_bytes=layout.teacher_weight_bytes, prompt=prompt,
                            new_tokens=N, memory=memory, bandwidth=bandwidth)


def _against_roofline(row: dict, layout: _Layout, roof, bandwidth: float | None) -> dict:
    """The roofline and byte-count columns of a measured row (module docstring); nothing for a row that did not
    run."""
    if not row.get("tok_per_s"):
        return {}
    name, g = row["model"], layout.geometry
    teacher = name.startswith("teacher")
    out: dict = {"linear_layers": 0 if teacher else g.n_layers - layout.n_softmax,
                 "softmax_layers": g.n_layers if teacher else layout.n_softmax}
    if roof is not None:
        out["roofline_batch"] = roof.batch
        if roof.tok_per_s:
            out["roofline_tok_per_s"] = roof.tok_per_s
            out["vs_roofline"] = row["tok_per_s"] / roof.tok_per_s
    moved = step_bytes(name, g, layout.n_softmax, weight_bytes=layout.teacher_weight_bytes if teacher
                       else layout.weight_bytes, batch=row["batch"], prompt=row["prompt"], new_tokens=row["new_tokens"],
                       cache_bytes=round(row["cache_MiB"] * 2**20) if "cache_MiB" in row else None)
    out["step_GB"] = moved / 1e9
    out["GB_per_s"] = moved / (row["step_ms"] / 1e3) / 1e9
    if bandwidth:
        out["of_copy"] = out["GB_per_s"] * 1e9 / bandwidth
    return out


def _fmt_bandwidth(copy: dict) -> str:
    b = copy["bytes_per_s"]
    return copy["how"] if b is None else f"{b / 1e12:.3f} TB/s ({copy['how']})"


def _fmt_layout(layout: _Layout) -> str:
    g = layout.geometry
    soft = f" + {layout.n_softmax} softmax {list(layout.softmax_layers)}" if layout.n_softmax else ""
    return (f"{g.n_layers - layout.n_softmax} linear{soft} of {g.n_layers} layers, window {g.window}"
            + (f" + {g.sinks} sinks" if g.sinks else "")
            + (f" + a global cache of {g.global_cache} pairs" if g.global_cache else "") + f", {layout.feature_map}")


def _fmt_roofline(roof) -> str:
    if roof is None:
        return "teacher roofline: not computed (no memory limit known on this device: pass one)"
    head = f"teacher roofline, {roof.new_tokens} new tokens after {roof.prompt}: "
    if not roof.batch:
        return head + f"no batch fits {roof.memory_bytes / 1e9:.1f} GB"
    fit = (f"batch {roof.batch:,} (KV {roof.kv_bytes_per_sequence / 1e6:.1f} MB per sequence + weights "
           f"{roof.weight_bytes / 1e9:.3f} GB in {roof.memory_bytes / 1e9:.1f} GB)")
    if roof.tok_per_s is None:
        return head + fit + "; tokens/s not computed (copy bandwidth not measured)"
    return head + f"{roof.tok_per_s:,.0f} tok/s at " + fit


def run_generate_sweep(
    *,
    model: str | None = None,
    compare: str | None = None,
    prompt: int = 128,
    lengths: tuple[int, ...] = (1024, 4096),
    max_batch: int = 16384,
    memory_limit: int | None = None,
    window: int = DEFAULT_WINDOW,
    sinks: int | None = None,
    feature_map: str = "hedgehog",
    dtype: str = "bfloat16",
    device: str = "cuda",
    config=None,
    models: tuple[str, ...] = DEFAULT_MODELS,
    warmup: int = 3,
    timed: int = 10,
    json_path: str | Path | None = None,
    plots: str | Path | None = None,
    overwrite: bool = False,
    bandwidth: float | None = None,
) -> list[dict]:
    """Run the sweep (module docstring) and print a table; returns the rows.

    Args:
        model / compare: a real linearized export and its teacher (default: SmolLM2-135M geometry with random
            weights, ``window``, ``sinks`` and ``feature_map``; a real export brings its own).
        lengths: generated lengths N; max_batch: the largest batch tried.
        memory_limit: bytes the CUDA allocator may use (None: the whole GPU).
        models: which of :data:`MODELS` to run (default :data:`DEFAULT_MODELS`, all but ``linear+compile``).
        json_path: also write the rows as JSON, marked as linearize's.
        plots: a folder for ``throughput-vs-batch.png`` and ``memory-vs-length.png`` (written after the JSON).
        overwrite: replace those files when an earlier linearize run wrote them (never a file linearize did not
            write; all checked, and matplotlib for plots, before any model loads).
        bandwidth: bytes per second to compute the roofline and ``of_copy`` with instead of measuring it (e.g. a
            datasheet's; recorded as given). None: measured on CUDA, not measured (and nothing computed from it)
            on CPU.

    Raises:
        LinearizeError: an output cannot be written; ``model`` or ``compare`` does not load.
        ValueError: an unknown name in ``models``.
    """
    from linearize.bench.table import print_table

    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown sweep models {sorted(unknown)}; choose from {MODELS}")
    check_outputs(json_path, overwrite=overwrite, plots=plots, plot_names=SWEEP_PLOTS)
    check_sources(model, compare)
    dt = getattr(torch, dtype)
    memory = memory_limit
    if device.startswith("cuda"):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        total = torch.cuda.get_device_properties(index).total_memory
        memory = min(memory_limit, total) if memory_limit else total
        if memory_limit:
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit / total), index)
    copy = _copy_bandwidth(bandwidth, device)  # before any model loads: the GPU to itself
    if model is not None:  # the teacher loads only for its own rows (or when named): the roofline needs its shapes
        teacher, student = _real_models(model, compare, dt, device,
                                        teacher=any(name.startswith("teacher") for name in models))
    else:
        cfg = config or smollm2_geometry()
        teacher, student = _random_models(cfg, window, feature_map, dt, device, sinks=sinks)
    if {"linear", "linear+compile"} & set(models) and device.startswith("cuda"):
        student.set_backend("triton")
    layout = _layout(student, teacher, dt)
    rooflines = {N: _roofline(layout, prompt, N, memory, copy["bytes_per_s"]) for N in lengths}
    rows: list[dict] = []
    cols = ["model", "new_tokens", "batch", "step_ms", "tok_per_s", "roofline_tok_per_s", "vs_roofline", "step_GB",
            "GB_per_s", "of_copy", "cache_MiB", "peak_GiB", "note"]
    print(f"copy bandwidth: {_fmt_bandwidth(copy)}; {_fmt_layout(layout)}", flush=True)
    for N in lengths:
        print(_fmt_roofline(rooflines[N]), flush=True)
    print(" | ".join(cols), flush=True)
    for N in lengths:
        for name in models:
            factor = 4 if name == "teacher static+compile" else 2
            for B in _batches(max_batch, factor):
                row: dict = {"model": name, "prompt": prompt, "new_tokens": N, "batch": B}
                try:
                    if name == "teacher":
                        row.update(_teacher_dynamic(teacher, B, prompt, N, device, warmup, timed))
                    elif name == "teacher static+compile":
                        row.update(_teacher_static(teacher, B, prompt, N, device, warmup, timed))
                    elif name == "linear+compile":
                        row.update(_linear(student, B, prompt, N, device, warmup, timed, compiled=True))
                    else:
                        row.update(_linear(student, B, prompt, N, device, warmup, timed))
                except torch.OutOfMemoryError:
                    row["note"] = "out of memory"
                except RuntimeError as e:  # compile-time allocation failures surface as RuntimeError
                    if "out of memory" not in str(e).lower():
                        raise
                    row["note"] = "out of memory"
                row.update(_against_roofline(row, layout, rooflines[N], copy["bytes_per_s"]))
                rows.append(row)
                print(" | ".join(str(row.get(c, "-")) for c in cols), flush=True)
                _reset(device)
                if row.get("note") == "out of memory":
                    break
    what = model or "random weights"
    print_table(f"generation sweep ({what}, {dtype}, prompt {prompt}; {_fmt_layout(layout)})", cols, rows,
                notes=[f"copy bandwidth {_fmt_bandwidth(copy)}"] + [_fmt_roofline(rooflines[N]) for N in lengths])
    best = summarize(rows)
    for line in best:
        print(line)
    write_rows(json_path, rows, copy_bandwidth=copy, layout=layout.as_dict(),
               rooflines=[r.as_dict() for r in rooflines.values() if r is not None])
    if plots is not None:
        plot_sweep(rows, plots)
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """One line per (model, length): best tokens/s, at which batch (with its ratio to the teacher's roofline where
    the row has one), and the first batch that did not fit."""
    out = []
    keys = sorted({(r["model"], r["new_tokens"]) for r in rows}, key=lambda k: (k[1], MODELS.index(k[0])))
    for name, N in keys:
        mine = [r for r in rows if r["model"] == name and r["new_tokens"] == N]
        ok = [r for r in mine if (r.get("tok_per_s") or 0) > 0]
        oom = [r["batch"] for r in mine if r.get("note") == "out of memory"]
        if ok:
            b = max(ok, key=lambda r: r["tok_per_s"])
            roof = f", {b['vs_roofline']:.2f}x the teacher's roofline" if b.get("vs_roofline") else ""
            out.append(f"{name}, {N} new tokens: best {b['tok_per_s']:,.0f} tok/s at batch {b['batch']} "
                       f"(peak {b.get('peak_GiB') or 0:.1f} GiB{roof}); "
                       + (f"out of memory at batch {oom[0]}" if oom else "fits at every batch tried"))
    return out


def plot_sweep(rows: list[dict], folder: str | Path) -> list[Path]:
    """``throughput-vs-batch.png`` (tokens/s against batch, one line per model and length; the teacher's roofline
    per length, where the rows carry it, as a gray line at its tokens/s with a black marker at its batch) and
    ``memory-vs-length.png`` (peak GiB against generated tokens at the largest batch every model fits)."""
    from linearize.eval.plots import _figure, _log2_axis, _save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig, (ax,) = _figure()
    lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if (r.get("tok_per_s") or 0) > 0:
            lines.setdefault((r["model"], r["new_tokens"]), []).append((r["batch"], r["tok_per_s"]))
    for (name, N), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [t for _, t in pts], "o-", label=f"{name}, {N} new tokens")
    roofs = {r["new_tokens"]: (r["roofline_batch"], r["roofline_tok_per_s"]) for r in rows
             if r.get("roofline_tok_per_s") and r.get("roofline_batch")}
    for i, (N, (b, t)) in enumerate(sorted(roofs.items())):
        ax.axhline(t, linestyle=("--", ":", "-.")[i % 3], linewidth=1, color="gray")
        ax.plot([b], [t], ("*", "P", "X")[i % 3], markersize=11, color="black",
                label=f"teacher roofline, {N} new tokens: {t:,.0f} tok/s at batch {b:,}")
    _log2_axis(ax, [b for pts in lines.values() for b, _ in pts] or [1])  # the stars' batches are in the legend
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens / s")
    ax.set_title("throughput vs batch (prompt + N generated tokens)")
    ax.legend(fontsize=7)
    paths = [_save(fig, folder / SWEEP_PLOTS[0])]

    fitted = [{r["batch"] for r in rows if r["model"] == m and r.get("peak_GiB")} for m in MODELS]
    common = set.intersection(*[s for s in fitted if s]) if any(fitted) else set()
    fig, (ax,) = _figure()
    if common:
        B = max(common)
        for name in MODELS:
            pts = sorted((r["new_tokens"], r["peak_GiB"]) for r in rows
                         if r["model"] == name and r["batch"] == B and r.get("peak_GiB"))
            if pts:
                ax.plot([n for n, _ in pts], [g for _, g in pts], "o-", label=name)
        ax.set_title(f"peak memory vs generated tokens (batch {B})")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("peak GiB")
    if ax.get_lines():
        ax.legend(fontsize=7)
    paths.append(_save(fig, folder / SWEEP_PLOTS[1]))
    return paths
