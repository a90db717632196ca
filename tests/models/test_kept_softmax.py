"""Kept softmax layers (``models/softmax.py``) decode from a static KV buffer (``SoftmaxKVLayer``): the same logits
and tokens as transformers' growing ``DynamicLayer`` (the path before #28), prefill + decode equal to the parallel
forward (also across buffer reallocations), padded batches and beam search still right (padding falls back to the
teacher's own forward over the buffer's filled views), and the graph decision takes such caches."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from linearize.models import cache as cache_mod
from linearize.models import graphs
from linearize.models.base import LinearizedModelMixin, output_cache
from linearize.models.cache import SoftmaxKVLayer
from linearize.models.softmax import KeptSoftmaxAttention
from tests.conftest import rel_err
from tests.models.conftest import decode_by_hand, incremental_logits, tiny_linearized

KEPT = {"window": 8, "softmax_layers": [1]}


def _dynamic_cache(model):
    """The cache as before #28: transformers' DynamicLayer for the kept softmax layers."""
    cache = LinearizedModelMixin.make_cache(model)
    for i in model.linear_config.softmax_layers:
        cache.layers[i] = DynamicLayer()
    return cache


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts SoftmaxKVLayer.decode calls (the static path) and update calls (the teacher's forward)."""
    calls = {"decode": 0, "update": 0}
    decode, update = SoftmaxKVLayer.decode, SoftmaxKVLayer.update

    def counted_decode(self, *a, **k):
        calls["decode"] += 1
        return decode(self, *a, **k)

    def counted_update(self, *a, **k):
        calls["update"] += 1
        return update(self, *a, **k)

    monkeypatch.setattr(SoftmaxKVLayer, "decode", counted_decode)
    monkeypatch.setattr(SoftmaxKVLayer, "update", counted_update)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_kept_layer_keeps_the_teachers_module_and_weights(family):
    model = tiny_linearized(family, **KEPT)
    m = model.adapter.blocks(model)[1]
    attn = getattr(m, model.adapter.attention_attr)
    assert isinstance(attn, KeptSoftmaxAttention)
    keys = [k for k in model.state_dict() if ".1." in k and "attn" in k]
    assert keys and not any("linear_attn" in k for k in keys)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_static_decode_equals_dynamic_layer_path_and_parallel_forward(family, backend, decode_calls):
    model = tiny_linearized(family, **KEPT)
    for m in model.modules():
        if isinstance(m, KeptSoftmaxAttention):
            m.decode_backend = backend  # the kept layer's kernel only (the linear layers stay on torch)
    ids = torch.randint(1, 96, (2, 21))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, cache = incremental_logits(model, ids, 9)
    assert isinstance(cache.layers[1], SoftmaxKVLayer)
    assert decode_calls == {"decode": 12, "update": 1}  # every decode step took the static path
    assert int(cache.layers[1].pos[0]) == cache.get_seq_length() == 21
    assert rel_err(inc, full) < 1e-5
    with torch.no_grad():  # today's path: the teacher's forward over a growing DynamicLayer
        out = model(ids[:, :9], past_key_values=_dynamic_cache(model), use_cache=True)
        dyn, logits = output_cache(out), [out.logits]
        for t in range(9, 21):
            logits.append(model(ids[:, t : t + 1], past_key_values=dyn, use_cache=True).logits)
    assert type(dyn.layers[1]) is DynamicLayer
    assert rel_err(inc, torch.cat(logits, 1)) < 1e-5
    assert torch.equal(inc.argmax(-1), torch.cat(logits, 1).argmax(-1))


def test_decode_across_reallocations(monkeypatch):
    """A full buffer reallocates (new addresses, the filled prefix copied); logits stay the parallel forward's,
    and the static-buffer (graph) step notices the move and stays eager for that step."""
    monkeypatch.setattr(cache_mod, "KV_SLACK", 0)
    monkeypatch.setattr(cache_mod, "KV_ALIGN", 4)
    model = tiny_linearized(**KEPT)
    ids = torch.randint(1, 96, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, cache = incremental_logits(model, ids, 5)
    assert cache.layers[1].reallocations >= 3 and cache.layers[1].capacity >= 30
    assert rel_err(inc, full) < 1e-5
    toks, logits, _ = decode_by_hand(model, ids, 5, 20, graphed=False)
    gtoks, glogits, gcache = decode_by_hand(model, ids, 5, 20, graphed=True)
    assert torch.equal(toks, gtoks) and torch.equal(logits, glogits)
    state = graphs.decoding_state(gcache)
    assert gcache.layers[1].reallocations >= 3
    assert state.eager_steps >= 1 + gcache.layers[1].reallocations - 1  # each move after the prompt: one eager step


def test_padded_batch_falls_back_to_the_teachers_forward_and_stays_right(decode_calls):
    """Left padding: the kept layer needs the mask, so its decode steps run the teacher's forward over the buffer's
    filled views (no static path, no graph); every row's tokens equal its unpadded run."""
    model = tiny_linearized(**KEPT)
    model.generation_config.pad_token_id = 0
    a, b = torch.randint(1, 96, (1, 12)), torch.randint(1, 96, (1, 7))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = (ids != 0).long()
    mask[0] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert decode_calls["decode"] == 0 and decode_calls["update"] == 8  # prefill + 7 decode steps
        alone = [model.generate(input_ids=x, max_new_tokens=8, do_sample=False) for x in (a, b)]
    assert torch.equal(out[0, 12:], alone[0][0, 12:])
    assert torch.equal(out[1, 12:], alone[1][0, 7:])
    cache = model.make_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        tok = torch.zeros(2, 1, dtype=torch.long)
        padded = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        assert not graphs.graph_ready(cache, tok, None, require_cuda=False,
                                      kept_softmax=model._kept_softmax_step(tok, padded))
        assert graphs.graph_ready(cache, tok, None, require_cuda=False,
                                  kept_softmax=model._kept_softmax_step(tok, torch.ones_like(padded)))


def test_beam_search_equals_the_dynamic_layer_path(monkeypatch):
    model = tiny_linearized(**KEPT)
    ids = torch.randint(1, 96, (2, 9))
    kw = {"max_new_tokens": 10, "do_sample": False, "num_beams": 3, "pad_token_id": 0}
    with torch.no_grad():
        static = model.generate(input_ids=ids, **kw)
        monkeypatch.setattr(type(model), "make_cache", _dynamic_cache)
        dynamic = model.generate(input_ids=ids, **kw)
    assert torch.equal(static, dynamic)


def test_graph_ready_takes_caches_with_kept_softmax_layers():
    model = tiny_linearized(**KEPT)
    tok = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        cache = output_cache(model(torch.randint(1, 96, (2, 9)), use_cache=True))
        assert graphs.graph_ready(cache, tok, None, require_cuda=False)
        assert not graphs.graph_ready(cache, tok, None)  # CPU tensors: no CUDA graph
        assert not graphs.graph_ready(cache, tok, None, require_cuda=False, kept_softmax=False)
        assert not graphs.graph_ready(cache, torch.zeros(3, 1, dtype=torch.long), None, require_cuda=False)
        assert model._kept_softmax_ready()
        dynamic = _dynamic_cache(model)  # a growing KV cache cannot be captured
        model(torch.randint(1, 96, (2, 9)), past_key_values=dynamic, use_cache=True)
        assert not graphs.graph_ready(dynamic, tok, None, require_cuda=False)
        # a kept layer whose module is the plain teacher's (no static decode path): not graphed
        block = model.model.layers[1]
        plain = type(block.self_attn).__mro__[2](model.config, 1)
        plain.load_state_dict(block.self_attn.state_dict())
        block.self_attn = plain
        assert not model._kept_softmax_ready() and not model._kept_softmax_step(tok, None)


def test_static_buffer_step_equals_eager_with_kept_layers():
    model = tiny_linearized(window=8, sinks=4, softmax_layers=[0])
    ids = torch.randint(1, 96, (2, 12))
    toks, logits, _ = decode_by_hand(model, ids, 12, 10, graphed=False)
    gtoks, glogits, cache = decode_by_hand(model, ids, 12, 10, graphed=True)
    assert torch.equal(toks, gtoks)
    assert torch.equal(logits, glogits)  # the same kernels on the same inputs: bit for bit
    assert int(cache.layers[0].pos[0]) == cache.get_seq_length() == 22
    state = graphs.decoding_state(cache)
    assert state.graph is not None and state.graph.replays == 9
