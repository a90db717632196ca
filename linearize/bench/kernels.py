"""Kernel benchmark: fused Triton hybrid / linear attention against the PyTorch reference, PyTorch SDPA (flash,
causal) and fla's ``chunk_linear_attn`` (when ``fla`` imports), plus the decode step.

    python -c 'from linearize.bench.kernels import run_kernel_bench; run_kernel_bench(quick=True)'
    python -c 'from linearize.bench.kernels import run_kernel_bench; run_kernel_bench(json_path="bench.json")'

Timing: medians of CUDA-event-timed calls (``_bench``); decode also per step inside a CUDA graph of 20 steps
(``tri_graph_us``, no host overhead; ``tri_GBps`` uses it, ``tri_eager_GBps`` the eager call). Formulas (bf16 inputs,
per call):
  * forward FLOPs: linear part per chunk (C = 64) and query head ``2 C^2 (F + D) + 4 C F D`` (method-notes), window
    part ``2 T W (d + D)`` per query head (scores + weighted values over W keys). fwd+bwd counted as 3x forward.
  * forward bytes: every input read once, the output written once (q, k, v, fq, fk, o at their real head counts).
  * decode bytes: fp32 state read + written (``2 * 4 * (F * D + F)`` per state head), the window's k/v cache read
    (``2 W (d + D)`` per key head), the leaving key's fk slot, the new token's inputs, the output. SDPA decode: the KV
    cache of the same context (``2 ctx (d + D)`` per key head).
Only needs torch + triton (no pydantic / typer).
"""

from __future__ import annotations

import math
import time

import torch

from linearize.bench.table import check_outputs, print_table, write_rows

__all__ = ["graph_replay_us", "reference_inputs", "run_kernel_bench"]


def reference_inputs(B, H, Hk, T, D, *, device="cuda", seed=0, gamma=0.1):
    """bf16 inputs of the GPU checks at one size: q, k, v ~ N(0, 0.5^2), phi(q) / phi(k) = softmax rows (F = D),
    gamma constant. Returns (q, k, v, fq, fk, gamma)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: (torch.randn(*s, device=device, generator=g) * 0.5).to(torch.bfloat16)  # noqa: E731
    q, k, v = r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D)
    fq = torch.softmax(torch.randn(B, H, T, D, device=device, generator=g), -1).to(torch.bfloat16)
    fk = torch.softmax(torch.randn(B, Hk, T, D, device=device, generator=g), -1).to(torch.bfloat16)
    return q, k, v, fq, fk, torch.full((H,), gamma, device=device)


def _fla_linear():
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        return chunk_linear_attn
    except Exception:  # noqa: BLE001 - fla missing or broken: skip the column
        return None


def _flops_fwd(B, H, T, d, D, F, W, C=64):
    n_chunks = math.ceil(T / C)
    lin = n_chunks * (2 * C * C * (F + D) + 4 * C * F * D)
    win = 2 * T * min(W, T) * (d + D) if W > 0 else 0
    return B * H * (lin + win)


def _bytes_fwd(B, H, Hk, Hs, T, d, D, F, W, elt=2):
    n = B * H * T * F + B * Hs * T * F + B * Hk * T * D + B * H * T * D
    if W > 0:
        n += B * H * T * d + B * Hk * T * d
    return n * elt


def _bench(fn, grad_to_none=None, rep=100, warmup=1):
    """Median ms of ``fn`` over about ``rep`` ms (at least 3, at most 50 timed calls), each call timed with CUDA
    events after ``warmup`` untimed calls (compilation). Unlike ``do_bench`` no 5-call estimate: slow configs
    (SDPA at 64k) cost a few calls, not dozens."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_end = None
    for i in range(50):
        if grad_to_none:
            for x in grad_to_none:
                x.grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
        if t_end is None:
            t_end = rep / max(times[0], 1e-3)
        if i + 1 >= max(3, min(50, t_end)):
            break
    times.sort()
    return times[len(times) // 2]


def _graph_us(step, n=20):
    """Per-step us of ``n`` steps captured in one CUDA graph (no host overhead): what a serving loop pays."""
    return graph_replay_us(lambda: [step() for _ in range(n)], reps=50) / n


def graph_replay_us(run, *, reps: int = 15, warmup: int = 3) -> float:
    """Median microseconds of one replay of ``run`` (a zero-argument callable of CUDA work) captured in a CUDA
    graph: one call on a side stream first (compilation and allocations stay outside the capture), ``warmup``
    untimed replays, then ``reps`` replays each timed with CUDA events. The decode benchmarks capture one step of
    many layers' separate buffers in ``run`` and divide by the layer count."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    del graph
    return times[len(times) // 2]


def _fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _print_table(title, cols, rows, notes=()):
    print_table(title, cols, rows, notes, cell=_fmt)


def run_kernel_bench(
    *,
    quick: bool = False,
    seq_lens: tuple[int, ...] | None = None,
    batch_heads: tuple[int, ...] | None = None,
    head_dims: tuple[int, ...] | None = None,
    decode_batch_heads: tuple[int, ...] | None = None,
    decode_ctx: tuple[int, ...] | None = None,
    window: int = 64,
    heads: int = 16,
    kv_heads: int = 4,
    with_backward: bool = True,
    torch_ref_max_tokens: int = 2**13,
    sdpa_max_tflop: float = 300.0,
    max_seconds: float = 300.0,
    json_path: str | None = None,
    device: str = "cuda",
    overwrite: bool = False,
) -> list[dict]:
    """Benchmark the decode step and the chunked kernels (fwd and fwd+bwd); print each row as it finishes, then one
    table each.

    Args:
        quick: small subset (decode B*H in {32, 256, 2048} at D = 128; chunk T in {4k, 16k}, B*H = 32, D = 128).
        seq_lens, batch_heads, head_dims: override the chunk grid (default T {1k, 4k, 16k, 64k}, B*H {32, 256},
            D {64, 128}); d = F = D, H = ``heads`` query heads, ``kv_heads`` key / state heads (GQA).
        decode_batch_heads, decode_ctx: decode grid (default B*H {32, 256, 2048}; SDPA context {4k, 32k}).
        window: hybrid window W (the pure linear W = 0 rows are added for the fla comparison).
        with_backward: also time forward + backward.
        torch_ref_max_tokens: skip the PyTorch reference above this many B*T tokens (slow and memory hungry).
        sdpa_max_tflop: skip SDPA fwd+bwd above this many TFLOP per call (T = 64k at B*H = 256 takes seconds).
        max_seconds: stop adding chunk configurations after this much wall time.
        json_path: also write every row as JSON to this path (rewritten after every row), marked as linearize's.
        device: CUDA device string.
        overwrite: replace ``json_path`` when an earlier linearize run wrote it (never a file linearize did not
            write; :func:`linearize.export.writer.check_output_file`).

    Returns:
        The list of result rows (dicts).

    Raises:
        LinearizeError: ``json_path`` cannot be written (checked first).
        RuntimeError: when CUDA is not available.
    """
    check_outputs(json_path, overwrite=overwrite)
    if not torch.cuda.is_available():
        raise RuntimeError("run_kernel_bench needs a CUDA GPU (the Triton kernels are timed on the device)")
    import torch.nn.functional as Fn
    import triton

    from linearize.kernels import hybrid_decode_step, hybrid_decode_step_torch
    from linearize.kernels.hybrid.chunk import hybrid_attention_triton
    from linearize.kernels.hybrid.naive import hybrid_attention_chunked

    t_start = time.time()
    if quick:
        seq_lens = seq_lens or (4096, 16384)
        batch_heads = batch_heads or (32,)
        head_dims = head_dims or (128,)
        decode_ctx = decode_ctx or (4096,)
    seq_lens = seq_lens or (1024, 4096, 16384, 65536)
    batch_heads = batch_heads or (32, 256)
    head_dims = head_dims or (128, 64)
    decode_batch_heads = decode_batch_heads or (32, 256, 2048)
    decode_ctx = decode_ctx or (4096, 32768)
    fla_fn = _fla_linear()
    dt = torch.bfloat16
    rows, notes = [], []
    if fla_fn is None:
        notes.append("fla not importable: chunk_linear_attn column skipped")
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)

    def dump():
        write_rows(json_path, rows)

    # decode first: quick, and its launch-bound small-batch rows must not wait behind the long chunk grid
    dcols = ["B", "H", "Hk", "ctx", "D", "W", "tri_us", "tri_graph_us", "tri_GBps", "tri_eager_GBps", "torch_us",
             "sdpa_us", "sdpa_GBps", "x_sdpa", "note"]
    drows = []
    print("decode rows:", " | ".join(dcols), flush=True)
    for D in head_dims:
        for BH in decode_batch_heads:
            H = min(heads, BH)
            B = max(1, BH // H)
            Hk = min(kv_heads, H)
            for T in decode_ctx:
                row = dict(kind="decode", B=B, H=H, Hk=Hk, ctx=T, D=D, W=window, **env)
                try:
                    _bench_decode(row, B, H, Hk, T, D, window, dt, device, hybrid_decode_step,
                                  hybrid_decode_step_torch, Fn)
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "OOM"
                torch.cuda.empty_cache()
                drows.append(row)
                rows.append(row)
                print("decode", " | ".join(_fmt(row.get(c)) for c in dcols), flush=True)
                dump()

    cols = ["B", "H", "T", "D", "W", "tri_fwd_ms", "tri_fwdbwd_ms", "tri_GBps", "tri_TFLOPs", "torch_fwd_ms",
            "sdpa_fwd_ms", "sdpa_fwdbwd_ms", "fla_fwd_ms", "fla_fwdbwd_ms", "x_sdpa_f", "x_sdpa_fb", "x_fla_fb", "note"]
    crows = []
    print("chunk rows:", " | ".join(cols), flush=True)
    stop = False
    for D in head_dims:
        for BH in batch_heads:
            H = min(heads, BH)
            B = max(1, BH // H)
            Hk = min(kv_heads, H)
            for T in seq_lens:
                for W in (window, 0):
                    if time.time() - t_start > max_seconds:
                        if not stop:
                            notes.append(f"stopped after {max_seconds:.0f} s; later configs skipped")
                        stop = True
                        break
                    row = dict(kind="chunk", B=B, H=H, Hk=Hk, T=T, D=D, W=W, **env)
                    try:
                        _bench_chunk(row, B, H, Hk, T, D, W, dt, device, fla_fn, with_backward, torch_ref_max_tokens,
                                     sdpa_max_tflop, hybrid_attention_triton, hybrid_attention_chunked, Fn)
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = "OOM"
                    torch.cuda.empty_cache()
                    crows.append(row)
                    rows.append(row)
                    print("chunk", " | ".join(_fmt(row.get(c)) for c in cols), flush=True)
                    dump()
    _print_table("decode step (bf16 inputs, fp32 state; us median)", dcols, drows)
    _print_table("chunked hybrid / linear attention (bf16, ms median)", cols, crows, notes)
    return rows


_SDPA_CACHE: dict = {}


def _bench_chunk(row, B, H, Hk, T, D, W, dt, device, fla_fn, with_backward, torch_ref_max_tokens, sdpa_max_tflop,
                 tri, ref, Fn):
    d = F = D
    Hs = Hk
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: (torch.randn(*s, device=device, generator=g) * 0.5).to(dt).requires_grad_()  # noqa: E731
    q, k, v = mk(B, H, T, d), mk(B, Hk, T, d), mk(B, Hk, T, D)
    fq = torch.softmax(torch.randn(B, H, T, F, device=device, generator=g), -1).to(dt).requires_grad_()
    fk = torch.softmax(torch.randn(B, Hs, T, F, device=device, generator=g), -1).to(dt).requires_grad_()
    gamma = torch.full((H,), 0.1, device=device, requires_grad=True)
    leaves = [v, fq, fk] + ([q, k, gamma] if W > 0 else [])
    args = (q, k, v, fq, fk, gamma) if W > 0 else (None, None, v, fq, fk, None)
    kw = dict(window=W, scale=d**-0.5)
    do = torch.randn(B, H, T, D, device=device, dtype=dt)

    def fwd_bwd(f):
        def run():
            o = f()
            o.backward(do)
        return run

    f_tri = lambda: tri(*args, **kw)[0]  # noqa: E731
    ms = _bench(f_tri)
    row["tri_fwd_ms"] = ms
    row["tri_GBps"] = _bytes_fwd(B, H, Hk, Hs, T, d, D, F, W) / ms / 1e6
    row["tri_TFLOPs"] = _flops_fwd(B, H, T, d, D, F, W) / ms / 1e9
    if with_backward:
        row["tri_fwdbwd_ms"] = _bench(fwd_bwd(f_tri), grad_to_none=leaves)
    if B * T <= torch_ref_max_tokens:
        row["torch_fwd_ms"] = _bench(lambda: ref(*args, **kw)[0], rep=50)
    # SDPA flash, causal, full heads (GQA expanded as SDPA's flash path needs equal heads)
    kq = k.detach().repeat_interleave(H // Hk, 1).requires_grad_()
    vq = v.detach().repeat_interleave(H // Hk, 1).requires_grad_()
    qs = q.detach().requires_grad_()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f_sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return Fn.scaled_dot_product_attention(qs, kq, vq, is_causal=True)

    sdpa_tflop = 2 * B * H * T * T * d * 3.5 / 1e12  # causal fwd (2 T^2 d) + bwd (2.5x)
    if sdpa_tflop > sdpa_max_tflop:
        row["note"] = f"SDPA skipped ({sdpa_tflop:.0f} TFLOP per fwd+bwd)"
        return
    key = (B, H, T, d, with_backward)
    if key not in _SDPA_CACHE:  # the W = 0 row reuses the W > 0 row's SDPA timing (same shapes)
        res = {"sdpa_fwd_ms": _bench(f_sdpa)}
        if with_backward:
            res["sdpa_fwdbwd_ms"] = _bench(fwd_bwd(f_sdpa), grad_to_none=[qs, kq, vq])
        _SDPA_CACHE[key] = res
    row.update(_SDPA_CACHE[key])
    row["x_sdpa_f"] = row["sdpa_fwd_ms"] / row["tri_fwd_ms"]
    if with_backward:
        row["x_sdpa_fb"] = row["sdpa_fwdbwd_ms"] / row["tri_fwdbwd_ms"]
    if fla_fn is not None:
        # fla layout [B, T, H, K]; feature maps are applied outside fla's kernels, its normaliser is on
        fq_f = fq.detach().transpose(1, 2).contiguous().requires_grad_()
        fk_f = fk.detach().repeat_interleave(H // Hs, 1).transpose(1, 2).contiguous().requires_grad_()
        v_f = v.detach().repeat_interleave(H // Hk, 1).transpose(1, 2).contiguous().requires_grad_()
        do_f = do.transpose(1, 2).contiguous()

        def f_fla():
            return fla_fn(fq_f, fk_f, v_f, normalize=True)[0]

        try:
            row["fla_fwd_ms"] = _bench(f_fla)
            if with_backward:
                def fb():
                    f_fla().backward(do_f)
                row["fla_fwdbwd_ms"] = _bench(fb, grad_to_none=[fq_f, fk_f, v_f])
                row["x_fla_fb"] = row["fla_fwdbwd_ms"] / row["tri_fwdbwd_ms"]
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            row["note"] = f"fla failed: {type(e).__name__}"


def _bench_decode(row, B, H, Hk, T, D, W, dt, device, tri_step, torch_step, Fn):
    d = F = D
    Hs = Hk
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g).to(dt)  # noqa: E731
    q, k, v = r(B, H, 1, d), r(B, Hk, 1, d), r(B, Hk, 1, D)
    fq = torch.rand(B, H, 1, F, device=device, generator=g).to(dt)
    fk = torch.rand(B, Hs, 1, F, device=device, generator=g).to(dt)
    gamma = torch.full((H,), 0.1, device=device)
    S = torch.rand(B, Hs, F, D, device=device, generator=g)  # random, not zeros (METHOD.md)
    z = torch.rand(B, Hs, F, device=device, generator=g)
    kc, vc, fc = r(B, Hk, W, d), r(B, Hk, W, D), torch.rand(B, Hs, W, F, device=device).to(dt)
    pos = torch.full((B,), T, device=device, dtype=torch.int32)
    out = torch.empty(B, H, 1, D, device=device, dtype=dt)
    kw = dict(state=(S, z), k_cache=kc, v_cache=vc, fk_cache=fc, pos=pos, window=W, scale=d**-0.5)
    step = lambda: tri_step(q, k, v, fq, fk, gamma, backend="triton", out=out, **kw)  # noqa: E731
    # bytes: fp32 state read + written, the window's k/v cache read, the leaving key's fk slot, new token, output
    nbytes = (2 * 4 * (F * D + F) * B * Hs + 2 * W * B * Hk * (d + D) + 2 * B * Hs * F
              + 2 * B * (H * (d + F + D) + Hk * (d + D) + Hs * F))
    ms = _bench(step, rep=50)
    row["tri_us"] = ms * 1e3
    row["tri_eager_GBps"] = nbytes / ms / 1e6
    row["tri_graph_us"] = _graph_us(step)
    row["tri_GBps"] = nbytes / row["tri_graph_us"] / 1e3
    row["torch_us"] = _bench(lambda: torch_step(q, k, v, fq, fk, gamma, **kw), rep=30) * 1e3
    try:
        kcache, vcache = r(B, Hk, T, d), r(B, Hk, T, D)

        def f_sdpa():
            return Fn.scaled_dot_product_attention(q, kcache, vcache, enable_gqa=True)

        ms_s = _bench(f_sdpa, rep=50)
        row["sdpa_us"] = ms_s * 1e3
        row["sdpa_GBps"] = 2 * B * Hk * T * (d + D) / ms_s / 1e6
        row["x_sdpa"] = row["sdpa_us"] / row["tri_us"]
    except torch.cuda.OutOfMemoryError:
        row["note"] = "SDPA OOM"
