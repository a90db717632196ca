"""Generation benchmark: prefill time, per-token decode latency, throughput and memory of a linearized model against
its softmax teacher, on the model's real decode loop (``model(token, cache=cache)``, no sampling overhead).

    linearize bench generate                      # SmolLM2-135M geometry, random weights, bf16, on the GPU
    linearize bench generate --batch 1,32 --prompt 2048,8192 --new-tokens 64
    linearize bench generate EXPORT [--compare TEACHER]   # a real export and its teacher (default: the recorded one)

Rows, per (batch, prompt length):
  * ``teacher``: the original softmax model (SDPA, transformers' DynamicCache: KV grows with the context);
  * ``linear torch``: the linearized model on the PyTorch reference kernels (chunked prefill, vectorised step);
  * ``linear triton``: the same model on the fused kernels (chunked prefill, one-launch decode over ring buffers;
    on CUDA each step replays a CUDA graph of the whole forward, ``models/graphs.py``);
  * with ``through_generate`` (the default), two rows timed through ``generate()`` as users call it, greedy:
    ``teacher static+compile`` (``cache_implementation="static"``, which makes transformers ``torch.compile`` the
    decode step on a GPU: the teacher's fastest path) and ``linear triton generate``;
  * with ``compile_decode``, ``linear triton compiled`` (and ``linear triton generate compiled``): the same rows with
    ``model.compile_decode = True``, inductor's fused kernels inside the decode graph (``models/graphs.py``; the
    compilation, once per batch size, happens in untimed steps).
Columns: prefill ms, decode ms per step (median of timed steps, each synchronised; for the generate() rows
``(t(new_tokens) - t(1)) / (new_tokens - 1)``, each t the fastest of 3 runs after a warm-up of both lengths, so
compilation is not timed), tokens/s
(batch / step time), cache MiB after the run (our ``LinearizedCache.nbytes``; the teacher's keys + values; the
static cache holds prompt + new tokens), peak allocated GiB.

Random weights are fine for speed and memory: the work per token does not depend on the values. The same model
(and the same weights) run every row.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from typing import Any

import torch

from linearize.bench.table import check_outputs, check_sources, write_rows
from linearize.models.base import cache_kwarg_of, output_cache
from linearize.models.cache import cache_nbytes
from linearize.modules.config import DEFAULT_WINDOW

__all__ = ["run_generate_bench", "smollm2_geometry"]


def smollm2_geometry(**overrides: Any):
    """A LlamaConfig with SmolLM2-135M's shapes (30 layers, 576 hidden, 9 query / 3 kv heads of 64)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=65536, tie_word_embeddings=True,
              rope_theta=100000.0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def _measure(model, ids, new_tokens: int, device: str) -> dict:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model(ids, use_cache=True, logits_to_keep=1)  # warm-up: kernel compilation (shape-dependent), allocator
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)  # as generate() prefills: last position's logits only
    _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    cache = output_cache(out)
    cache_kwarg = cache_kwarg_of(type(model))  # the teacher is a plain transformers model: use its keyword
    tok = out.logits[:, -1:].argmax(-1)
    steps = []
    for i in range(new_tokens):
        _sync(device)
        t0 = time.perf_counter()
        out = model(tok, **{cache_kwarg: cache}, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= 2:  # the first steps compile / warm caches
            steps.append((time.perf_counter() - t0) * 1e3)
    step_ms = statistics.median(steps) if steps else float("nan")
    nbytes = cache_nbytes(cache)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"prefill_ms": prefill_ms, "step_ms": step_ms, "tok_per_s": ids.shape[0] / step_ms * 1e3,
            "cache_MiB": nbytes / 2**20, "peak_GiB": peak}


@torch.no_grad()
def _measure_generate(model, ids, new_tokens: int, device: str, **generate_kwargs: Any) -> dict:
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens; decode time per step from two lengths (module docs)."""
    if new_tokens < 2:
        raise ValueError("the generate() rows need new_tokens >= 2 (decode time = t(n) - t(1))")

    def run(n: int):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, return_dict_in_generate=True, **generate_kwargs)

    def timed(n: int):
        _sync(device)
        t0 = time.perf_counter()
        out = run(n)
        _sync(device)
        return time.perf_counter() - t0, out

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run(1), run(new_tokens)  # warm-up of both shapes: compilation, graph capture, allocator
    t1 = min(timed(1)[0] for _ in range(3))  # the fastest of 3: host noise only ever adds time
    tn, out = min((timed(new_tokens) for _ in range(3)), key=lambda r: r[0])
    step_ms = (tn - t1) / (new_tokens - 1) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"prefill_ms": t1 * 1e3, "step_ms": step_ms, "tok_per_s": ids.shape[0] / step_ms * 1e3,
            "cache_MiB": cache_nbytes(output_cache(out)) / 2**20, "peak_GiB": peak}


def _random_models(cfg, window: int, feature_map: str, dt: torch.dtype, device: str, *, sinks: int | None = None):
    """(teacher, linearized student) sharing one set of random weights; ``sinks`` None = the default for
    ``window`` (:class:`~linearize.modules.config.LinearAttentionConfig`)."""
    from transformers import AutoModelForCausalLM

    from linearize.convert.surgery import linearize_model
    from linearize.modules.attention import LinearAttentionConfig

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device=device, dtype=dt).eval()
    student = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dt).eval()
    student.load_state_dict(teacher.state_dict())
    student = linearize_model(student, LinearAttentionConfig(feature_map=feature_map, window=window, sinks=sinks))
    return teacher, student.to(device=device, dtype=dt)


def _real_models(model: str, compare: str | None, dt: torch.dtype, device: str, *, teacher: bool = True):
    """(teacher, student) loaded from an export and its teacher; (None, student) with ``teacher=False`` and no
    ``compare`` (rows of the linearized model only: the export alone holds its shapes and its teacher's).

    Raises:
        LinearizeError: ``model`` is not a linearized export, or its teacher is needed, unknown and ``compare`` is
            not given.
    """
    from linearize.errors import ConfigError
    from linearize.io.loading import load_model
    from linearize.io.portable import loadable_reference

    student, _ = load_model(model, dtype=dt, device=device)
    lin = getattr(student.config, "linearize", None)
    if lin is None:
        raise ConfigError(f"{model} is not a linearized export; pass one (and --compare its teacher)")
    if not teacher and not compare:
        return None, student
    teacher_source = compare or loadable_reference(lin.get("teacher"))
    if not teacher_source:
        recorded = f" (it records {lin['teacher']}: a local model, by name only)" if lin.get("teacher") else ""
        raise ConfigError(f"{model} does not record a teacher that loads here{recorded}; pass --compare TEACHER")
    teacher_model, _ = load_model(teacher_source, dtype=dt, device=device)
    return teacher_model, student


def run_generate_bench(
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    prompt_lens: tuple[int, ...] = (2048, 8192),
    new_tokens: int = 32,
    window: int = DEFAULT_WINDOW,
    feature_map: str = "hedgehog",
    dtype: str = "bfloat16",
    device: str = "cuda",
    config=None,
    model: str | None = None,
    compare: str | None = None,
    json_path: str | None = None,
    through_generate: bool = True,
    compile_decode: bool = False,
    overwrite: bool = False,
) -> list[dict]:
    """Run the grid and print a table; returns the rows.

    Args:
        config: a transformers config to build random-weight models from (default: :func:`smollm2_geometry`).
        model / compare: a real linearized export and its teacher (hub id, folder or .gguf; default: the teacher
            recorded in the export) instead of random weights; ``window`` and ``feature_map`` then come from the
            export.
        through_generate: also time both models through ``generate()``, the teacher on its static-cache +
            compile path (module docstring).
        compile_decode: also time the linearized model's Triton rows with its compiled decode step (module
            docstring).
        json_path / overwrite: also write the rows as JSON, marked as linearize's; an existing file only when an
            earlier linearize run wrote it and ``overwrite`` is set (checked before any model loads).

    Raises:
        LinearizeError: ``json_path`` cannot be written; ``model`` or ``compare`` does not load.
    """
    from linearize.bench.table import print_table

    check_outputs(json_path, overwrite=overwrite)
    check_sources(model, compare)
    dt = getattr(torch, dtype)
    if model is not None:
        teacher, student = _real_models(model, compare, dt, device)
        cfg = student.config
        window, feature_map = student.linear_config.window, student.linear_config.feature_map
    else:
        cfg = config or smollm2_geometry()
        teacher, student = _random_models(cfg, window, feature_map, dt, device)

    rows: list[dict] = []
    cols = ["model", "batch", "prompt", "prefill_ms", "step_ms", "tok_per_s", "cache_MiB", "peak_GiB", "note"]
    print(" | ".join(cols), flush=True)
    for B in batch_sizes:
        for T in prompt_lens:
            ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
            runs = [("teacher", teacher, None, None), ("linear torch", student, "torch", None),
                    ("linear triton", student, "triton", None)]
            if compile_decode:
                runs.append(("linear triton compiled", student, "triton", None))
            if through_generate:
                runs += [("teacher static+compile", teacher, None, {"cache_implementation": "static"}),
                         ("linear triton generate", student, "triton", {})]
                if compile_decode:
                    runs.append(("linear triton generate compiled", student, "triton", {}))
            for name, net, backend, generate_kwargs in runs:
                row: dict = {"model": name, "batch": B, "prompt": T}
                if backend == "triton" and importlib.util.find_spec("triton") is None:
                    row["note"] = "triton not installed"
                    rows.append(row)
                    continue
                if backend is not None:
                    student.set_backend(backend)
                student.compile_decode = name.endswith(" compiled")
                try:
                    if generate_kwargs is None:
                        row.update(_measure(net, ids, new_tokens, device))
                    else:
                        row.update(_measure_generate(net, ids, new_tokens, device, **generate_kwargs))
                except torch.OutOfMemoryError:
                    row["note"] = "out of memory"
                    torch.cuda.empty_cache()
                except ValueError as e:  # shapes a fused kernel does not cover (it says which)
                    row["note"] = str(e).split(";")[0]
                if student.compile_decode and student._compiled_decode().failed:
                    row["note"] = "compilation failed (see the warning): ran uncompiled"
                rows.append(row)
                print(" | ".join(str(row.get(c, "-")) for c in cols), flush=True)
    what = model or "random weights"
    print_table(f"generation ({what}, {dtype}, {cfg.num_hidden_layers} layers, window {window}, {feature_map}, "
                 f"{new_tokens} decode steps)", cols, rows)
    write_rows(json_path, rows)
    return rows
