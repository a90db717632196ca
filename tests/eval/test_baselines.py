"""The baselines of ``linearize eval`` (issue #27) and perplexity by distance:

- ``linear_part_off`` in prefill + decode generation: the cache built inside the block holds an empty state, and the
  logits equal those of the same model whose phi(k) is zero (a T2R key map with zero weights);
- the linear-off row: differs from the model's when the linear part is read, equals it when the window covers every
  sequence (nothing ever reaches the state);
- the streaming row (the teacher cut to the model's sinks + window): equals the teacher's own numbers when the window
  covers every sequence, differs when it is short, and for an untrained export (the teacher's weights) equals the
  linear-off row;
- the distance buckets: per-token losses by window position, summing to the non-overlapping pass, each bucket the
  losses of a plain forward at those positions.

A tiny random Llama for generation, untrained linearized exports of the real stories260K model (a random model's
near-uniform predictions barely move when its attention changes) and the stories260K export of ``eval_run``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from linearize.eval import EvalConfig, render_table, run_eval
from linearize.modules.attention import linear_attention_layers, linear_part_off
from tests.conftest import linear_config, tiny_model


def _zero_key_map(model):
    """A copy of ``model`` whose phi(k) is zero everywhere: T2R's ReLU(k W + b) with W = 0, b = 0."""
    other = copy.deepcopy(model)
    for la in linear_attention_layers(other):
        assert la.settings.feature_map == "t2r"
        with torch.no_grad():
            la.feature_map_k.weight.zero_()
            la.feature_map_k.bias.zero_()
    return other


def _generate(model, ids, new_tokens=10):
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1), out.past_key_values


def test_linear_part_off_in_prefill_and_decode(one_torch_thread):
    from linearize.convert.surgery import linearize_model

    torch.manual_seed(0)
    model = linearize_model(tiny_model("llama"), linear_config(feature_map="t2r", window=4, sinks=2))
    with torch.no_grad():  # T2R's identity start would zero about half the features anyway: make them all count
        for la in linear_attention_layers(model):
            la.feature_map_k.bias.fill_(1.0)
            la.feature_map_q.bias.fill_(1.0)
    zero_k = _zero_key_map(model)
    ids = torch.randint(3, 96, (2, 13))
    with torch.no_grad():
        seq_on, logits_on, cache_on = _generate(model, ids)
        with linear_part_off(linear_attention_layers(model)):
            seq_off, logits_off, cache_off = _generate(model, ids)
            parallel_off = model(seq_off, use_cache=False).logits
        seq_ref, logits_ref, cache_ref = _generate(zero_k, ids)
        parallel_ref = zero_k(seq_ref, use_cache=False).logits
    assert not any(la.linear_off for la in linear_attention_layers(model))  # switched back on after the block
    # the linear part matters here: with it the logits move
    assert (logits_on - logits_ref).abs().max() > 1e-2
    assert all(bool(layer.state()[0].abs().max() > 0) for layer in cache_on.layers)
    # inside the block: the model whose phi(k) is zero, prefill + decode and the parallel forward alike
    assert torch.equal(seq_off, seq_ref)
    torch.testing.assert_close(logits_off, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parallel_off, parallel_ref, rtol=1e-5, atol=1e-5)
    # the cache built inside the block keeps no state at all after 13 + 10 tokens (window 4, sinks 2): window-only
    # layers' caches hold the window's keys and values and the sinks, and are smaller than the zero-key model's
    assert cache_off.get_seq_length() == cache_ref.get_seq_length() == 13 + 10 - 1
    for layer, ref in zip(cache_off.layers, cache_ref.layers):
        assert layer.has_state() and not layer.linear and layer.state() is None and layer.fk_ring is None
        assert ref.linear and ref.state()[0].abs().max() == 0  # phi(k) zero: an empty state, allocated
        assert 0 < layer.nbytes() < ref.nbytes()


def _export(teacher, out, *, window, sinks=0, **attn):
    """An untrained linearized export of ``teacher`` (its weights; hedgehog maps and mix at their start)."""
    from linearize.convert.surgery import linearize_model
    from linearize.export.writer import save_linearized
    from linearize.io.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model(teacher)
    linearize_model(model, linear_config(window=window, sinks=sinks, **attn), teacher=str(teacher))
    return save_linearized(model, out, tokenizer=tok)


def _stories_eval(export, stories_dir, text, **kw):
    """ppl (blocks of 64) and distance (blocks of 128) on the first 1,024 tokens of ``text``, the export against
    stories260K: sequences of at most 128 tokens."""
    cfg = EvalConfig(model=str(export), compare=str(stories_dir), text=str(text), tasks=["ppl", "distance"],
                     context=64, stride=64, max_tokens=1024, distance_context=128, distance_tokens=1024, **kw)
    return run_eval(cfg)


def _values(result, side):
    """metric -> value of one column, the state row and empty cells left out."""
    return {row["metric"]: row[side] for row in result["summary"]
            if not row["metric"].startswith("state") and row[side] is not None}


@pytest.fixture
def wiki_file(wiki_text, tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(wiki_text[:12000])
    return path


def test_baselines_equal_model_and_teacher_when_the_window_covers_every_sequence(stories_dir, wiki_file, tmp_path,
                                                                                 one_torch_thread):
    export = _export(stories_dir, tmp_path / "w256", window=256, sinks=2)  # >= 128, the longest sequence scored
    result = _stories_eval(export, stories_dir, wiki_file)
    assert list(result["baselines"]) == ["linear-off", "streaming"] and result["baselines_skipped"] == {}
    model, teacher = _values(result, "model"), _values(result, "teacher")
    off, streaming = _values(result, "linear-off"), _values(result, "streaming")
    assert len(model) == 4  # ppl, distance over all blocks, buckets 0-63 and 64-127; no token gets beyond 258
    assert result["model"]["distance"]["beyond"] == {"from": 258, "tokens": 0, "nll": 0.0, "ppl": None}
    assert off == pytest.approx(model, rel=1e-6)  # nothing ever reaches the state: nothing to switch off
    assert streaming == pytest.approx(teacher, rel=1e-5)  # the window holds every key: softmax attention (eps apart)
    info = result["baselines"]["streaming"]["info"]
    assert info["name"].endswith("(streaming: 2 sinks + window 256)") and info["linearized"]


def test_baselines_differ_when_the_window_is_short(stories_dir, wiki_file, tmp_path, one_torch_thread):
    export = _export(stories_dir, tmp_path / "w8", window=8, sinks=2)
    result = _stories_eval(export, stories_dir, wiki_file)
    model, teacher = _values(result, "model"), _values(result, "teacher")
    off, streaming = _values(result, "linear-off"), _values(result, "streaming")
    beyond = "distance ppl pos >=10 (beyond window)"
    assert result["model"]["distance"]["beyond"]["tokens"] == 8 * (126 - 10 + 1)  # 8 windows, positions 0..126
    for metric in ("ppl wiki.txt", "distance ppl @128 blocks", beyond):
        assert off[metric] != pytest.approx(model[metric], rel=1e-2), metric
        assert streaming[metric] != pytest.approx(teacher[metric], rel=1e-2), metric
    # an untrained export has the teacher's weights and its mix at the start: its exact part is the streaming teacher
    assert off == pytest.approx(streaming, rel=1e-5)
    first = result["model"]["distance"]["by_position"][0]
    assert (first["from"], first["to"], first["tokens"]) == (0, 63, 8 * 64)
    table = render_table(result)
    assert [c.header for c in table.columns][-2:] == ["linear-off", "streaming"]
    rows = [r["metric"] for r in result["summary"]]
    assert list(table.columns[-1].cells)[rows.index(beyond)] == f"{streaming[beyond]:.4g}"


def test_streaming_baseline_of_a_global_cache_keeps_as_many_exact_keys(stories_dir, wiki_file, tmp_path,
                                                                       one_torch_thread):
    """A model with a global cache of K pairs is set against StreamingLLM with K more window keys (equal memory in
    exact keys): the same baseline as for a model of window W + K without one."""
    gc = _stories_eval(_export(stories_dir, tmp_path / "gc", window=8, sinks=2, global_cache=4), stories_dir,
                       wiki_file)
    wide = _stories_eval(_export(stories_dir, tmp_path / "w12", window=12, sinks=2), stories_dir, wiki_file)
    info = gc["baselines"]["streaming"]["info"]
    assert info["name"].endswith("(streaming: 2 sinks + window 12)")
    a, b = _values(gc, "streaming"), _values(wide, "streaming")
    shared = [m for m in a if "beyond window" not in m]  # "beyond" starts at each model's own sinks + window
    assert len(shared) == 4 and {m: a[m] for m in shared} == pytest.approx({m: b[m] for m in shared}, rel=1e-6)
    off = _values(gc, "linear-off")  # the model's own exact part: 8 window keys and 4 members, not 12 window keys
    assert {m: a[m] for m in shared} != pytest.approx({m: off[m] for m in shared}, rel=1e-3)


def test_baselines_that_cannot_run_are_skipped_with_the_reason(tiny_dir, tmp_path, one_torch_thread):
    from tests.conftest import RecordingProgress

    data = tiny_dir.parent / "data.txt"
    cfg = EvalConfig(model=str(tiny_dir), text=str(data), tasks=["ppl"], context=64, stride=64, max_tokens=256)
    progress = RecordingProgress()
    softmax = run_eval(cfg, progress)
    assert softmax["baselines"] == {}
    assert softmax["baselines_skipped"] == {
        "linear-off": "the model is not linearized: it has no linear part to switch off",
        "streaming": "no teacher to cut to the model's sinks + window (pass compare)"}
    assert "linear-off baseline skipped: the model is not linearized: it has no linear part to switch off" in \
        progress.logs
    assert set(softmax["summary"][0]) == {"metric", "model", "teacher", "better"}
    pure = _export(tiny_dir, tmp_path / "w0", window=0)
    result = run_eval(cfg.model_copy(update={"model": str(pure), "compare": str(tiny_dir)}))
    assert set(result["baselines_skipped"]) == {"linear-off", "streaming"} and result["baselines"] == {}
    assert "no window" in result["baselines_skipped"]["streaming"]
    none = run_eval(cfg.model_copy(update={"model": str(pure), "baselines": []}))
    assert none["baselines"] == none["baselines_skipped"] == {}


def test_distance_buckets_sum_to_the_non_overlapping_pass(stories, wiki_text):
    from linearize.eval.perplexity import distance_perplexity, text_perplexity

    model, tok = stories
    text = wiki_text[:12000]
    got = distance_perplexity(model, tok, text, context=256, max_tokens=1500, beyond=40, batch_size=4)
    whole = text_perplexity(model, tok, text, context=256, stride=256, max_tokens=1500)
    assert got["tokens"] == whole["tokens"] == 1500 - 6 and got["windows"] == whole["windows"] == 6
    assert got["nll"] == pytest.approx(whole["nll"], rel=1e-6) and got["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)
    buckets = got["by_position"]
    assert [(b["from"], b["to"]) for b in buckets] == [(0, 63), (64, 127), (128, 255)]
    # five full windows (query positions 0..254) and one of 220 tokens (0..218)
    assert [b["tokens"] for b in buckets] == [6 * 64, 6 * 64, 5 * 127 + 91]
    assert sum(b["nll"] for b in buckets) == pytest.approx(whole["nll"], rel=1e-6)
    assert got["beyond"]["from"] == 40 and got["beyond"]["tokens"] == 5 * (255 - 40) + (219 - 40)
    # each bucket holds the losses at its own positions: a plain forward over the first window
    ids = tok(text)["input_ids"][:256]
    first = distance_perplexity(model, tok, text, context=256, max_tokens=256)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    losses = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")  # [255]: query position p -> p + 1
    for b in first["by_position"]:
        assert b["nll"] == pytest.approx(losses[b["from"] : b["to"] + 1].sum().item(), rel=1e-5), b


def test_real_export_baselines(eval_run):
    """The stories260K export (window 16, no sinks, untrained) against its teacher: the streaming teacher is the
    export's own exact part, on every task."""
    cfg, result = eval_run
    assert list(result["baselines"]) == ["linear-off", "streaming"]
    assert set(result["baselines"]["streaming"]) == set(result["model"])  # the same tasks, info and seconds
    off, streaming = result["baselines"]["linear-off"], result["baselines"]["streaming"]
    assert streaming["info"]["name"].endswith("(streaming: 0 sinks + window 16)")
    for side in (result["model"], result["teacher"], off, streaming):
        assert side["distance"]["context"] == 512 and side["distance"]["beyond"]["from"] == 16
    for row in result["summary"]:
        if not row["metric"].startswith("state"):
            assert row["linear-off"] == pytest.approx(row["streaming"], rel=1e-4, abs=1e-6), row
    assert off["ppl"]["ppl"] != pytest.approx(result["model"]["ppl"]["ppl"], rel=1e-3)


def test_config_baselines_and_distance_settings():
    from typer.testing import CliRunner

    import linearize.cli.main as cli
    from linearize.errors import ConfigError

    assert EvalConfig().baselines == ["linear-off", "streaming"]
    for none in ("none", ["none"], [], None):
        assert EvalConfig(baselines=none).baselines == []
    with pytest.raises(ConfigError, match="baselines"):
        EvalConfig.build(baselines=["streamingllm"])
    assert EvalConfig(model="m", text="t.txt").selected_tasks == ["ppl", "distance", "passkey", "mqar"]
    with pytest.raises(ConfigError) as err:
        EvalConfig(model="m", tasks=["distance"], distance_context=1, distance_tokens=0).check()
    for phrase in ("tasks includes distance but text is not set", "distance_context=1 must be >= 2",
                   "distance_tokens=0 must be >= 2"):
        assert phrase in str(err.value)
    cli._register_setting_verbs()
    runner = CliRunner()
    help_text = " ".join(runner.invoke(cli.app, ["eval", "--help"], env={"COLUMNS": "200"}).output.split())
    for flag in ("--baselines", "--distance-context", "--distance-tokens"):
        assert flag in help_text
    assert "linear-off (model, linear part off), streaming (compare at its window). (default: linear-off,streaming)" \
        in help_text
    r = runner.invoke(cli.app, ["eval", "m", "--baselines", "streamingllm"])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error:") and "baselines" in r.stderr
