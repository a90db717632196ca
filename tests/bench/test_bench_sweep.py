"""`linearize bench sweep` on CPU with a tiny SmolLM2-shaped geometry: every row runs, the sweep stops a model at its
first out-of-memory batch, and the memory columns are the caches the design promises (the linear state does not
grow with the generated length; the teacher's KV cache does). Speed is the GPU's to measure: no timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from linearize.bench import sweep
from linearize.bench.generate import smollm2_geometry


def _cfg():
    return smollm2_geometry(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)


def test_sweep_rows_caches_and_outputs(tmp_path):
    rows = sweep.run_generate_sweep(prompt=16, lengths=(8, 24), max_batch=4, window=8, sinks=2, dtype="float32",
                                    device="cpu", config=_cfg(), warmup=1, timed=2, json_path=tmp_path / "s.json",
                                    plots=tmp_path / "plots")
    got = {(r["model"], r["new_tokens"], r["batch"]): r for r in rows}
    expected_keys = {(m, n, b) for n in (8, 24) for m, bs in (("teacher", (1, 2, 4)), ("linear", (1, 2, 4)),
                                                             ("teacher static+compile", (1, 4))) for b in bs}
    assert set(got) == expected_keys
    assert all(r["tok_per_s"] > 0 and "note" not in r for r in rows)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32 bytes
    for B in (1, 2, 4):
        # linear: one state size whatever the length; it scales with the batch
        assert got[("linear", 8, B)]["cache_MiB"] == got[("linear", 24, B)]["cache_MiB"]
        assert got[("linear", 8, B)]["cache_MiB"] == pytest.approx(B * got[("linear", 8, 1)]["cache_MiB"])
        # teacher default: the cache after prompt + N tokens and the 1 + 2 steps run on it
        for N in (8, 24):
            assert got[("teacher", N, B)]["cache_MiB"] * 2**20 == B * per_token * (16 + N + 3)
    for B in (1, 4):  # static: prompt + N slots, allocated up front
        assert got[("teacher static+compile", 24, B)]["cache_MiB"] * 2**20 == B * per_token * (16 + 24)
    teacher = got[("teacher", 24, 2)]
    assert teacher["step_ms"] == pytest.approx((teacher["step_start_ms"] + teacher["step_end_ms"]) / 2)
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "plots" / "throughput-vs-batch.png").stat().st_size > 0
    assert (tmp_path / "plots" / "memory-vs-length.png").stat().st_size > 0
    lines = sweep.summarize(rows)
    assert len(lines) == 6 and all("fits at every batch tried" in line for line in lines)


def test_sweep_stops_a_model_at_its_first_out_of_memory_batch(monkeypatch):
    real = sweep._linear

    def linear(student, B, *args):
        if B >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(student, B, *args)

    monkeypatch.setattr(sweep, "_linear", linear)
    rows = sweep.run_generate_sweep(prompt=16, lengths=(8,), max_batch=16, window=8, dtype="float32", device="cpu",
                                    config=_cfg(), models=("linear",), warmup=1, timed=1)
    assert [(r["batch"], r.get("note")) for r in rows] == [(1, None), (2, None), (4, "out of memory")]
    assert sweep.summarize(rows) == [sweep.summarize(rows)[0]]
    assert "out of memory at batch 4" in sweep.summarize(rows)[0]


def test_sweep_runs_the_compiled_linear_row_only_when_asked(tmp_path):
    """``linear+compile`` is a row of its own (not in the default rows): the same model with ``compile_decode`` on
    (on CPU no decode graph applies, so nothing compiles here; the GPU measures the difference), summarised and
    plotted like the others, and the model is left as each row set it."""
    assert "linear+compile" in sweep.MODELS and "linear+compile" not in sweep.DEFAULT_MODELS
    rows = sweep.run_generate_sweep(prompt=16, lengths=(8,), max_batch=2, window=8, dtype="float32", device="cpu",
                                    config=_cfg(), models=("linear", "linear+compile"), warmup=1, timed=1,
                                    plots=tmp_path)
    got = {(r["model"], r["batch"]): r for r in rows}
    assert set(got) == {(m, b) for m in ("linear", "linear+compile") for b in (1, 2)}
    assert all(got[("linear+compile", b)]["cache_MiB"] == got[("linear", b)]["cache_MiB"] for b in (1, 2))
    lines = sweep.summarize(rows)
    assert [line.split(",")[0] for line in lines] == ["linear", "linear+compile"]
    assert (tmp_path / "throughput-vs-batch.png").stat().st_size > 0


def test_sweep_rejects_unknown_models():
    with pytest.raises(ValueError, match="unknown sweep models"):
        sweep.run_generate_sweep(models=("teacher", "nope"), device="cpu", config=_cfg())


def test_the_layout_line_names_softmax_layers_sinks_and_the_global_cache():
    from linearize.models.cache import CacheGeometry
    from tests.conftest import linear_config

    cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "hidden_size": 576}
    g = CacheGeometry.from_config(cfg, linear_config(window=256, sinks=4, global_cache=64), dtype_bytes=2)
    layout = sweep._Layout(geometry=g, softmax_layers=(0, 1, 2), weight_bytes=1, teacher_weight_bytes=1,
                           feature_map="hedgehog", state_update="additive")
    assert sweep._fmt_layout(layout) == ("27 linear + 3 softmax [0, 1, 2] of 30 layers, window 256 + 4 sinks + a "
                                         "global cache of 64 pairs, hedgehog")
    assert layout.as_dict()["global_cache"] == 64
