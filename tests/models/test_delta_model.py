"""Linearized models whose recurrent part is the delta rule (``state_update`` delta / gated-delta): the parallel
forward, prefill + decode (eager and through the graph path's static buffers), split prefills, padding and beams
agree; the state stays one fixed-size tensor; the gates train; the export round-trips the setting."""

from __future__ import annotations

import pytest
import torch

from linearize.models.base import output_cache
from linearize.models.cache import RecurrentStateLayer
from linearize.modules.attention import linear_attention_layers, window_dropout
from tests.models.conftest import decode_by_hand, incremental_logits, tiny_linearized

CASES = {
    "gated-delta W4 sinks2": {"state_update": "gated-delta", "window": 4, "sinks": 2},
    "delta W4": {"state_update": "delta", "window": 4},
    "gated-delta pure linear": {"state_update": "gated-delta", "window": 0},
}


def _ids(B=1, T=26, seed=0):
    return torch.randint(3, 96, (B, T), generator=torch.Generator().manual_seed(seed))


def _gated(model, seed=1):
    """Gates away from their shared init, so that per-key beta and decay matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in linear_attention_layers(model):
            la.gate_weight.normal_(0, 0.5, generator=g)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_equal_the_parallel_forward(family, case):
    model = _gated(tiny_linearized(family, **CASES[case]))
    ids = _ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    steps, cache = incremental_logits(model, ids, 11)
    torch.testing.assert_close(steps, full, atol=2e-4, rtol=2e-4)
    layer = next(x for x in cache.layers if isinstance(x, RecurrentStateLayer))
    S = layer.state()[0]
    assert S.shape[-1] == layer.v_ring.shape[-1] + 1 if layer.v_ring is not None else True  # [.., F, D + 1]


def test_split_prefill_equals_one_prefill():
    model = _gated(tiny_linearized(**CASES["gated-delta W4 sinks2"]))
    ids = _ids(T=27)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out1 = model(ids[:, :10], use_cache=True)
        out2 = model(ids[:, 10:], past_key_values=output_cache(out1), use_cache=True)
    torch.testing.assert_close(torch.cat([out1.logits, out2.logits], 1), full, atol=2e-4, rtol=2e-4)


def test_graph_path_writes_the_same_tokens_as_eager_decoding():
    model = _gated(tiny_linearized(**CASES["gated-delta W4 sinks2"]))
    ids = _ids(T=16)
    eager, eager_logits, _ = decode_by_hand(model, ids, 10, 12, graphed=False)
    graphed, graphed_logits, _ = decode_by_hand(model, ids, 10, 12, graphed=True)
    assert torch.equal(eager, graphed)
    torch.testing.assert_close(graphed_logits, eager_logits, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_each_row_alone_and_the_cache_stays_constant():
    model = _gated(tiny_linearized(**CASES["gated-delta W4 sinks2"]))
    a, b = _ids(T=20, seed=1), _ids(T=14, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        alone = [model.generate(input_ids=x, max_new_tokens=8, do_sample=False, pad_token_id=0) for x in (a, b)]
        beams = model.generate(input_ids=a, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
        sizes = [output_cache(model(_ids(T=T), use_cache=True)).nbytes() for T in (30, 90)]
    assert torch.equal(batch[0, 20:], alone[0][0, 20:])
    assert torch.equal(batch[1, 20:], alone[1][0, 14:])
    assert beams.shape == (1, 25) and sizes[0] == sizes[1]


def test_the_gates_and_maps_train_and_window_dropout_runs_the_delta_rule_alone():
    model = tiny_linearized(**CASES["gated-delta W4 sinks2"])
    ids = _ids(T=20)
    layers = linear_attention_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for la in layers:
        for p in la.parameters():
            p.requires_grad_(True)
    model(ids, use_cache=False).logits.square().mean().backward()
    assert all(la.gate_weight.grad is not None and la.gate_weight.grad.abs().sum() > 0 for la in layers)
    assert all(la.gate_bias.grad.abs().sum() > 0 for la in layers)
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        with window_dropout(layers, True):
            dropped = model(ids, use_cache=False).logits
    assert torch.isfinite(dropped).all() and (dropped - plain).abs().max() > 1e-3


def test_export_keeps_the_setting(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _gated(tiny_linearized(**CASES["gated-delta W4 sinks2"]))
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.linear_config.state_update == "gated-delta"
    ids = _ids(T=20)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_global_cache_with_a_delta_state_is_refused():
    from linearize.errors import ConfigError
    from linearize.modules.config import LinearAttentionConfig

    with pytest.raises(ConfigError, match="state_update=additive"):
        LinearAttentionConfig.build(state_update="delta", global_cache=4)


@pytest.mark.parametrize("state_update", ["additive", "gated-delta"])
def test_generate_gives_a_left_padded_row_the_logits_it_gets_alone(state_update):
    """generate() makes position_ids from the mask only for a forward that names them; without them a padded row's
    RoPE positions count its padding and its logits drift from the row's own (1e-4 additive, 1e-2 gated-delta)."""
    model = tiny_linearized(state_update=state_update, window=4, sinks=2)
    if state_update != "additive":
        _gated(model)
    b = _ids(T=14, seed=2)
    ids = torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True}
    with torch.no_grad():
        padded = model.generate(input_ids=ids, attention_mask=mask, **kw)
        alone = model.generate(input_ids=b, **kw)
    for a, r in zip(padded.logits, alone.logits):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)
