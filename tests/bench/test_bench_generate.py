"""`linearize bench generate` on CPU with a tiny Llama geometry: the benchmark runs every row and its memory
columns say what the cache design promises (constant for the linearized model, growing for the teacher)."""

from __future__ import annotations

import json

import pytest

from linearize.bench.generate import run_generate_bench
from tests.conftest import tiny_bench_geometry


def test_generate_bench_runs_and_linear_cache_is_constant(tmp_path):
    cfg = tiny_bench_geometry()
    rows = run_generate_bench(batch_sizes=(2,), prompt_lens=(24, 48), new_tokens=4, window=8, dtype="float32",
                              device="cpu", config=cfg, json_path=str(tmp_path / "g.json"))
    assert len(rows) == 10 and all("step_ms" in r and "note" not in r for r in rows), rows  # every row ran (speed
    # is the GPU's to measure: no timing is asserted here)
    by = {(r["model"], r["prompt"]): r for r in rows}
    # linearized, per sequence (batch 2): 2 layers x 2 kv heads x (F*D + F) fp32 + rings of 8 (k, v: 16 each;
    # phi(k): 32) in fp32 + the default 4 sinks' k and v per kv head
    expected = 2 * (2 * 2 * (32 * 16 + 32) * 4 + 2 * 8 * (2 * 2 * 16 + 2 * 32) * 4 + 2 * 4 * 2 * 2 * 16 * 4)
    for name in ("linear torch", "linear triton"):
        assert by[(name, 24)]["cache_MiB"] * 2**20 == pytest.approx(expected)
        assert by[(name, 48)]["cache_MiB"] == by[(name, 24)]["cache_MiB"]
    # teacher: batch 2 x 2 layers x (k + v) x 2 kv heads x 16 x tokens (prompt + 4 fed steps) x 4 bytes
    assert by[("teacher", 48)]["cache_MiB"] * 2**20 == pytest.approx(2 * 2 * 2 * 2 * 16 * (48 + 4) * 4)
    # through generate(): the linear cache is the same constant; the static cache is sized for every token fed
    # (prompt + 3: the 4th new token is never fed back)
    assert by[("linear triton generate", 48)]["cache_MiB"] * 2**20 == pytest.approx(expected)
    assert by[("teacher static+compile", 48)]["cache_MiB"] * 2**20 == pytest.approx(2 * 2 * 2 * 2 * 16 * (48 + 3) * 4)
    assert json.loads((tmp_path / "g.json").read_text())["rows"] == json.loads(json.dumps(rows))  # marked as ours


def test_generate_bench_adds_the_compiled_rows_when_asked():
    """``compile_decode``: the Triton rows again with the model's compiled decode step (on CPU no decode graph
    applies, so nothing compiles here and the rows run the same step; the GPU measures the difference)."""
    cfg = tiny_bench_geometry()
    rows = run_generate_bench(batch_sizes=(1,), prompt_lens=(16,), new_tokens=3, window=8, dtype="float32",
                              device="cpu", config=cfg, compile_decode=True)
    assert [r["model"] for r in rows] == ["teacher", "linear torch", "linear triton", "linear triton compiled",
                                          "teacher static+compile", "linear triton generate",
                                          "linear triton generate compiled"]
    assert all("step_ms" in r and "note" not in r for r in rows), rows
    by = {r["model"]: r for r in rows}
    assert by["linear triton compiled"]["cache_MiB"] == by["linear triton"]["cache_MiB"]
    assert by["linear triton generate compiled"]["cache_MiB"] == by["linear triton generate"]["cache_MiB"]


def test_generate_bench_on_a_real_export_and_its_recorded_teacher(tmp_path):
    """stories260K (real weights) converted untrained: the teacher comes from the export's config; the linear
    cache matches the export's geometry, the teacher's KV grows with the prompt."""
    pytest.importorskip("triton", reason="triton is not installed (the Triton row needs it, via the interpreter)")
    from tests.conftest import STORIES

    if not STORIES.is_dir():
        pytest.skip(f"real stories260K model not found at {STORIES}")
    from linearize.convert.surgery import linearize_model
    from linearize.export.writer import save_linearized
    from linearize.io.loading import load_model, model_reference
    from linearize.models.cache import cache_bytes_per_sequence
    from linearize.modules.attention import LinearAttentionConfig

    m, tok = load_model(STORIES)
    save_linearized(linearize_model(m, LinearAttentionConfig(window=8), teacher=model_reference(STORIES)),
                    tmp_path / "e", tokenizer=tok)
    rows = run_generate_bench(batch_sizes=(1,), prompt_lens=(16, 32), new_tokens=2, dtype="float32", device="cpu",
                              model=str(tmp_path / "e"))
    by = {(r["model"], r["prompt"]): r for r in rows}
    c = m.config
    state, win = cache_bytes_per_sequence(linear_layers=c.num_hidden_layers, num_state_heads=c.num_key_value_heads,
                                          num_kv_heads=c.num_key_value_heads, feature_dim=2 * c.head_dim,
                                          head_dim=c.head_dim, window=8, dtype_bytes=4, sinks=4)  # the default
    assert by[("linear torch", 32)]["cache_MiB"] * 2**20 == pytest.approx(state + win)
    assert by[("linear torch", 16)]["cache_MiB"] == by[("linear torch", 32)]["cache_MiB"]
    assert "fused Triton kernel supports head dim" in by[("linear triton", 16)]["note"]  # stories: head dim 8
    kv = lambda T: 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (T + 2) * 4  # noqa: E731
    assert by[("teacher", 32)]["cache_MiB"] * 2**20 == pytest.approx(kv(32))
