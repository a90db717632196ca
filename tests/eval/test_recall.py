"""Passkey and MQAR on the real stories260K teacher. The model is too small to recall a 5-digit number, so these
check what must hold whatever it scores: prompt lengths and needle depths as asked, value spans on the right
tokens, seeds, skipping past max_position_embeddings, and the scoring itself (teacher-forced exact match is what
greedy decoding produces, log-likelihoods equal a plain forward pass)."""

from __future__ import annotations

import random

import pytest
import torch

from linearize.errors import ConfigError
from linearize.eval.recall import MQAR_KEYS, mqar, mqar_prompt, passkey, passkey_prompt
from linearize.eval.scoring import score_spans

NEEDLE = "The pass key is 48213. Remember it. 48213 is the pass key."


@pytest.mark.parametrize("context", [200, 333, 512])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_length_and_depth(stories, context, depth):
    _, tok = stories
    p = passkey_prompt(tok, context, depth, "48213")
    total = len(p["context_ids"]) + len(p["answer_ids"])
    # filler grows word by word: the prompt falls short of the budget by less than one filler word (<= 6 tokens)
    assert context - 6 <= total <= context
    assert p["text"].count("48213") == 2 and p["text"].endswith("The pass key is")
    assert tok.decode(p["answer_ids"]).strip() == "48213"
    # the needle sits after round(depth * n) of the n filler words, measured on the text
    intro_end = p["text"].index("\n") + 1
    needle = p["text"].index(NEEDLE)
    needle_end = needle + len(NEEDLE)
    question = p["text"].rindex("\nWhat is the pass key?")
    before = len(p["text"][intro_end:needle].split())
    after = len(p["text"][needle_end:question].split())
    assert before + after == p["filler_words"] > 0
    assert before == round(depth * p["filler_words"]) and p["needle_char"] == needle
    # and in tokens: the filler tokens before the needle are depth x all filler tokens, within one word's tokens
    offsets = tok(p["text"], return_offsets_mapping=True)["offset_mapping"]

    def token_at(char: int) -> int:
        return next(i for i, (_, end) in enumerate(offsets) if end > char)

    before_tokens = token_at(needle) - token_at(intro_end)
    after_tokens = token_at(question) - token_at(needle_end)
    assert abs(before_tokens - depth * (before_tokens + after_tokens)) <= 6


def test_passkey_grid_skips_what_does_not_fit(stories):
    model, tok = stories
    r = passkey(model, tok, contexts=[64, 256, 512, 1024], depths=[0.0, 1.0], samples=2, seed=3)
    assert [s["context"] for s in r["skipped"]] == [64, 1024]
    assert "even without filler" in r["skipped"][0]["reason"]
    assert "max_position_embeddings=512" in r["skipped"][1]["reason"]
    assert list(r["by_context"]) == ["256", "512"] and list(r["by_depth"]) == ["0.0", "1.0"]
    assert len(r["grid"]) == 4 and all(256 - 6 <= row["tokens"] <= 512 for row in r["grid"])
    assert all(row["logprob"] < 0 for row in r["grid"]) and 0.0 <= r["acc"] <= 1.0
    # the same seed gives the same numbers, and a cell's keys do not depend on the rest of the grid
    again = passkey(model, tok, contexts=[512], depths=[1.0], samples=2, seed=3)
    cell, same = again["grid"][0], r["grid"][3]
    assert {k: v for k, v in cell.items() if k != "logprob"} == {k: v for k, v in same.items() if k != "logprob"}
    # CPU matmuls may round differently from run to run (threads): equal to float32 precision, not bit for bit
    assert cell["logprob"] == pytest.approx(same["logprob"], rel=1e-5)
    other = passkey(model, tok, contexts=[512], depths=[1.0], samples=2, seed=4)
    assert other["grid"][0]["logprob"] != again["grid"][0]["logprob"]
    with pytest.raises(ConfigError, match="between 0 and 1"):
        passkey(model, tok, contexts=[256], depths=[1.5])
    assert passkey(model, tok, contexts=[4096])["acc"] is None  # everything skipped: no accuracy, not 0


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, one full forward pass per token (no cache)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_teacher_forced_exact_match_is_greedy_decoding(stories):
    model, tok = stories
    p = passkey_prompt(tok, 300, 0.5, "70417")
    ctx = p["context_ids"]
    own = _greedy(model, ctx, 5)  # what the model writes after "The pass key is"
    other = own[:3] + [(own[3] + 1) % 512] + own[4:]
    seqs = [ctx + p["answer_ids"], ctx + own, ctx + other]
    got = score_spans(model, seqs, [[(len(ctx), len(s))] for s in seqs], batch_size=2)
    key, mine, changed = (g[0] for g in got)
    assert key.greedy == (_greedy(model, ctx, len(p["answer_ids"])) == p["answer_ids"])
    assert mine.greedy and not changed.greedy and mine.logprob > changed.logprob
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seqs[1]])).logits[0], -1)
    assert mine.logprob == pytest.approx(sum(lp[len(ctx) + i - 1, t].item() for i, t in enumerate(own)), abs=1e-4)


def test_mqar_prompt_spans_cover_the_values(stories):
    _, tok = stories
    p = mqar_prompt(tok, 6, random.Random(0))
    assert len({k for k, _ in p["pairs"]}) == 6 and {q["key"] for q in p["queries"]} == {k for k, _ in p["pairs"]}
    for q in p["queries"]:
        for lo, hi in (q["span"], q["first"]):
            assert tok.decode(p["ids"][lo:hi]).strip() == q["value"]
        assert q["distance"] == q["span"][0] - q["first"][0] > 0
    # the queries come in another order than the listing (6! orders; seed 0 does not give the identity)
    assert [q["key"] for q in p["queries"]] != [k for k, _ in p["pairs"]]
    with pytest.raises(ConfigError, match=f"between 1 and {len(MQAR_KEYS)}"):
        mqar_prompt(tok, len(MQAR_KEYS) + 1, random.Random(0))


def test_mqar_accuracy_by_pairs_and_distance(stories):
    model, tok = stories
    r = mqar(model, tok, pairs=[2, 4, 16], samples=3, seed=1)
    assert list(r["by_pairs"]) == ["2", "4"] and r["skipped"][0]["pairs"] == 16
    assert "max_position_embeddings=512" in r["skipped"][0]["reason"]
    assert sum(b["queries"] for b in r["by_distance"]) == 3 * (2 + 4)
    edges = [b["max_distance"] for b in r["by_distance"]]
    assert edges == sorted(edges) and all(e >= 16 for e in edges)
    assert r["tokens"]["2"] < r["tokens"]["4"] <= 512
    # N=4 alone gives the same prompts, so the same accuracy, as N=4 asked for with others
    assert mqar(model, tok, pairs=[4], samples=3, seed=1)["by_pairs"]["4"] == r["by_pairs"]["4"]
