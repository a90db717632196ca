"""Window-only layers (``window_only_layers``): a listed layer reads its exact part alone (sinks + window + global
cache), in the parallel forward, prefill + decode and the graph path alike; the other layers keep their linear part;
the setting is validated, exported and shown by ``linearize info``."""

from __future__ import annotations

import pytest
import torch

from linearize.errors import ConfigError
from linearize.modules.attention import linear_part_off
from linearize.modules.config import LinearAttentionConfig
from tests.conftest import linear_config
from tests.models.conftest import decode_by_hand, incremental_logits, output_cache, tiny_linearized

SETTINGS = {"window": 4, "sinks": 2, "feature_map": "hedgehog"}


def _ids(B=1, T=24, seed=0):
    return torch.randint(3, 96, (B, T), generator=torch.Generator().manual_seed(seed))


def test_listed_layers_are_the_same_model_with_their_linear_part_switched_off():
    plain = tiny_linearized(**SETTINGS)
    model = tiny_linearized(**SETTINGS, window_only_layers=[1])
    flags = {i: m.linear_attn.linear_off for i, m in model.linear_attention_modules().items()}
    assert flags == {0: False, 1: True}
    ids = _ids()
    with torch.no_grad():
        on = plain(ids).logits
        with linear_part_off([plain.linear_attention_modules()[1].linear_attn]):
            by_hand = plain(ids).logits
        got = model(ids).logits
        with linear_part_off(m.linear_attn for m in model.linear_attention_modules().values()):
            pass  # the context restores each layer's own setting
    torch.testing.assert_close(got, by_hand, atol=1e-6, rtol=1e-6)
    assert (got - on).abs().max() > 1e-3  # the linear part of layer 1 mattered
    assert [m.linear_attn.linear_off for m in model.linear_attention_modules().values()] == [False, True]


@pytest.mark.parametrize("family,extra", [("llama", {}), ("gpt2", {}), ("qwen3", {"global_cache": 3}),
                                          ("llama", {"state_update": "gated-delta"})])
def test_prefill_and_decode_equal_the_parallel_forward(family, extra):
    model = tiny_linearized(family, **SETTINGS, **extra, window_only_layers=[0])
    ids = _ids(T=22)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    steps, _ = incremental_logits(model, ids, 9)
    torch.testing.assert_close(steps, full, atol=2e-4, rtol=2e-4)


def test_graph_path_writes_the_same_tokens_as_eager_decoding():
    model = tiny_linearized(**SETTINGS, window_only_layers=[1])
    ids = _ids(T=16)
    eager, eager_logits, _ = decode_by_hand(model, ids, 10, 12, graphed=False)
    graphed, graphed_logits, _ = decode_by_hand(model, ids, 10, 12, graphed=True)
    assert torch.equal(eager, graphed)
    torch.testing.assert_close(graphed_logits, eager_logits, atol=1e-5, rtol=1e-5)


def test_settings_are_checked():
    assert linear_config(window=4, window_only_layers=[3, 1, 3]).window_only_layers == [1, 3]
    with pytest.raises(ConfigError, match=r"layers \[1\] are in softmax_layers and in window_only_layers"):
        LinearAttentionConfig.build(window=4, softmax_layers=[1, 2], window_only_layers=[1])
    with pytest.raises(ConfigError, match=r"window_only_layers=\[0\] needs window > 0"):
        LinearAttentionConfig.build(window=0, window_only_layers=[0])
    with pytest.raises(ConfigError, match=r"window_only_layers \[5\] out of range: the model has 2 layers"):
        tiny_linearized(**SETTINGS, window_only_layers=[5])


def test_export_keeps_the_layers_and_info_names_them(tmp_path):
    from transformers import AutoModelForCausalLM

    from linearize.export.describe import describe
    from linearize.export.writer import save_linearized

    model = tiny_linearized(**SETTINGS, window_only_layers=[1])
    save_linearized(model, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.linear_config.window_only_layers == [1]
    assert [m.linear_attn.linear_off for m in again.linear_attention_modules().values()] == [False, True]
    ids = _ids(T=20)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert describe(tmp_path / "m")["layers"].startswith("2 linear (1 of them window-only [1]: linear part off)")


def _layer_bytes(layer):
    return layer.nbytes()


def test_window_only_layers_cache_no_state_and_no_feature_ring():
    """The cache of a window-only layer holds the window's keys and values and the sinks alone; the geometry that
    `linearize info`, the state budget and the sweep's byte counts use says the same number of bytes."""
    from linearize.models.cache import CacheGeometry, RecurrentStateLayer

    model = tiny_linearized(**SETTINGS, window_only_layers=[1])
    _, cache = incremental_logits(model, _ids(T=14), 9)
    lin, wo = cache.layers
    assert isinstance(wo, RecurrentStateLayer) and not wo.linear and lin.linear
    assert wo.state() is None and wo.fk_ring is None and wo.k_ring is not None and wo.sink_k is not None
    assert lin.state() is not None and lin.fk_ring is not None
    g = CacheGeometry.from_config(model.config.to_dict(), model.linear_config, 4)  # fp32 tiny model
    assert g.window_only == 1
    state_lin, win_lin = g.linear_parts(1, window_only=0)
    state_wo, win_wo = g.linear_parts(1, window_only=1)
    assert (_layer_bytes(lin), _layer_bytes(wo)) == (state_lin + win_lin, state_wo + win_wo)
    assert state_wo == 0 and _layer_bytes(wo) < _layer_bytes(lin)
    assert cache.nbytes() == sum(g.linear_parts(2))


def test_with_a_global_cache_window_only_layers_keep_their_state():
    model = tiny_linearized(**SETTINGS, global_cache=3, window_only_layers=[1])
    _, cache = incremental_logits(model, _ids(T=14), 9)
    assert all(layer.linear and layer.state() is not None for layer in cache.layers)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stateless_cache_generates_each_left_padded_row_as_alone(backend):
    """generate() over a left-padded batch through the stateless cache (prefill with padding, then decode steps),
    on both kernel backends: each row's logits are those it gets alone, and every layer's cache kept no state."""
    from tests.conftest import triton_problem

    if backend == "triton" and triton_problem():
        pytest.skip(triton_problem())
    model = tiny_linearized(**SETTINGS, window_only_layers=[0, 1])
    model.set_backend(backend)
    a, b = _ids(T=15, seed=1), _ids(T=9, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kw = {"max_new_tokens": 7, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True}
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, **kw)
        alone = [model.generate(input_ids=row, **kw) for row in (a, b)]
        out = model(ids, attention_mask=mask, use_cache=True)
    assert not any(layer.linear for layer in output_cache(out).layers)
    for r in range(2):
        got = torch.stack([step[r] for step in batch.logits])
        want = torch.stack([step[0] for step in alone[r].logits])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_a_stateless_cache_is_refused_once_the_linear_part_is_back_on():
    from linearize.errors import LinearizeError

    model = tiny_linearized(**SETTINGS)
    layers = [m.linear_attn for m in model.linear_attention_modules().values()]
    ids = _ids(T=12)
    with torch.no_grad(), linear_part_off(layers):
        cache = output_cache(model(ids[:, :8], use_cache=True))
    assert not any(layer.linear for layer in cache.layers)  # built while the linear part was off
    with torch.no_grad(), pytest.raises(LinearizeError, match="keeps no state"):
        model(ids[:, 8:9], past_key_values=cache, use_cache=True)


def test_beam_search_through_the_stateless_cache_equals_the_uncached_search():
    """Beams reorder the stateless layers' rings and sinks (no state in them) as they reorder a state: generate()
    with the model's cache and without any cache (every step the parallel forward) pick the same beams."""
    model = tiny_linearized(**SETTINGS, window_only_layers=[0, 1])
    ids = _ids(B=2, T=12, seed=5)
    kw = {"max_new_tokens": 8, "num_beams": 3, "do_sample": False, "pad_token_id": 0, "output_scores": True,
          "return_dict_in_generate": True}
    with torch.no_grad():
        cached = model.generate(ids, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=1e-5)
