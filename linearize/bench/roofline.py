"""The teacher's physical limit for generation and the bytes a decode step moves, for ``linearize bench sweep``.

The honest anchor for a linearized model's generation speed is not the teacher as transformers runs it but the best
any serving engine could do with it (vLLM, SGLang, TensorRT-LLM: a paged KV cache of which a step reads only the
filled positions, near the memory bandwidth; ``shared/docs/method-notes.md``, "The teacher's physical limit for
generation"):

  * a step at batch B and context t moves ``weights + B * KV(t)`` bytes, ``KV(t)`` the teacher's cache of one
    sequence at t tokens (``2 * kv_heads * head_dim * dtype_bytes`` per token per softmax layer: all of the teacher's;
    a local layer at most its window), and takes ``bytes / bandwidth`` seconds;
  * a generation of N tokens after a prompt of P runs the steps at contexts t = P .. P + N - 1; tokens/s is
    ``B * N / sum(step times)``;
  * B is the largest batch whose whole cache at P + N, plus the weights, fits the memory.

The bandwidth is what the same GPU copies at, measured in the same run (:func:`measure_copy_bandwidth`). The same byte
count for the sweep's rows (:func:`step_bytes`) gives each one's achieved bandwidth: bytes per step / step time.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from linearize.models.cache import CacheGeometry

__all__ = ["Roofline", "decode_weight_bytes", "linear_step_bytes", "measure_copy_bandwidth", "model_geometry",
           "step_bytes", "teacher_roofline"]

COPY_BYTES = 2**30
"""Size of the buffer :func:`measure_copy_bandwidth` copies: large enough that launch time is noise."""


def measure_copy_bandwidth(device: str, nbytes: int = COPY_BYTES, reps: int = 5) -> float | None:
    """Bytes per second ``device`` moves in a device-to-device copy: ``dst.copy_(src)`` of an ``nbytes`` buffer reads
    ``nbytes`` and writes ``nbytes``, so ``2 * nbytes / time``, the median of ``reps`` copies timed with CUDA events
    after one untimed copy. None off CUDA (not measured: a CPU has no comparable number here).

    The buffers are freed (and the allocator's cache emptied) before it returns."""
    if not device.startswith("cuda"):
        return None
    with torch.cuda.device(torch.device(device)):
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        seconds = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(seconds)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once (shared ones once), less the input token
    embedding when it is not also the output head (a step gathers only its batch's rows of it)."""
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    skip = emb.weight if emb is not None and (out is None or out.weight is not emb.weight) else None
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not skip)


def model_geometry(student: Any, dtype_bytes: int) -> tuple[CacheGeometry, int]:
    """(the cache geometry of a linearized model, its number of softmax layers): per-layer byte counts of its
    recurrent layers and, through :meth:`CacheGeometry.teacher_bytes`, of its teacher's KV cache (local layers
    capped at their window where the teacher has them)."""
    from linearize.models.sliding import cache_geometry

    lin = student.linear_config
    g = cache_geometry(student.config.to_dict(), lin, dtype_bytes)
    return g, len([i for i in lin.softmax_layers if i < g.n_layers])


@dataclass(frozen=True)
class Roofline:
    """The teacher's best generation of ``new_tokens`` after ``prompt`` (module docstring)."""

    prompt: int
    new_tokens: int
    batch: int
    """The largest batch whose cache at prompt + new_tokens, plus the weights, fits ``memory_bytes`` (0: none)."""
    weight_bytes: int
    kv_bytes_per_sequence: int
    """One sequence's KV cache at prompt + new_tokens."""
    memory_bytes: int
    bandwidth: float | None
    """Bytes per second (None: not measured; then no time is computed)."""
    seconds: float | None
    """The whole generation at ``batch``: the sum of its steps' times."""
    tok_per_s: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def teacher_roofline(kv_bytes: Callable[[int], int], *, weight_bytes: int, prompt: int, new_tokens: int,
                     memory: int, bandwidth: float | None) -> Roofline:
    """The teacher's roofline for ``new_tokens`` generated after ``prompt`` (module docstring).

    Args:
        kv_bytes: one sequence's KV cache at a context of t tokens (e.g. :meth:`CacheGeometry.teacher_bytes`).
        weight_bytes: what a step reads of the weights (:func:`decode_weight_bytes`).
        memory: bytes the weights and the caches may take.
        bandwidth: bytes per second, or None (then only the batch is computed).
    """
    full = kv_bytes(prompt + new_tokens)
    batch = max(0, (memory - weight_bytes) // full) if full > 0 else 0
    seconds = tok = None
    if bandwidth and batch:
        moved = new_tokens * weight_bytes + batch * sum(kv_bytes(t) for t in range(prompt, prompt + new_tokens))
        seconds = moved / bandwidth
        tok = batch * new_tokens / seconds
    return Roofline(prompt=prompt, new_tokens=new_tokens, batch=int(batch), weight_bytes=weight_bytes,
                    kv_bytes_per_sequence=full, memory_bytes=memory, bandwidth=bandwidth, seconds=seconds,
                    tok_per_s=tok)


def linear_step_bytes(g: CacheGeometry, linear_layers: int) -> int:
    """What one sequence's decode step moves in ``linear_layers`` recurrent layers: the fp32 state read and
    written, the window ring (keys, values, phi(k)) and the sinks and global-cache pairs read, and the new key's
    slot (key, value, phi(k)) written; window-only layers (``g.window_only``) move no state and no phi(k)."""
    state, window = g.linear_parts(linear_layers)
    stateful = linear_layers - (0 if g.global_cache else g.window_only)
    new_slot = (linear_layers * 2 * g.num_kv_heads * g.head_dim + stateful * g.num_state_heads * g.feature_dim) \
        * g.dtype_bytes
    return 2 * state + window + new_slot


def step_bytes(model: str, g: CacheGeometry, n_softmax: int, *, weight_bytes: int, batch: int, prompt: int,
               new_tokens: int, cache_bytes: int | None = None) -> int:
    """Bytes one decode step at ``batch`` moves, averaged over a generation's contexts t = prompt .. prompt +
    new_tokens - 1, for a row of the sweep:

      * ``linear`` / ``linear+compile``: the weights, :func:`linear_step_bytes` of the recurrent layers, and the
        softmax layers' filled KV at t read with the new token's written;
      * ``teacher`` (a cache of the filled positions): the weights, its KV at t read, the new token's written;
      * ``teacher static+compile``: the weights, its whole preallocated cache read (``cache_bytes``, every slot
        attended, masked or not: what transformers' static cache does), the new token's written.
    """
    contexts = range(prompt, prompt + new_tokens)
    if model.startswith("linear"):
        linear = g.n_layers - n_softmax
        fixed = sum(g.linear_parts(linear))  # bytes_per_sequence less this is the softmax layers' KV

        def softmax(t: int) -> int:
            return g.bytes_per_sequence(n_softmax, t) - fixed

        per_seq = linear_step_bytes(g, linear) + n_softmax * g.softmax_layer_bytes(1)
        per_seq_t = sum(softmax(t) for t in contexts) / max(len(contexts), 1)
        return round(weight_bytes + batch * (per_seq + per_seq_t))
    write = batch * g.teacher_bytes(1)
    if model == "teacher static+compile":
        if cache_bytes is None:
            raise ValueError("the static-cache row's bytes need its cache size (cache_bytes)")
        return weight_bytes + cache_bytes + write
    if model == "teacher":
        return round(weight_bytes + write + batch * sum(g.teacher_bytes(t) for t in contexts) / max(len(contexts), 1))
    raise ValueError(f"no byte count for the sweep row {model!r}")
