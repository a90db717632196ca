"""Helpers of the model tests (decoding by hand, graphs on and off) shared by test_graphs and test_compiled_decode."""

from __future__ import annotations

import torch

from linearize.convert.surgery import linearize_model
from linearize.models import graphs
from linearize.models.base import output_cache
from tests.conftest import linear_config, tiny_model


def tiny_linearized(family="llama", **attn):
    return linearize_model(tiny_model(family, 0), linear_config(**attn)).eval()


def incremental_logits(model, ids, prefill, cache_kwarg="past_key_values"):
    """Teacher-forced generation: the first ``prefill`` tokens in one pass, then one token per call through the
    returned cache. Returns (logits [B, T, V] of every position, cache)."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], **{cache_kwarg: cache}, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def decode_by_hand(model, ids, prompt, steps, graphed: bool):
    """Greedy decoding by hand; ``graphed`` runs every step through ``_graphed_decode_step`` (static buffers,
    capture=False on CPU). Returns (tokens, per-step logits, cache)."""
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        cache = output_cache(out)
        tok = out.logits[:, -1:].argmax(-1)
        toks, logits = [tok], []
        for _ in range(steps):
            if graphed:
                assert graphs.graph_ready(cache, tok, None, require_cuda=False)
                pos = torch.full((1,), cache.get_seq_length(), dtype=torch.long)
                out = model._graphed_decode_step(tok, cache, {"cache_position": pos}, capture=False)
            else:
                out = model(tok, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
            toks.append(tok)
    return torch.cat(toks, 1), torch.stack(logits, 1), cache


def generate_graphs_on_and_off(model, monkeypatch):
    replays = []
    call = graphs.DecodeGraph.__call__
    def counted(self, *args):
        replays.append(self.captured)
        return call(self, *args)

    monkeypatch.setattr(graphs.DecodeGraph, "__call__", counted)
    ids = torch.randint(1, 96, (3, 11), device="cuda")
    runs = {}
    for on in (False, True):
        model.cuda_graphs = on
        greedy = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        torch.manual_seed(7)
        sampled = model.generate(input_ids=ids, max_new_tokens=24, do_sample=True, top_k=20, pad_token_id=0)
        runs[on] = (greedy, sampled)
    return runs, replays


def gpu_model(attention="sdpa", **attn):
    model = tiny_linearized(**attn)
    model.set_attn_implementation(attention)  # transformers' default for a loaded export
    return model.cuda()
