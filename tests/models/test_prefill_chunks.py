"""Chunked prefill (``LinearizedModelMixin.prefill_chunk_tokens``): a cached forward over more tokens than the
budget runs as consecutive chunks of positions through the cache. It must give the one-pass logits and cache (so
generation continues identically), with padding, sinks and softmax layers, and only ever run chunk-sized forwards."""

from __future__ import annotations

import pytest
import torch

from linearize.convert.surgery import linearize_model
from linearize.models.base import output_cache
from tests.conftest import linear_config, rel_err, tiny_model

CASES = {
    "llama-w8-sinks2": ("llama", dict(window=8, sinks=2)),
    "llama-softmax-layer": ("llama", dict(window=8, softmax_layers=[1])),
    "qwen2-w8": ("qwen2", dict(window=8)),
    "gpt2-pure": ("gpt2", dict(window=0)),
    # local layers 0, 1, 3 kept with transformers' sliding cache (window 6), chunks of 5 positions through it
    "gemma3-global-only": ("gemma3", dict(window=4, sinks=2, softmax_layers=[0, 1, 3])),
    # 3 exact pairs per kv head from beyond the window: the set and its scores carried from chunk to chunk
    "llama-global-cache": ("llama", dict(window=4, sinks=1, global_cache=3)),
}


def _model(family, attn):
    return linearize_model(tiny_model(family, 0), linear_config(**attn)).eval()


def _embedding_lengths(model):
    """Sequence lengths the model's input embedding sees, call by call."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    return seen


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_chunked_prefill_equals_one_pass_and_generation_continues_identically(case):
    family, attn = CASES[case]
    model = _model(family, attn)
    ids = torch.randint(1, 96, (2, 23))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    seen = _embedding_lengths(model)
    with torch.no_grad():
        model.prefill_chunk_tokens = 0
        one = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        assert seen == [23]
        model.prefill_chunk_tokens = 10  # batch 2: chunks of 5 positions, the first one shorter (3, 5, 5, 5, 5)
        seen.clear()
        chunked = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        assert seen == [3, 5, 5, 5, 5]
        assert chunked.logits.shape == one.logits.shape == (2, 1, 96)
        assert rel_err(chunked.logits, one.logits) < 1e-5
        a, b = output_cache(one), output_cache(chunked)
        assert a.get_seq_length() == b.get_seq_length() == 23
        tok = one.logits.argmax(-1)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        pos = (step_mask.cumsum(1) - 1)[:, -1:]  # as generate() positions a left-padded batch
        nxt_a = model(tok, attention_mask=step_mask, position_ids=pos, past_key_values=a, use_cache=True).logits
        nxt_b = model(tok, attention_mask=step_mask, position_ids=pos, past_key_values=b, use_cache=True).logits
        assert rel_err(nxt_b, nxt_a) < 1e-5


def test_generate_with_chunked_prefill_writes_the_same_tokens():
    model = _model("llama", dict(window=8, sinks=2))
    ids = torch.randint(1, 96, (3, 30))
    runs = []
    for budget in (0, 24):  # batch 3: chunks of 8 positions
        model.prefill_chunk_tokens = budget
        with torch.no_grad():
            runs.append(model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0))
    assert torch.equal(runs[0], runs[1])


def test_calls_that_want_every_logit_or_no_cache_are_not_chunked():
    model = _model("llama", dict(window=8))
    model.prefill_chunk_tokens = 8
    seen = _embedding_lengths(model)
    ids = torch.randint(1, 96, (2, 20))
    with torch.no_grad():
        assert model(ids, use_cache=True).logits.shape == (2, 20, 96)  # logits_to_keep=0: every position's logits
        model(ids, use_cache=False, logits_to_keep=1)
        model(ids, use_cache=True, logits_to_keep=1, output_hidden_states=True)  # hidden states are not stitched
        model(ids[:, :4], use_cache=True, logits_to_keep=1)  # 8 tokens: within the budget
        assert seen == [20, 20, 20, 4]
        seen.clear()
        out = model(ids, use_cache=True, logits_to_keep=3)  # chunks of 4, the last one holds the 3 positions kept
        assert seen == [4] * 5 and out.logits.shape == (2, 3, 96)


def test_a_global_cache_prefills_in_chunks_of_global_prefill_chunk_positions():
    """A global cache's PyTorch prefill scores every query of a call against every key of it, so a model with one
    chunks a long prompt by positions (``global_prefill_chunk``) even when the token budget is not reached: the same
    logits and the same next step as one pass; without a global cache that setting changes nothing."""
    model = _model("llama", dict(window=4, sinks=1, global_cache=3))
    ids = torch.randint(1, 96, (2, 30))
    seen = _embedding_lengths(model)
    with torch.no_grad():
        model.global_prefill_chunk = 0
        one = model(ids, use_cache=True, logits_to_keep=1)
        model.global_prefill_chunk = 8  # the token budget (65,536) is far away: chunks of 8 positions, the first 6
        chunked = model(ids, use_cache=True, logits_to_keep=1)
        assert seen == [30, 6, 8, 8, 8]
        assert rel_err(chunked.logits, one.logits) < 1e-5
        tok = one.logits.argmax(-1)
        a = model(tok, past_key_values=output_cache(one), use_cache=True).logits
        b = model(tok, past_key_values=output_cache(chunked), use_cache=True).logits
        assert rel_err(b, a) < 1e-5
    plain = _model("llama", dict(window=4, sinks=1))
    plain.global_prefill_chunk = 8
    seen = _embedding_lengths(plain)
    with torch.no_grad():
        plain(ids, use_cache=True, logits_to_keep=1)
    assert seen == [30]
