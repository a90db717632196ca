"""Automatic softmax layers: size parsing, budget arithmetic, KL-guided scores on the real stories260K model, the
export and ``linearize info``, resume of the scoring pass, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from linearize.convert import pipeline, selection
from linearize.convert.config import ConvertConfig
from linearize.convert.pipeline import ConvertJob, convert
from linearize.convert.selection import budget_bytes, choose_layers, count_for_budget, extra_softmax_count
from linearize.errors import ConfigError
from linearize.models.cache import CacheGeometry
from linearize.recipes import validate_recipe
from linearize.settings import parse_bytes
from tests.conftest import linear_config, one_error_line, run_cli

# stories260K: 5 layers, 8 heads, 4 kv heads, head_dim 8, fp32
STORIES_CONFIG = {"num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
                  "hidden_size": 64}


def _geometry(**lin) -> CacheGeometry:
    return CacheGeometry.from_config(STORIES_CONFIG, linear_config(**{"window": 8, "sinks": 0, **lin}),
                                     dtype_bytes=4)


def test_parse_bytes():
    assert parse_bytes("24MiB") == 24 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("2000000") == 2_000_000
    assert parse_bytes(" 3 kib ") == 3072
    assert parse_bytes("0.3KB") == 300  # decimal, not binary floating point
    assert parse_bytes(7) == 7
    for bad in ("24 furlongs", "", "1.2.3", "-5", "MiB", True):
        with pytest.raises(ValueError, match="is not a size"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="at least 1 byte"):
        parse_bytes("0.1B")


def test_settings_parse_and_exclude_each_other():
    assert ConvertConfig.build(state_budget="24MiB").state_budget == 25_165_824
    assert ConvertConfig.build(state_budget="24MiB").model_dump()["state_budget"] == 25_165_824  # fingerprint: bytes
    with pytest.raises(ConfigError, match=r"^state_budget='24 furlongs' is not a size"):
        ConvertConfig.build(state_budget="24 furlongs")
    with pytest.raises(ConfigError) as e:
        ConvertConfig.build(auto_softmax_layers=1, state_budget="1MiB")
    assert "auto_softmax_layers=1" in str(e.value) and "state_budget=1048576" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="exclude each other"):  # a recipe's convert section: the same class
        validate_recipe({"model": "m", "output": "o", "convert": {"auto_softmax_layers": 1, "state_budget": "1MiB"}},
                        [])
    assert validate_recipe({"model": "m", "output": "o"}, ["convert.state_budget=1.5GB"]).convert.state_budget == 1.5e9
    with pytest.raises(ConfigError, match="selection_score='recall' scores the layers"):
        ConvertConfig.build(selection_score="recall", auto_window_only=False)
    with pytest.raises(ConfigError, match="selection_score='recall' scores the layers"):
        ConvertConfig.build(selection_score="recall", window=0, sinks=0)  # no window: no window-only choice
    assert ConvertConfig.build(selection_score="recall").window_only_on  # the default chooses window-only layers
    assert ConvertConfig.build(selection_score="both", auto_softmax_layers=2).selection_score == "both"
    with pytest.raises(ConfigError, match="auto_softmax_layers=-1 must be >= 0"):
        ConvertConfig.build(auto_softmax_layers=-1)
    with pytest.raises(ConfigError, match="budget_context=0 must be positive"):
        ConvertConfig.build(budget_context=0)


def test_cache_bytes_by_hand():
    g = _geometry()
    # linear layer: fp32 state 4 heads x (16*8 + 16) x 4 B = 2304; window ring 8 x (2*4*8 + 4*16) x 4 B = 4096
    assert g.linear_layer_bytes() == 2304 + 4096
    assert g.softmax_layer_bytes(4096) == 2 * 4 * 8 * 4096 * 4 == 1_048_576
    assert g.bytes_per_sequence(0, 4096) == 5 * 6400
    assert g.bytes_per_sequence(2, 4096) == 3 * 6400 + 2 * 1_048_576
    assert g.teacher_bytes(4096) == 5 * 1_048_576
    assert _geometry(sinks=4).linear_layer_bytes() == 6400 + 4 * 2 * 4 * 8 * 4  # sink keys + values per kv head


@pytest.mark.parametrize("fixed", [0, 1])
def test_budget_exactly_k_layers(fixed):
    g, context = _geometry(), 1000
    candidates = g.n_layers - fixed
    for k in range(candidates + 1):
        cost = g.bytes_per_sequence(fixed + k, context)
        assert count_for_budget(g, cost, context, fixed=fixed, candidates=candidates) == k
        if k > 0:
            assert count_for_budget(g, cost - 1, context, fixed=fixed, candidates=candidates) == k - 1
    minimum = g.bytes_per_sequence(fixed, context)
    with pytest.raises(ConfigError, match=f"give at least {minimum:,} B") as e:
        count_for_budget(g, minimum - 1, context, fixed=fixed, candidates=candidates)
    assert ("softmax_layers" in str(e.value)) == bool(fixed)


def test_count_from_settings():
    g = _geometry()
    assert extra_softmax_count(ConvertConfig(window=8), g) is None
    assert extra_softmax_count(ConvertConfig(window=8, auto_softmax_layers=2, softmax_layers=[0]), g) == 2
    with pytest.raises(ConfigError, match="leaves no linear layer.*use at most 3"):
        extra_softmax_count(ConvertConfig(window=8, auto_softmax_layers=4, softmax_layers=[0]), g)
    # softmax_layers [4] count against the budget: 4 linear + 1 softmax at 4096 = 1,074,176 B; each more +1,042,176
    cfg = ConvertConfig(window=8, softmax_layers=[4], state_budget=1_074_176 + 2 * 1_042_176)
    assert extra_softmax_count(cfg, g) == 2
    assert extra_softmax_count(cfg.replace(state_budget=cfg.state_budget - 1), g) == 1
    assert extra_softmax_count(cfg.replace(budget_context=3000), g) == 3  # shorter context: more layers fit
    with pytest.raises(ConfigError, match=r"give at least 1,074,176 B"):
        extra_softmax_count(cfg.replace(state_budget="1MiB"), g)
    with pytest.raises(ConfigError, match="whole KV cache.*5,242,880 B"):
        extra_softmax_count(ConvertConfig(window=8, state_budget="5MiB"), g)


def test_a_budget_as_a_share_of_the_teachers_kv_cache():
    g = _geometry()  # teacher KV at 4096: 5 layers x 1,048,576 B
    cfg = ConvertConfig(window=8, state_budget="50%")
    assert cfg.state_budget == "50%" and budget_bytes(cfg, g) == 2_621_440
    # 5 linear layers 32,000 B; each softmax layer +1,042,176: two fit in 2,621,440 B, three would not
    assert extra_softmax_count(cfg, g) == 2
    assert budget_bytes(cfg.replace(budget_context=2048), g) == 1_310_720  # the share follows the context
    assert budget_bytes(ConvertConfig(window=8, state_budget="1MiB"), g) == 1_048_576
    assert ConvertConfig.build(state_budget=" 12.5% ").state_budget == "12.5%"
    for bad, says in (("0%", "above 0 %"), ("100%", "below 100 %"), ("a%", "is not a share")):
        with pytest.raises(ConfigError, match=says):
            ConvertConfig.build(state_budget=bad)
    with pytest.raises(ConfigError, match="give at least 32,000 B"):  # 0.5 % of the teacher: below all-linear
        extra_softmax_count(ConvertConfig(window=8, state_budget="0.5%"), g)


def test_choose_layers():
    assert choose_layers({0: 0.1, 1: 0.5, 2: 0.3, 3: 0.5}, 2) == [1, 3]
    assert choose_layers({0: 0.2, 1: 0.2, 2: 0.1}, 1) == [0]  # ties: the lower index
    assert choose_layers({0: 0.2}, 0) == []


# ---------------------------------------------------------------------------------------------------------------
# On the real model
# ---------------------------------------------------------------------------------------------------------------
BROKEN = 3


def _job(stories_dir, out, **kw) -> ConvertJob:
    settings = {"window": 8, "sinks": 0, "batch_size": 4, "tokens": 16 * 64, "seq_len": 64, "val_tokens": 8 * 64,
                "checkpoint_every": 0, **kw}
    return ConvertJob(model=str(stories_dir), out=out, settings=ConvertConfig.build(**settings))


def _break_after_transfer(monkeypatch, *, silence_window: bool) -> None:
    """After attention transfer, layer BROKEN's feature maps make phi(q).phi(k) largest for the least similar keys
    (phi_k mirrors phi_q, sharply); with ``silence_window`` its mix factor also silences its exact-softmax window."""
    real = pipeline.run_transfer

    def transfer_then_break(model, adapter, teacher, students, *args, **kwargs):
        result = real(model, adapter, teacher, students, *args, **kwargs)
        la = students[BROKEN].linear_attn
        eye = torch.eye(la.feature_map_q.weight.shape[-1])
        with torch.no_grad():
            la.feature_map_q.weight.copy_(30 * eye)
            la.feature_map_k.weight.copy_(-30 * eye)
            la.feature_map_q.bias.zero_()
            la.feature_map_k.bias.zero_()
            if silence_window:
                la.mix_logit.fill_(-30.0)
        return result

    monkeypatch.setattr(pipeline, "run_transfer", transfer_then_break)


@pytest.fixture
def break_layer(monkeypatch):
    """Layer BROKEN broken whole: its linear part and its window (see :func:`_break_after_transfer`)."""
    _break_after_transfer(monkeypatch, silence_window=True)


def _report(out) -> dict:
    return json.loads((out / "transfer_report.json").read_text())


def test_broken_layer_scores_highest_and_stays_softmax(stories_dir, tmp_path, break_layer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import linearize  # noqa: F401  (registers the linearized classes)

    out = convert(_job(stories_dir, tmp_path / "auto", auto_softmax_layers=1, tokens=4096, auto_window_only=False),
                  log=lambda m: None)
    sel = _report(out)["selection"]
    scores = {int(i): v for i, v in sel["scores"].items()}
    assert sorted(scores) == [0, 1, 2, 3, 4]
    assert max(scores, key=scores.get) == BROKEN and sel["chosen"] == [BROKEN] == sel["softmax_layers"]
    assert scores[BROKEN] > 2 * max(v for i, v in scores.items() if i != BROKEN) > 0
    assert sel["kl_all_linear"] == pytest.approx(sel["trained_all_linear"]["kl"])
    # exact_softmax on the student's q/k/v == the teacher's own module in that layer (what the export holds)
    assert _report(out)["trained"]["kl"] == pytest.approx(sel["kl_with_softmax"][str(BROKEN)], rel=1e-4)
    assert sel["bytes_per_sequence"] == 4 * 6400 + 1_048_576 and sel["teacher_kv_bytes"] == 5 * 1_048_576

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.linearize["softmax_layers"] == [BROKEN]
    assert sorted(model.linear_attention_modules()) == [0, 1, 2, 4]
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok("Once upon a time", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 12
    with torch.no_grad():  # the cached decode (softmax KV + recurrent states) matches a full forward
        logits = model(gen, use_cache=False).logits
    n = enc["input_ids"].shape[1]
    assert torch.equal(logits[0, n - 1 : -1].argmax(-1), gen[0, n:])

    # the counted bytes are what the generation cache holds: 40 tokens through the model, cache read back
    from linearize.models.cache import cache_nbytes

    lin = model.linear_config  # what the export recorded (window 8, no sinks, layer BROKEN softmax)
    with torch.no_grad():
        cache = model(torch.randint(3, 500, (1, 40)), use_cache=True).past_key_values
    assert cache_nbytes(cache) == CacheGeometry.from_config(STORIES_CONFIG, lin, 4).bytes_per_sequence(1, 40)

    info = run_cli("info", out)
    assert info.returncode == 0, info.stderr
    assert f"({sel['bytes_per_sequence']:,} B) per sequence" in info.stdout
    assert f"({sel['teacher_kv_bytes']:,} B)" in info.stdout and "4 linear, 1 softmax [3]" in info.stdout


def test_budget_chooses_as_many_as_fit(stories_dir, tmp_path, break_layer):
    # explicit layer 0 + two chosen layers at 2048 tokens, to the byte: 2 linear + 3 softmax
    budget = 2 * 6400 + 3 * (2 * 4 * 8 * 2048 * 4)
    out = convert(_job(stories_dir, tmp_path / "budget", softmax_layers=[0], state_budget=str(budget),
                       budget_context=2048, tokens=4096), log=lambda m: None)
    sel = _report(out)["selection"]
    assert sel["mode"] == "state_budget" and sel["count"] == 2 and sorted(map(int, sel["scores"])) == [1, 2, 3, 4]
    assert BROKEN in sel["chosen"] and sel["softmax_layers"] == sorted({0, *sel["chosen"]})
    assert sel["bytes_per_sequence"] == budget == sel["state_budget"]
    assert json.loads((out / "config.json").read_text())["linearize"]["softmax_layers"] == sel["softmax_layers"]


def test_scoring_resumes_after_a_kill(stories_dir, tmp_path, monkeypatch):
    ref = _report(convert(_job(stories_dir, tmp_path / "ref", auto_softmax_layers=2, auto_window_only=False), log=lambda m: None))
    real, calls, killing = selection.compare_to_teacher, [], [True]

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if killing and len(calls) == 3:
            raise KeyboardInterrupt("killed while scoring")
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "compare_to_teacher", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert(_job(stories_dir, tmp_path / "res", auto_softmax_layers=2, auto_window_only=False), log=lambda m: None)
    work = tmp_path / ".res.work"
    assert sorted(p.name for p in work.glob("kl-softmax-layer-*.json")) == ["kl-softmax-layer-0.json",
                                                                             "kl-softmax-layer-1.json"]
    calls.clear()
    killing.clear()
    got = _report(convert(_job(stories_dir, tmp_path / "res", auto_softmax_layers=2, auto_window_only=False), log=lambda m: None))
    assert len(calls) == 3  # layers 2, 3, 4 only
    assert got["selection"]["chosen"] == ref["selection"]["chosen"]
    for i, v in ref["selection"]["scores"].items():
        assert got["selection"]["scores"][i] == pytest.approx(v, rel=1e-4, abs=1e-6)
    assert not work.exists()


def test_cli_auto_softmax_layers_end_to_end(stories_dir, tmp_path):
    r = run_cli("convert", stories_dir, "--auto-softmax-layers", 1, "--window", 8, "--tokens", 512, "--seq-len", 64,
                "--val-tokens", 256, "--batch-size", 4, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-3000:]
    sel = _report(tmp_path / "o")["selection"]
    assert len(sel["chosen"]) == 1 and f"softmax layers: {sel['softmax_layers']}" in r.stdout
    assert json.loads((tmp_path / "o" / "config.json").read_text())["linearize"]["softmax_layers"] == sel["chosen"]


def test_cli_errors_are_one_line(stories_dir, tmp_path):
    line = one_error_line(run_cli("convert", stories_dir, "--auto-softmax-layers", 1, "--state-budget", "1MiB",
                                   "--out", tmp_path / "o"))
    assert "auto_softmax_layers" in line and "state_budget" in line
    line = one_error_line(run_cli("convert", stories_dir, "--state-budget", "lots", "--out", tmp_path / "o"))
    assert "state_budget='lots' is not a size" in line
    line = one_error_line(run_cli("convert", stories_dir, "--state-budget", "20KiB", "--window", 8, "--sinks", 0,
                                   "--out", tmp_path / "o"))
    assert "give at least 32,000 B" in line  # 5 linear layers x 6,400 B
    line = one_error_line(run_cli("convert", stories_dir, "--state-budget", "20KiB", "--window", 8,
                                   "--out", tmp_path / "o"))
    assert "give at least 37,120 B" in line  # + the default 4 sinks' keys and values: 4 x 2 x 4 heads x 8 x 4 B
    assert not (tmp_path / "o").exists()


def test_copy_sequences_repeat_the_head_far_beyond_the_window():
    blocks = torch.arange(3 * 64).view(3, 64)
    probes, (start, stop) = selection.copy_sequences(blocks)
    assert probes.shape == (3, 64) and (start, stop) == (56, 64)
    assert torch.equal(probes[:, 56:], blocks[:, :8]) and torch.equal(probes[:, :8], blocks[:, :8])
    assert torch.equal(probes[1, 8:56], blocks[0, 8:56])  # the filler comes from another block
    with pytest.raises(ConfigError, match="recall scoring needs"):
        selection.copy_sequences(blocks[:, :2])


def test_long_copy_probes_join_the_next_blocks():
    """recall_context beyond the block length: block i's head, then blocks i+1, i+2, ... from their starts, then
    the head again; the head's tokens appear nowhere in between."""
    blocks = torch.arange(6 * 64).view(6, 64)
    probes, (start, stop) = selection.copy_sequences(blocks, 160)
    assert probes.shape == (6, 160) and (start, stop) == (152, 160)
    for i in range(6):
        assert torch.equal(probes[i, :8], blocks[i, :8]) and torch.equal(probes[i, 152:], blocks[i, :8])
        want = torch.cat([blocks[(i + 1) % 6], blocks[(i + 2) % 6], blocks[(i + 3) % 6, :16]])
        assert torch.equal(probes[i, 8:152], want)
        assert not torch.isin(blocks[i, :8], probes[i, 8:152]).any()
    with pytest.raises(ConfigError, match="only 3 blocks: raise val_tokens to at least 256"):
        selection.copy_sequences(blocks[:3], 160)
    with pytest.raises(ConfigError, match="recall_context=128 sets the recall probes' length"):
        ConvertConfig.build(recall_context=128)
    with pytest.raises(ConfigError, match="recall_context"):
        ConvertConfig.build(recall_context=0, selection_score="recall")


def test_too_few_held_out_blocks_for_long_probes_fail_before_any_work(stories_dir, tmp_path):
    assert selection.recall_blocks_needed(160, 64) == 4 and selection.recall_blocks_needed(64, 64) == 2
    with pytest.raises(ConfigError, match=r"--recall-context 160 joins 4 held-out blocks of --seq-len 64 per probe, "
                                          r"but --val-tokens gives about 2: raise --val-tokens to at least 256"):
        convert(_job(stories_dir, tmp_path / "few", selection_score="recall", recall_context=160, val_tokens=128),
                log=lambda m: None)
    assert not (tmp_path / "few").exists() and not (tmp_path / ".few.work").exists()


def test_window_only_choice_with_long_recall_probes(stories_dir, tmp_path, break_features):
    out = convert(_job(stories_dir, tmp_path / "long", tokens=2048, selection_score="recall", recall_context=160),
                  log=lambda m: None)
    wo = _report(out)["window_only"]
    assert wo["score_kind"] == "recall" and wo["recall_probe_tokens"] == 160
    assert BROKEN in wo["chosen"] and wo["score"] < wo["base"]


@pytest.mark.parametrize("score", ["recall", "both"])
def test_recall_scores_choose_the_broken_layer_and_are_reported(stories_dir, tmp_path, break_layer, score):
    out = convert(_job(stories_dir, tmp_path / score, auto_softmax_layers=1, tokens=4096, selection_score=score),
                  log=lambda m: None)
    sel = _report(out)["selection"]
    assert sel["score"] == score and sel["chosen"] == [BROKEN] and sel["recall_probe_tokens"] == 64  # seq_len
    recall = {int(i): sel["recall_all_linear"] - v for i, v in sel["recall_with_softmax"].items()}
    assert sel["recall_all_linear"] > 0 and max(recall, key=recall.get) == BROKEN
    scores = {int(i): v for i, v in sel["scores"].items()}
    if score == "recall":
        assert scores == pytest.approx(recall)
    else:  # each kind's recovered share of its all-linear KL, summed
        kl = {int(i): (sel["kl_all_linear"] - v) / sel["kl_all_linear"] for i, v in sel["kl_with_softmax"].items()}
        assert scores == pytest.approx({i: kl[i] + recall[i] / sel["recall_all_linear"] for i in recall})


# ---------------------------------------------------------------------------------------------------------------
# Window-only layers (auto_window_only)
# ---------------------------------------------------------------------------------------------------------------
def test_greedy_window_only_keeps_a_layer_only_while_the_score_falls():
    # the score of a set: a base of 10, each layer's own effect, and layers 1 and 2 together 1.5 worse than alone
    own = {0: 0.5, 1: -2.0, 2: -1.0, 3: -0.25, 4: -1.0}
    measured = []

    def objective(off):
        measured.append(off)
        return 10 + sum(own[i] for i in off) + (1.5 if {1, 2} <= off else 0)

    out = selection.greedy_window_only(objective, [0, 1, 2, 3, 4])
    assert out["base"] == 10 and out["alone"] == {i: 10 + v for i, v in own.items()}
    # tried in the order 1, 2, 4 (ties: lower index), 3: adding 2 to {1} gives 8.5 > 8, refused
    assert out["chosen"] == [1, 3, 4] and out["score"] == 10 - 2 - 1 - 0.25
    assert measured[6:] == [frozenset({1, 2}), frozenset({1, 4}), frozenset({1, 3, 4})]  # {1} was measured alone
    assert selection.greedy_window_only(lambda off: 1.0 + len(off), [0, 1])["chosen"] == []


def test_window_only_settings():
    assert ConvertConfig.build(auto_window_only=True, selection_score="both").selection_score == "both"
    # null (the default): on where there is a window and the transfer trains; off without either, with no error
    assert ConvertConfig.build().auto_window_only is None and ConvertConfig.build().window_only_on
    assert not ConvertConfig.build(tokens=0).window_only_on
    assert not ConvertConfig.build(window=0, sinks=0).window_only_on
    assert not ConvertConfig.build(auto_window_only=False).window_only_on
    assert ConvertConfig.build(auto_window_only=True, tokens=0).window_only_on
    with pytest.raises(ConfigError, match="auto_window_only needs window > 0"):
        ConvertConfig.build(auto_window_only=True, window=0, sinks=0)


@pytest.fixture
def break_features(monkeypatch):
    """Only layer BROKEN's linear part broken; its window keeps its weight (see :func:`_break_after_transfer`)."""
    _break_after_transfer(monkeypatch, silence_window=False)


def test_auto_window_only_switches_off_the_broken_linear_part(stories_dir, tmp_path, break_features):
    from transformers import AutoModelForCausalLM

    out = convert(_job(stories_dir, tmp_path / "wo", window_only_layers=[0], tokens=2048),  # the default: on
                  log=lambda m: None)
    report = _report(out)
    wo = report["window_only"]
    assert wo["explicit"] == [0] and sorted(map(int, wo["alone"])) == [1, 2, 3, 4]  # layer 0 was no candidate
    assert BROKEN in wo["chosen"] and wo["window_only_layers"] == sorted({0, *wo["chosen"]})
    assert wo["score"] < wo["base"] / 2 and wo["score"] <= min(wo["alone"].values())
    assert wo["base"] == pytest.approx(wo["trained"]["kl"], rel=1e-4)  # with layer 0 already off
    assert report["trained"]["kl"] == pytest.approx(wo["score"], rel=1e-4)  # the exported model
    assert json.loads((out / "config.json").read_text())["linearize"]["window_only_layers"] == wo["window_only_layers"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [i for i, m in model.linear_attention_modules().items() if m.linear_attn.linear_off] == \
        wo["window_only_layers"]
    info = run_cli("info", out)
    assert info.returncode == 0 and f"window-only {wo['window_only_layers']}" in info.stdout, info.stderr
