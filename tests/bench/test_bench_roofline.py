"""The sweep against the teacher's physical limit (``linearize/bench/roofline.py``): the roofline's arithmetic on
SmolLM2-135M's numbers (``docs/method-notes.md``), the bytes a decode step moves counted by hand for a tiny
geometry, the columns and JSON fields the sweep adds, and rows for a real export that kept a softmax layer. All on
CPU: the copy bandwidth is measured on a GPU only, so the sweeps here are given one."""

from __future__ import annotations

import json

import pytest
import torch

from linearize.bench import sweep
from linearize.bench.generate import smollm2_geometry
from linearize.bench.roofline import decode_weight_bytes, measure_copy_bandwidth, step_bytes, teacher_roofline
from linearize.models.cache import CacheGeometry
from linearize.models.sliding import cache_geometry
from linearize.modules.config import LinearAttentionConfig


def _cfg():
    """SmolLM2's shapes shrunk: 2 layers, 4 query / 2 kv heads of 16."""
    return smollm2_geometry(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)


def test_teacher_roofline_on_smollm2_matches_the_method_notes():
    """KV 23,040 B per token; at ~3.0 TB/s and 80 GB the teacher is capped near 60k tokens/s for 4k-token generations
    (batch ~800) and near 8k for 32k (batch ~100)."""
    from transformers import AutoModelForCausalLM

    cfg = smollm2_geometry()
    with torch.device("meta"):  # shapes only: no memory, no time
        teacher = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    weights = decode_weight_bytes(teacher)
    assert weights == 2 * 134_515_008  # SmolLM2-135M's parameters (tied embeddings: the head counts once), bf16
    g = cache_geometry(cfg.to_dict(), LinearAttentionConfig(window=64), 2)
    assert g.teacher_bytes(1) == 2 * 3 * 64 * 2 * 30 == 23_040
    for new_tokens, batch, tok_per_s in ((4096, 819, 60_000), (32768, 105, 8_000)):
        roof = teacher_roofline(g.teacher_bytes, weight_bytes=weights, prompt=128, new_tokens=new_tokens,
                                memory=80 * 10**9, bandwidth=3.0e12)
        assert roof.batch == batch == (80 * 10**9 - weights) // (23_040 * (128 + new_tokens))
        assert roof.tok_per_s == pytest.approx(tok_per_s, rel=0.03)
        # the closed form: every step reads the weights, and the KV of contexts 128 .. 128 + N - 1
        moved = new_tokens * weights + batch * 23_040 * (new_tokens * 128 + new_tokens * (new_tokens - 1) // 2)
        assert roof.tok_per_s == pytest.approx(batch * new_tokens * 3.0e12 / moved, rel=1e-12)
    # no bandwidth: the batch, and no time
    roof = teacher_roofline(g.teacher_bytes, weight_bytes=weights, prompt=128, new_tokens=4096, memory=80 * 10**9,
                            bandwidth=None)
    assert roof.batch == 819 and roof.tok_per_s is None and roof.seconds is None
    assert teacher_roofline(g.teacher_bytes, weight_bytes=weights, prompt=128, new_tokens=4096, memory=10**8,
                            bandwidth=3.0e12).batch == 0  # the weights alone nearly fill it: no batch fits


def test_step_bytes_of_a_tiny_geometry_by_hand():
    g = CacheGeometry(n_layers=2, num_kv_heads=2, head_dim=16, num_state_heads=2, feature_dim=32, window=8, sinks=2,
                      dtype_bytes=2)
    # one linear layer: fp32 state 2 heads x (32 x 16 + 32) x 4 B = 4,352, read and written; the ring of 8 slots of
    # k, v (2 heads x 16 each) and phi(k) (2 heads x 32) in bf16: 8 x 128 x 2 = 2,048 read; 2 sinks' k and v:
    # 2 x 64 x 2 = 256 read; the new slot: 128 x 2 = 256 written
    linear = 2 * 4352 + 2048 + 256 + 256
    # one softmax layer: 2 x 2 heads x 16 x 2 B = 128 B per token, read at contexts 16 .. 23 (mean 19.5), one written
    softmax = 128 * 19.5 + 128
    assert step_bytes("linear", g, 1, weight_bytes=1000, batch=3, prompt=16, new_tokens=8) == 1000 + 3 * (
        linear + softmax)
    # every layer recurrent: the same per step at any context
    assert step_bytes("linear+compile", g, 0, weight_bytes=1000, batch=3, prompt=16,
                      new_tokens=8) == 1000 + 3 * 2 * linear
    # the teacher: both layers' KV (256 B per token) at the mean context, and the new token's
    assert step_bytes("teacher", g, 0, weight_bytes=1000, batch=3, prompt=16, new_tokens=8) == 1000 + 3 * (
        256 * 19.5 + 256)
    # the static cache: all of it, whatever the context
    assert step_bytes("teacher static+compile", g, 0, weight_bytes=1000, batch=3, prompt=16, new_tokens=8,
                      cache_bytes=50_000) == 1000 + 50_000 + 3 * 256


def test_copy_bandwidth_is_not_measured_on_cpu_and_nothing_is_computed_from_it(capsys):
    cfg = _cfg()
    assert measure_copy_bandwidth("cpu") is None
    rows = sweep.run_generate_sweep(prompt=16, lengths=(8,), max_batch=1, window=8, dtype="float32", device="cpu",
                                    config=cfg, models=("linear",), warmup=1, timed=1)
    assert "copy bandwidth: not measured (cpu)" in capsys.readouterr().out
    (row,) = rows
    assert "roofline_tok_per_s" not in row and "vs_roofline" not in row and "of_copy" not in row
    assert row["GB_per_s"] == pytest.approx(row["step_GB"] / (row["step_ms"] / 1e3))  # needs no copy bandwidth


def test_sweep_rows_carry_the_roofline_and_the_bytes_per_step(tmp_path, capsys):
    cfg = _cfg()
    bw = 1e11
    rows = sweep.run_generate_sweep(prompt=16, lengths=(8,), max_batch=1, window=8, sinks=2, dtype="float32",
                                    device="cpu", config=cfg, warmup=1, timed=1, memory_limit=10**7, bandwidth=bw,
                                    json_path=tmp_path / "s.json", plots=tmp_path / "plots")
    out = capsys.readouterr().out
    for col in ("roofline_tok_per_s", "vs_roofline", "step_GB", "GB_per_s", "of_copy"):
        assert col in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["copy_bandwidth"] == {"bytes_per_s": bw, "how": "given"}
    layout = data["layout"]
    assert (layout["layers"], layout["linear_layers"], layout["softmax_layers"]) == (2, 2, [])
    # the teacher's KV: 2 layers x (k, v) x 2 kv heads x 16 x 4 B = 512 B per token
    assert layout["teacher_kv_bytes_per_token"] == 512
    (roof,) = data["rooflines"]
    W = layout["teacher_weight_bytes"]
    batch = (10**7 - W) // (512 * (16 + 8))
    assert roof["batch"] == batch > 0
    assert roof["tok_per_s"] == pytest.approx(batch * 8 * bw / (8 * W + batch * 512 * sum(range(16, 24))))
    assert data["rows"] == json.loads(json.dumps(rows))
    assert {r["model"] for r in rows} == {"teacher", "teacher static+compile", "linear"}
    for r in rows:
        assert r["roofline_tok_per_s"] == roof["tok_per_s"] and r["roofline_batch"] == batch
        assert r["vs_roofline"] == pytest.approx(r["tok_per_s"] / roof["tok_per_s"])
        assert r["of_copy"] == pytest.approx(r["step_GB"] / (r["step_ms"] / 1e3) / (bw / 1e9))
        teacher = r["model"].startswith("teacher")
        assert (r["linear_layers"], r["softmax_layers"]) == ((0, 2) if teacher else (2, 0))
    # the linear row: its weights and, in each of 2 layers, the fp32 state (2 heads x (32 x 16 + 32)) read and
    # written, the ring (8 slots x 128) and 2 sinks' k and v (2 heads x 16 each) read, the new slot (128) written
    (lin,) = [r for r in rows if r["model"] == "linear"]
    per_seq = 2 * (2 * 2 * (32 * 16 + 32) * 4 + 8 * 128 * 4 + 2 * 64 * 4 + 128 * 4)
    assert lin["step_GB"] * 1e9 == pytest.approx(layout["weight_bytes"] + per_seq)
    assert "the teacher's roofline" in sweep.summarize(rows)[0]
    assert (tmp_path / "plots" / "throughput-vs-batch.png").stat().st_size > 0


def test_sweep_of_an_export_with_a_softmax_layer(tiny_dir, tmp_path):
    """A real export (tiny Llama, window 8, 4 sinks, layer 1 kept softmax): the rows' layouts are the export's, the
    linear row is timed at the start and at the end of the generation (the softmax layer's KV grows), and its
    bytes per step count that layer's filled KV."""
    from linearize.convert.surgery import linearize_model
    from linearize.export.writer import save_linearized
    from linearize.io.loading import load_model, model_reference

    m, tok = load_model(tiny_dir)
    save_linearized(linearize_model(m, LinearAttentionConfig(window=8, softmax_layers=[1]),
                                    teacher=model_reference(tiny_dir)), tmp_path / "e", tokenizer=tok)
    rows = sweep.run_generate_sweep(model=str(tmp_path / "e"), compare=str(tiny_dir), prompt=16, lengths=(8,),
                                    max_batch=2, dtype="float32", device="cpu", models=("teacher", "linear"),
                                    warmup=1, timed=1, memory_limit=10**7, bandwidth=1e11)
    by = {(r["model"], r["batch"]): r for r in rows}
    assert set(by) == {(name, b) for name in ("teacher", "linear") for b in (1, 2)}
    for b in (1, 2):
        assert (by[("linear", b)]["linear_layers"], by[("linear", b)]["softmax_layers"]) == (1, 1)
        assert (by[("teacher", b)]["linear_layers"], by[("teacher", b)]["softmax_layers"]) == (0, 2)
        r = by[("linear", b)]
        assert r["step_ms"] == pytest.approx((r["step_start_ms"] + r["step_end_ms"]) / 2)
    # per sequence, fp32: the linear layer's state (2 heads x (32 x 16 + 32)) read and written, its ring (8 slots x
    # (2 x 2 x 16 + 2 x 32)) and 4 sinks' k and v (2 heads x 16 each) read, the new slot (128) written; the softmax
    # layer's KV (2 x 2 heads x 16 = 64 per token) at the mean context 16 + 3.5, and the new token's
    per_seq = (2 * 2 * (32 * 16 + 32) + 8 * 128 + 4 * 2 * 2 * 16 + 128 + 64 * 19.5 + 64) * 4
    student, _ = load_model(tmp_path / "e")
    weights = sum(p.numel() * 4 for n, p in student.named_parameters() if "embed_tokens" not in n)  # untied head
    for b in (1, 2):
        assert by[("linear", b)]["step_GB"] * 1e9 == pytest.approx(weights + b * per_seq)
    # the cache after the end's steps: the softmax layer holds the prompt and the 8 new tokens (moved on to there
    # after the start's 1 + 1 steps), and the end's 1 + 1
    state_ring_sinks = (2 * (32 * 16 + 32) + 8 * 128 + 4 * 2 * 2 * 16) * 4
    assert by[("linear", 2)]["cache_MiB"] * 2**20 == pytest.approx(2 * (state_ring_sinks + 64 * 4 * (16 + 8 + 2)))


def test_sweep_of_linear_rows_needs_no_teacher_weights(tiny_dir, tmp_path):
    """`bench sweep EXPORT --models linear` on an export whose teacher does not load here (a local model recorded by
    name only): the export alone gives the rows and the roofline, with the teacher's weight bytes (the export's less
    the feature maps and mix factors) equal to what the loaded teacher gives; a teacher row still needs --compare."""
    from linearize.convert.surgery import linearize_model
    from linearize.errors import ConfigError
    from linearize.export.writer import save_linearized
    from linearize.io.loading import load_model

    m, tok = load_model(tiny_dir)
    save_linearized(linearize_model(m, LinearAttentionConfig(window=8, softmax_layers=[1]), teacher="local:tiny"),
                    tmp_path / "e", tokenizer=tok)
    kw = dict(prompt=16, lengths=(8,), max_batch=1, dtype="float32", device="cpu", warmup=1, timed=1,
              memory_limit=10**7, bandwidth=1e11)
    alone = sweep.run_generate_sweep(model=str(tmp_path / "e"), models=("linear",), json_path=tmp_path / "a.json", **kw)
    named = sweep.run_generate_sweep(model=str(tmp_path / "e"), compare=str(tiny_dir), models=("linear",),
                                     json_path=tmp_path / "b.json", **kw)
    assert [r["model"] for r in alone] == ["linear"] and alone[0]["tok_per_s"] > 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["layout"]["teacher_weight_bytes"] == b["layout"]["teacher_weight_bytes"] > 0
    assert a["layout"]["teacher_weight_bytes"] < a["layout"]["weight_bytes"]  # the feature maps are the difference
    assert alone[0]["roofline_tok_per_s"] == pytest.approx(named[0]["roofline_tok_per_s"])
    with pytest.raises(ConfigError, match="does not record a teacher that loads here.*pass --compare"):
        sweep.run_generate_sweep(model=str(tmp_path / "e"), models=("teacher", "linear"), **kw)
