"""Sliding-window perplexity: the windows score every token once, and on the real stories260K teacher the batched
implementation equals the transformers guide's loop ("Perplexity of fixed-length models"), written out here with
``labels`` and the model's own loss, to 4 significant digits."""

from __future__ import annotations

import math

import pytest
import torch

from linearize.errors import ConfigError, DataError
from linearize.eval.perplexity import file_perplexity, sliding_windows, text_perplexity


@pytest.mark.parametrize("n,context,stride", [(1000, 128, 128), (1000, 128, 50), (129, 128, 64), (7, 4, 1),
                                              (2, 512, 256)], ids=lambda v: str(v))
def test_windows_score_every_token_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [p for _, end, first in windows for p in range(first, end)]
    if stride == context:  # non-overlapping: the first token of every block has no history in its window
        assert sorted(scored) == [p for p in range(1, n) if p % context != 0]
    else:
        assert sorted(scored) == list(range(1, n))
    for begin, end, first in windows:
        assert end - begin <= context and begin < first < end
        # after the first window, a target sees at least context - stride tokens of history
        assert begin == 0 or first - begin >= context - stride
    assert windows[-1][1] == n


@pytest.mark.parametrize("context,stride", [(1, 1), (8, 0), (8, 9)])
def test_bad_windows_are_config_errors(context, stride):
    with pytest.raises(ConfigError, match="context|stride"):
        sliding_windows(100, context, stride)


def _guide_perplexity(model, ids: torch.Tensor, max_length: int, stride: int,
                      bos: int | None = None) -> tuple[float, int]:
    """The transformers guide's loop, one window at a time: the model's mean loss over ``labels`` times the number
    of labels it averaged; with ``bos`` (a tokenizer that starts texts with it, as stories260K's) every window after
    the first starts with BOS instead of its first token, which is never a target (linearize's one change). The
    guide counts those as ``valid labels - batch_size``, which is right only when the
    window's first label is valid (the first window, or stride == context); with overlapping windows the first
    label is masked, the shift drops nothing, and the count is the valid labels past position 0, as here."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end].clone()
        if bos is not None and begin > 0:
            input_ids[:, 0] = bos
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n_loss = (target_ids[:, 1:] != -100).sum().item()  # the labels are shifted inside the model
        nll_sum += loss.item() * n_loss
        n_tokens += n_loss
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("context,stride", [(512, 512), (512, 200), (256, 256), (256, 96)])
def test_teacher_perplexity_equals_the_transformers_guide(stories, wiki_text, context, stride):
    model, tok = stories
    text = wiki_text[:12000]
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    want, want_n = _guide_perplexity(model, ids, context, stride, bos=tok.bos_token_id)
    got = text_perplexity(model, tok, text, context=context, stride=stride, batch_size=3)
    assert got["tokens"] == want_n
    assert f"{got['ppl']:.4g}" == f"{want:.4g}", (got, want)
    assert got["ppl"] == pytest.approx(want, rel=2e-5)
    assert got["ppl"] == pytest.approx(math.exp(got["nll"] / got["tokens"]))
    # a TinyStories model on Wikipedia: far from uniform over its 512 tokens, far from good
    assert 20 < got["ppl"] < 512


def test_max_tokens_truncates_the_stream(stories, wiki_text):
    model, tok = stories
    head = text_perplexity(model, tok, wiki_text[:12000], context=128, stride=128, max_tokens=300)
    assert head["tokens"] == 300 - 3 and head["windows"] == 3  # blocks of 128, 128, 44; first token of each unscored
    ids = tok(wiki_text[:12000])["input_ids"][:300]
    want = _guide_perplexity(model, torch.tensor([ids]), 128, 128, bos=tok.bos_token_id)[0]
    assert head["ppl"] == pytest.approx(want, rel=2e-5)


def test_every_window_starts_with_bos_where_the_tokenizer_starts_texts_with_it():
    from linearize.eval.perplexity import _leading_bos, _windows

    ids = [1, 10, 11, 12, 13, 14, 15]
    windows = sliding_windows(len(ids), 3, 2)
    assert _windows(ids, windows, 1) == [[1, 10, 11], [1, 12, 13], [1, 14, 15]]
    assert _windows(ids[1:], sliding_windows(6, 3, 2), None) == [[10, 11, 12], [12, 13, 14], [14, 15]]

    class Tok:
        bos_token_id = 1
    assert _leading_bos(Tok(), ids) == 1 and _leading_bos(Tok(), ids[1:]) is None  # SmolLM2 / GPT-2: no BOS, no change


def test_file_errors(stories, tmp_path):
    model, tok = stories
    with pytest.raises(DataError, match="does not exist"):
        file_perplexity(model, tok, tmp_path / "missing.txt", context=64, stride=64)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        file_perplexity(model, tok, tmp_path / "latin1.txt", context=64, stride=64)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="at least 2"):
        file_perplexity(model, tok, tmp_path / "empty.txt", context=64, stride=64)  # BOS alone
    (tmp_path / "ok.txt").write_text("Once upon a time there was a cat.")
    with pytest.raises(ConfigError, match="max_position_embeddings=512"):
        file_perplexity(model, tok, tmp_path / "ok.txt", context=1024, stride=512)
    r = file_perplexity(model, tok, tmp_path / "ok.txt", context=64, stride=64)
    assert r["text"] == str(tmp_path / "ok.txt") and r["tokens"] == len(tok("Once upon a time there was a cat.")
                                                                        ["input_ids"]) - 1
