"""Feature-map benchmark: fused Triton Hedgehog / Taylor kernels against the eager PyTorch reference (and
``torch.compile`` of it), forward and forward + backward.

    python -c 'from linearize.bench.feature_maps import run_feature_map_bench; run_feature_map_bench(quick=True)'
    python -c 'from linearize.bench.feature_maps import run_feature_map_bench as r; r(json_path="fmaps.json")'

Grid (default): Hedgehog with p = d and Taylor with r = 16, B * h in {32, 256} (h = 16 heads), T in {1k, 4k, 16k},
d in {64, 128}, every tensor bf16 (activations and parameters). ``shapes=[(B, h, T, d), ...]`` overrides it; with
``device="cpu"`` under ``TRITON_INTERPRET=1`` the same code runs in the Triton interpreter (a smoke test: CPU times
mean nothing).

Timing: ``triton.testing.do_bench`` medians on CUDA (it flushes L2 between calls); forward calls run under
``torch.no_grad()``; ``*_fb_ms`` is one forward + ``backward(dphi)`` with the input gradients reset between calls.
``tri_bwd_ms = tri_fb_ms - tri_fwd_ms``. Bytes (what the fused kernels must move, per call, e = 2 bytes):
  * forward: read x (B h T d e), W (h d p e) and b (h p e, Hedgehog), write phi (B h T F e);
  * backward: read x, W, (b), dphi (B h T F e); write dx (B h T d e), dW (h d p e) (and db). The fp32 dW partials
    (one ``d x p`` per program, written and summed back: ``bwd_partial_MB``) are extra traffic, not counted.
FLOPs (matmuls only): forward 2 B h T d p, backward 6 B h T d p (recomputed y, dx, dW).
``err_fwd`` / ``err_dx``: relative error of the bf16 Triton result against the fp32 reference on the same
bf16-rounded inputs (batch 0 only). Every measurement catches OOM and other failures and notes them in the row.
Only needs torch + triton (rich for the table, optional).
"""

from __future__ import annotations

import os
import time

import torch

from linearize.bench.table import check_outputs, write_rows
from linearize.bench.table import fmt as _fmt
from linearize.bench.table import print_table as _print_table

__all__ = ["run_feature_map_bench"]

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _timer(device: str):
    """ms per call: ``do_bench`` median on CUDA; on CPU the median of 3 wall-clock calls after one warmup."""
    if device.startswith("cuda"):
        import triton.testing

        def cuda_ms(fn, grad_to_none=None):
            return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")

        return cuda_ms

    def cpu_ms(fn, grad_to_none=None):
        ts = []
        for i in range(4):
            for x in grad_to_none or ():
                x.grad = None
            t0 = time.perf_counter()
            fn()
            if i:
                ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]

    return cpu_ms


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _note(row: dict, text: str) -> None:
    row["note"] = f"{row['note']}; {text}" if row.get("note") else text


def _attempt(row: dict, label: str, thunk, device: str):
    """Run ``thunk``; on OOM or any other failure note it in ``row`` and return None (the row goes on)."""
    try:
        return thunk()
    except _OOM:
        _note(row, f"{label}: OOM")
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
        _note(row, f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return None


def _bytes(kind, B, h, T, d, p, F, e=2):
    rows = B * h * T
    params = h * d * p + (h * p if kind == "hedgehog" else 0)
    fwd = (rows * d + params + rows * F) * e
    bwd = (rows * d + params + rows * F + rows * d + params) * e
    return fwd, bwd


def _partial_mb(kind, B, h, T, d, p, dtype):
    """fp32 dW (and db) partials the fused backward writes and PyTorch reads back, MB."""
    from linearize.kernels.feature_maps.fused import launch_config

    nt = launch_config(kind, True, d, p, dtype, T, B * h)[2]
    per = d * p + (p if kind == "hedgehog" else 0)
    return 2 * nt * B * h * per * 4 / 1e6


def run_feature_map_bench(
    *,
    quick: bool = False,
    device: str = "cuda",
    json_path: str | None = None,
    max_seconds: float = 1200.0,
    shapes: list[tuple[int, int, int, int]] | None = None,
    maps: tuple[str, ...] = ("hedgehog", "taylor"),
    based_rank: int = 16,
    heads: int = 16,
    with_backward: bool = True,
    with_compile: bool = True,
    check: bool = True,
    overwrite: bool = False,
) -> list[dict]:
    """Time the fused feature-map kernels against the PyTorch reference; print each row as it finishes, then a
    table.

    Args:
        quick: small subset (B * h = 32, T = 4k, d in {128, 64}); on CPU one tiny shape.
        device: ``"cuda"`` (the real benchmark) or ``"cpu"`` (smoke test: needs ``TRITON_INTERPRET=1`` set before
            triton is imported for the Triton columns).
        json_path: also write every row as JSON to this path (rewritten after every row), marked as linearize's.
        max_seconds: stop adding rows after this much wall time (noted).
        shapes: override the grid: ``[(B, h, T, d), ...]``.
        maps: which maps to run (``"hedgehog"``: p = d; ``"taylor"``: r = ``based_rank``).
        heads: heads per batch element of the default grid (B = B*h // heads).
        with_backward: also time forward + backward.
        with_compile: also time ``torch.compile(reference, dynamic=True)`` (failures are noted, not raised).
        check: report the Triton result's relative error against the fp32 reference (batch 0).
        overwrite: replace ``json_path`` when an earlier linearize run wrote it (never a file linearize did not
            write; :func:`linearize.export.writer.check_output_file`).

    Returns:
        The list of result rows (dicts).

    Raises:
        LinearizeError: ``json_path`` cannot be written (checked first).
        RuntimeError: ``device="cuda"`` without a CUDA GPU.
    """
    check_outputs(json_path, overwrite=overwrite)
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise RuntimeError("run_feature_map_bench(device='cuda') needs a CUDA GPU; use device='cpu' for a smoke run")
    from linearize.kernels.feature_maps import (
        HAS_TRITON,
        based_feature_dim,
        based_features_torch,
        hedgehog_features_torch,
    )

    t_start = time.time()
    if shapes is None:
        if not on_cuda:
            shapes = [(1, 2, 32, 16)]
        elif quick:
            shapes = [(32 // heads, heads, 4096, d) for d in (128, 64)]
        else:
            shapes = [(bh // heads, heads, T, d) for d in (64, 128) for bh in (32, 256) for T in (1024, 4096, 16384)]
    dt = torch.bfloat16
    rows: list[dict] = []
    notes: list[str] = []
    env = dict(device=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__)
    tri_ok = HAS_TRITON and (on_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if HAS_TRITON:
        import triton

        env["triton"] = triton.__version__
        from linearize.kernels.feature_maps.fused import based_features_triton, hedgehog_features_triton
    if not tri_ok:
        notes.append("Triton columns skipped: triton missing, or a CPU device without TRITON_INTERPRET=1")
    ms_of = _timer(device)

    compiled = {}
    if with_compile:
        for kind, fn in (("hedgehog", hedgehog_features_torch), ("taylor", based_features_torch)):
            try:
                compiled[kind] = torch.compile(fn, dynamic=True)
            except Exception as e:  # noqa: BLE001 - torch.compile unavailable: skip the column
                notes.append(f"torch.compile unavailable for {kind}: {type(e).__name__}")

    def no_bias(fn):  # Taylor has no bias: give every map the (x, w, b) signature
        return None if fn is None else (lambda x, w, b: fn(x, w))

    fns = {
        "hedgehog": (hedgehog_features_torch, compiled.get("hedgehog"), hedgehog_features_triton if tri_ok else None),
        "taylor": (no_bias(based_features_torch), no_bias(compiled.get("taylor")),
                   no_bias(based_features_triton) if tri_ok else None),
    }

    def dump():
        write_rows(json_path, rows)

    cols = ["map", "B", "h", "T", "d", "F", "ref_fwd_ms", "cmp_fwd_ms", "tri_fwd_ms", "ref_fb_ms", "cmp_fb_ms",
            "tri_fb_ms", "tri_fwd_GBps", "tri_bwd_GBps", "tri_fb_GBps", "x_fwd", "x_fb", "x_cmp_fwd", "x_cmp_fb",
            "err_fwd", "err_dx", "note"]
    print("rows:", " | ".join(cols), flush=True)
    stop = False
    for kind in maps:
        if kind not in ("hedgehog", "taylor"):
            raise ValueError(f"unknown map {kind!r}; choose from ('hedgehog', 'taylor')")
        for B, h, T, d in shapes:
            if time.time() - t_start > max_seconds:
                if not stop:
                    notes.append(f"stopped after {max_seconds:.0f} s; later rows skipped")
                stop = True
                break
            p = d if kind == "hedgehog" else based_rank
            F = 2 * p if kind == "hedgehog" else based_feature_dim(p)
            fwd_bytes, bwd_bytes = _bytes(kind, B, h, T, d, p, F)
            row = dict(kind="feature_map", map=kind, B=B, h=h, T=T, d=d, p=p, F=F, dtype="bf16",
                       fwd_MB=fwd_bytes / 1e6, bwd_MB=bwd_bytes / 1e6, fwd_gflop=2 * B * h * T * d * p / 1e9,
                       **env)
            if tri_ok:
                row["bwd_partial_MB"] = _partial_mb(kind, B, h, T, d, p, dt)
            ref_fn, cmp_fn, tri_fn = fns[kind]
            _attempt(row, "row", lambda: _bench_row(row, kind, B, h, T, d, p, F, dt, device, ms_of, ref_fn,
                                                     cmp_fn, tri_fn, with_backward, check, fwd_bytes, bwd_bytes),
                     device)
            if on_cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            print("row", " | ".join(_fmt(row.get(c)) for c in cols), flush=True)
            dump()
    _print_table(f"feature maps ({dt}, ms median; Taylor r = {based_rank}, Hedgehog p = d)", cols, rows, notes)
    return rows


def _bench_row(row, kind, B, h, T, d, p, F, dt, device, ms_of, ref_fn, cmp_fn, tri_fn, with_backward, check,
               fwd_bytes, bwd_bytes):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, h, T, d, device=device, generator=g).to(dt).requires_grad_()
    w = (torch.randn(h, d, p, device=device, generator=g) * d**-0.5).to(dt).requires_grad_()
    b = (torch.randn(h, p, device=device, generator=g) * 0.1).to(dt).requires_grad_() if kind == "hedgehog" else None
    dphi = torch.randn(B, h, T, F, device=device, generator=g).to(dt)
    leaves = [t for t in (x, w, b) if t is not None]

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(x, w, b)
        return run

    def fwd_bwd(fn):
        def run():
            fn(x, w, b).backward(dphi)
        return run

    def time_pair(prefix, fn):
        if fn is None:
            return
        ms = _attempt(row, f"{prefix} fwd", lambda: ms_of(fwd(fn)), device)
        if ms is not None:
            row[f"{prefix}_fwd_ms"] = ms
        if with_backward:
            ms = _attempt(row, f"{prefix} fwd+bwd", lambda: ms_of(fwd_bwd(fn), grad_to_none=leaves), device)
            if ms is not None:
                row[f"{prefix}_fb_ms"] = ms

    time_pair("tri", tri_fn)
    time_pair("ref", ref_fn)
    time_pair("cmp", cmp_fn)

    if row.get("tri_fwd_ms"):
        row["tri_fwd_GBps"] = fwd_bytes / row["tri_fwd_ms"] / 1e6
        row["tri_fwd_TFLOPs"] = 2 * B * h * T * d * p / row["tri_fwd_ms"] / 1e9
    if row.get("tri_fb_ms"):
        row["tri_fb_GBps"] = (fwd_bytes + bwd_bytes) / row["tri_fb_ms"] / 1e6
        if row.get("tri_fwd_ms") and row["tri_fb_ms"] > row["tri_fwd_ms"]:
            row["tri_bwd_ms"] = row["tri_fb_ms"] - row["tri_fwd_ms"]
            row["tri_bwd_GBps"] = bwd_bytes / row["tri_bwd_ms"] / 1e6
    for name, num, den in (("x_fwd", "ref_fwd_ms", "tri_fwd_ms"), ("x_fb", "ref_fb_ms", "tri_fb_ms"),
                           ("x_cmp_fwd", "cmp_fwd_ms", "tri_fwd_ms"), ("x_cmp_fb", "cmp_fb_ms", "tri_fb_ms")):
        if row.get(num) and row.get(den):
            row[name] = row[num] / row[den]

    if check and tri_fn is not None:
        def errors():
            x0 = x.detach()[:1]
            xr = x0.float().requires_grad_()
            ref = ref_fn(xr, w.detach().float(), b.detach().float() if b is not None else None)
            ref_dx, = torch.autograd.grad(ref, xr, dphi[:1].float())
            xt = x0.clone().requires_grad_()
            got = tri_fn(xt, w.detach(), b.detach() if b is not None else None)
            got_dx, = torch.autograd.grad(got, xt, dphi[:1])
            row["err_fwd"] = _rel_err(got, ref)
            row["err_dx"] = _rel_err(got_dx, ref_dx)

        _attempt(row, "check", errors, device)
