"""A linearized model with a sparse global cache (``global_cache``): the parallel forward, prefill + decode (eager and
through the graph path's static buffers), split prefills, padding and beams agree; the cache stays within its budget
and its size does not grow with the context; the export round-trips the setting."""

from __future__ import annotations

import pytest
import torch

from linearize.models.base import output_cache
from linearize.models.cache import RecurrentStateLayer
from tests.models.conftest import decode_by_hand, incremental_logits, tiny_linearized

SETTINGS = {"window": 4, "global_cache": 3, "sinks": 2, "feature_map": "hedgehog"}


def _ids(B=2, T=30, seed=0):
    return torch.randint(3, 96, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "phi3", "gemma3"])
def test_prefill_and_decode_equal_the_parallel_forward(family):
    model = tiny_linearized(family, **SETTINGS)
    ids = _ids(B=1)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    steps, cache = incremental_logits(model, ids, 12)
    torch.testing.assert_close(steps, full, atol=2e-4, rtol=2e-4)
    layer = next(x for x in cache.layers if isinstance(x, RecurrentStateLayer))
    assert layer.g_score.shape[-1] == 3 and torch.isfinite(layer.g_score).all()  # 3 pairs per kv head, all filled


def test_split_prefill_equals_one_prefill():
    model = tiny_linearized(**SETTINGS)
    ids = _ids(B=1, T=26)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out1 = model(ids[:, :9], use_cache=True)
        out2 = model(ids[:, 9:], past_key_values=output_cache(out1), use_cache=True)
    torch.testing.assert_close(torch.cat([out1.logits, out2.logits], 1), full, atol=2e-4, rtol=2e-4)


def test_graph_path_writes_the_same_tokens_as_eager_decoding():
    model = tiny_linearized(**SETTINGS)
    ids = _ids(B=1, T=16)
    eager, eager_logits, _ = decode_by_hand(model, ids, 10, 12, graphed=False)
    graphed, graphed_logits, _ = decode_by_hand(model, ids, 10, 12, graphed=True)
    assert torch.equal(eager, graphed)
    torch.testing.assert_close(graphed_logits, eager_logits, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_each_row_alone():
    model = tiny_linearized(**SETTINGS)
    a, b = _ids(B=1, T=20, seed=1), _ids(B=1, T=14, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        alone = [model.generate(input_ids=x, max_new_tokens=8, do_sample=False, pad_token_id=0) for x in (a, b)]
    assert torch.equal(batch[0, 20:], alone[0][0, 20:])
    assert torch.equal(batch[1, 20:], alone[1][0, 14:])


def test_beam_search_runs_and_the_cache_does_not_grow():
    model = tiny_linearized(**SETTINGS)
    with torch.no_grad():
        out = model.generate(input_ids=_ids(B=1, T=12), max_new_tokens=6, num_beams=3, do_sample=False,
                             pad_token_id=0)
        sizes = []
        for T in (40, 80):
            cache = output_cache(model(_ids(B=1, T=T), use_cache=True))
            sizes.append(cache.nbytes())
    assert out.shape == (1, 18)
    assert sizes[0] == sizes[1]


def test_the_global_cache_changes_the_output_only_beyond_the_window():
    ids = _ids(B=1, T=24)
    with torch.no_grad():
        plain = tiny_linearized(**{**SETTINGS, "global_cache": 0})(ids).logits
        model = tiny_linearized(**SETTINGS)
        glob = model(ids).logits
    # the first W + 1 positions read no key from beyond the window: the same logits
    torch.testing.assert_close(glob[:, :5], plain[:, :5], atol=1e-5, rtol=1e-5)
    assert (glob[:, 8:] - plain[:, 8:]).abs().max() > 1e-4


def test_linear_off_reads_the_exact_part_alone_in_every_path():
    from linearize.modules.attention import linear_attention_layers, linear_part_off

    model = tiny_linearized(**SETTINGS)
    ids = _ids(B=1, T=22)
    with torch.no_grad():
        on = model(ids).logits
        with linear_part_off(linear_attention_layers(model)):
            full = model(ids).logits
            steps, _ = incremental_logits(model, ids, 9)
    torch.testing.assert_close(steps, full, atol=2e-4, rtol=2e-4)
    assert (full - on).abs().max() > 1e-3


def test_export_keeps_the_setting(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_linearized(**SETTINGS)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.linear_config.global_cache == 3
    ids = _ids(B=1, T=20)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_info_names_the_state_form_and_counts_the_global_cache(tmp_path):
    """``linearize info`` (export.describe): the attention row names the state form and the global cache, and the
    constant cache grows by the global set: per layer and kv head K keys and values, per state head K phi(k) (model
    dtype, fp32 here), plus an int64 position and an fp32 score per pair."""
    from linearize.export.describe import describe
    from linearize.export.writer import save_linearized

    sizes = {}
    for k in (0, 3):
        model = tiny_linearized(**{**SETTINGS, "global_cache": k})
        save_linearized(model, tmp_path / f"g{k}")
        sizes[k] = describe(tmp_path / f"g{k}")
    assert "global cache of 3 pairs per kv head; additive state" in sizes[3]["attention"]
    assert "global cache" not in sizes[0]["attention"]
    la = model.linear_attention_modules()[0].linear_attn
    layers, Hk, Hs, d, F = 2, la.num_kv_heads, la.num_state_heads, la.head_dim, la.feature_dim
    extra = layers * 3 * (Hk * (2 * d * 4 + 8 + 4) + Hs * F * 4)
    grab = lambda info: int(info["cache at 4,096 tokens"].split("(")[1].split(" B")[0].replace(",", ""))
    assert grab(sizes[3]) - grab(sizes[0]) == extra
    real = {}
    for k in (0, 3):  # what a real cache holds after a prompt longer than the window
        with torch.no_grad():
            real[k] = output_cache(tiny_linearized(**{**SETTINGS, "global_cache": k})(_ids(B=1, T=20), use_cache=True)).nbytes()
    assert real[3] - real[0] == extra


def test_a_model_on_the_triton_backend_decodes_as_on_torch():
    """``backend="triton"``: the decode steps run the fused global-cache kernel (kernels/hybrid/global_decode.py,
    under the interpreter on CPU); teacher-forced logits equal the PyTorch backend's."""
    from tests.conftest import triton_problem

    if triton_problem():
        pytest.skip(triton_problem())
    ids = _ids(B=1, T=20)
    torch_model = tiny_linearized(**SETTINGS, backend="torch")
    triton_model = tiny_linearized(**SETTINGS, backend="triton")
    triton_model.load_state_dict(torch_model.state_dict())
    steps_torch, _ = incremental_logits(torch_model, ids, 8)
    steps_triton, cache = incremental_logits(triton_model, ids, 8)
    torch.testing.assert_close(steps_triton, steps_torch, atol=1e-5, rtol=1e-5)
    layer = next(x for x in cache.layers if isinstance(x, RecurrentStateLayer))
    assert torch.isfinite(layer.g_score).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_prompt_within_the_window_skips_the_global_pass_and_decodes_the_same(family, monkeypatch):
    """A prefill whose tokens all fit the window moves no key out of it: it runs the plain hybrid kernels and stores
    an empty global set; the steps after it (keys leaving, members entering) equal the parallel forward."""
    from linearize.modules import attention

    calls = []
    real = attention.hybrid_attention_global
    monkeypatch.setattr(attention, "hybrid_attention_global", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_linearized(family, **SETTINGS)
    ids = _ids(B=1, T=16)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    calls.clear()
    steps, cache = incremental_logits(model, ids, 4)  # W = 4: the prompt fills the window, no key has left it
    assert calls == []  # neither the prompt nor the one-token steps ran the global parallel form
    torch.testing.assert_close(steps, full, atol=2e-4, rtol=2e-4)
    layer = next(x for x in cache.layers if isinstance(x, RecurrentStateLayer))
    assert torch.isfinite(layer.g_score).all()  # members entered during decoding
