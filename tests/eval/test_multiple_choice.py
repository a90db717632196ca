"""Multiple choice / schema / cloze scoring on the real stories260K teacher: layouts from record keys, the lm-eval
split of context and continuation, per-option log-likelihoods equal to a plain unbatched forward pass, and greedy
match on the model's own continuations (acc 1) against wrong ones (acc 0). The comparison with lm-eval itself is in
test_lm_eval_parity.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from linearize.errors import DataError
from linearize.eval.multiple_choice import detect_layout, encode_pair, evaluate_task, join_pair, load_task


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_shipped_files_and_layouts(icl, tmp_path):
    assert load_task(icl / "piqa.jsonl", limit=3)[0] == "multiple_choice"
    assert load_task(icl / "arc_easy.jsonl")[0] == "multiple_choice"
    layout, records = load_task(icl / "winogrande.jsonl", limit=5)
    assert layout == "schema" and len(records) == 5
    cloze = _write(tmp_path / "cloze.jsonl", [{"context": "The cat sat on the", "continuation": "mat"}])
    assert load_task(cloze)[0] == "language_modeling"
    extra = _write(tmp_path / "extra.jsonl", [{"query": "Q", "choices": ["a", "b"], "gold": 1, "category": "x"}])
    assert load_task(extra)[1][0]["category"] == "x"


@pytest.mark.parametrize("records,match", [
    ([{"question": "Q", "answers": ["a", "b"]}], "match no task layout; accepted: multiple_choice"),
    ([{"query": "Q", "choices": ["a", "b"], "gold": 2}], r"gold=2 must be an option index in 0\.\.1"),
    ([{"query": "Q", "choices": ["a", "b"], "gold": True}], "gold=True"),
    ([{"query": "Q", "choices": ["a"], "gold": 0}], "at least 2"),
    ([{"query": "Q", "choices": ["a", "b"], "gold": 0}, {"context": "c", "continuation": "d"}], "keep one layout"),
    ([{"context": "c", "continuation": ""}], "non-empty"),
    ([], "holds no records"),
], ids=["unknown-keys", "gold-range", "gold-bool", "one-option", "mixed", "empty-continuation", "empty-file"])
def test_bad_task_files_are_data_errors(tmp_path, records, match):
    with pytest.raises(DataError, match=match):
        load_task(_write(tmp_path / "t.jsonl", records))


def test_unreadable_task_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"query": "Q"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1 is not valid JSON"):
        load_task(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="keys"):
        detect_layout({"text": "x"})


def test_join_keeps_existing_whitespace():
    assert join_pair("Question: Why?", "Because.") == ("Question: Why?", " Because.")
    assert join_pair("Question: Why?\n", "Because.") == ("Question: Why?\n", "Because.")  # PIQA's queries
    assert join_pair("The cat sat on the", " mat") == ("The cat sat on the", " mat")  # already carries its space
    assert join_pair("Q", "A", delimiter="\nAnswer: ") == ("Q", "\nAnswer: A")


def test_encode_pair_splits_one_encoding(stories):
    _, tok = stories
    ctx, cont = encode_pair(tok, "The cat sat on the", " mat")
    assert ctx + cont == tok("The cat sat on the mat")["input_ids"] and ctx[0] == tok.bos_token_id
    assert ctx == tok("The cat sat on the")["input_ids"]
    # trailing whitespace of the context moves to the continuation: the same tokens either way
    assert encode_pair(tok, "The cat sat on the ", "mat") == (ctx, cont)
    # an empty context is BOS; the continuation is encoded without special tokens
    assert encode_pair(tok, "", " mat") == ([tok.bos_token_id], tok(" mat", add_special_tokens=False)["input_ids"])


def _plain_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) from one unbatched forward pass over the whole string."""
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(lp[p - 1, whole[p]].item() for p in range(n_ctx, len(whole)))


@pytest.mark.parametrize("task", ["arc_easy", "piqa", "winogrande"])
def test_option_scores_equal_a_plain_forward_pass(stories, icl, task):
    model, tok = stories
    r = evaluate_task(model, tok, icl / f"{task}.jsonl", limit=6, batch_size=4, per_item=True)
    _, records = load_task(icl / f"{task}.jsonl", limit=6)
    correct = correct_norm = 0
    for record, item in zip(records, r["per_item"]):
        if task == "winogrande":  # partial scoring: the continuation after each filled-in option
            pairs = [(c, " " + record["continuation"]) for c in record["context_options"]]
        elif task == "piqa":  # the query ends in "\n": no delimiter; the "\n" is scored with the choice, as in lm-eval
            pairs = [(record["query"][:-1], "\n" + c) for c in record["choices"]]
        else:
            pairs = [(record["query"], " " + c) for c in record["choices"]]
        want = [_plain_loglikelihood(model, tok, c, x) for c, x in pairs]
        assert item["logprobs"] == pytest.approx(want, abs=1e-4)
        correct += max(range(len(want)), key=want.__getitem__) == record["gold"]
        if task != "winogrande":
            normed = [w / len(c.encode()) for w, c in zip(want, record["choices"])]
            correct_norm += max(range(len(want)), key=normed.__getitem__) == record["gold"]
    assert r["items"] == 6 and r["acc"] == correct / 6
    if task == "winogrande":
        assert "acc_norm" not in r and r["layout"] == "schema"
    else:
        assert r["acc_norm"] == correct_norm / 6


def test_batch_size_does_not_change_scores(stories, icl):
    model, tok = stories
    one = evaluate_task(model, tok, icl / "arc_easy.jsonl", limit=5, batch_size=1, per_item=True)
    many = evaluate_task(model, tok, icl / "arc_easy.jsonl", limit=5, batch_size=7, per_item=True)
    for a, b in zip(one["per_item"], many["per_item"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


@pytest.fixture(scope="module")
def own_story(stories) -> str:
    """80 greedy tokens of the model from "Once upon a time", decoded (they re-encode to the same tokens)."""
    model, tok = stories
    ids = tok("Once upon a time")["input_ids"]
    with torch.no_grad():
        for _ in range(80):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    text = tok.decode(ids, skip_special_tokens=True)
    assert tok(text)["input_ids"] == ids
    return text


def test_cloze_greedy_match_on_the_models_own_words(stories, own_story, tmp_path):
    model, tok = stories
    words = own_story.split(" ")
    cuts = range(4, len(words), 3)
    own = _write(tmp_path / "own.jsonl", [{"context": " ".join(words[:k]), "continuation": words[k]} for k in cuts])
    wrong = _write(tmp_path / "wrong.jsonl", [{"context": " ".join(words[:k]), "continuation": "elephant"}
                                             for k in cuts])
    r = evaluate_task(model, tok, own, per_item=True)
    assert r["layout"] == "language_modeling" and r["items"] == len(cuts)
    assert r["acc"] == 1.0  # every token of the model's own greedy continuation is its argmax
    assert r["ppl"] == pytest.approx(math.exp(-sum(d["logprob"] for d in r["per_item"]) / len(cuts)))
    bad = evaluate_task(model, tok, wrong, per_item=True)
    assert bad["acc"] == 0.0 and bad["ppl"] > 10 * r["ppl"]
    for a, b in zip(r["per_item"], bad["per_item"]):
        assert a["greedy"] and not b["greedy"] and a["logprob"] > b["logprob"]
