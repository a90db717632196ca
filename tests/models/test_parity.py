"""Parallel forward == prefill + token-by-token decoding, per family and mode; padding; constant cache size."""

from __future__ import annotations

import pytest
import torch

from linearize.convert.surgery import linearize_model
from linearize.models.base import output_cache
from linearize.models.cache import cache_bytes_per_sequence
from tests.conftest import linear_config, rel_err, tiny_model, triton_device, triton_problem
from tests.models.conftest import incremental_logits

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt2"]
NEWER = ["qwen3", "phi3", "gemma3"]
"""Families added after the first four: the padding, beam-search and Triton parity tests run them too."""
MODES = {"pure": dict(window=0), "hybrid-w8": dict(window=8), "hybrid-w8-sinks4": dict(window=8, sinks=4)}


def _linearized(family, seed=0, **attn):
    return linearize_model(tiny_model(family, seed), linear_config(**attn))


@pytest.mark.parametrize("cache_kwarg", ["cache", "past_key_values"])
@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_equals_prefill_plus_decode(family, mode, cache_kwarg):
    """Either cache keyword works on every supported transformers (``cache`` is the name from 5.24 on)."""
    model = _linearized(family, **MODES[mode])
    ids = torch.randint(0, 96, (2, 41))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, cache = incremental_logits(model, ids, prefill=13, cache_kwarg=cache_kwarg)
    assert rel_err(inc, full) < 1e-5
    assert cache.get_seq_length() == 41


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_softmax_on_the_adapters_qkv_is_the_teacher(family):
    """Each adapter computes q, k, v, the scale and the output projection as its teacher does (q/k norms, fused
    projections, partial RoPE, its own scaling): with every linear layer switched to exact softmax on its own q, k,
    v, the model's logits are the teacher's. Gemma 3's local layers keep their own attention (``layers: global``):
    17 tokens run past their window of 6, where exact causal softmax is not what they compute."""
    from linearize.models.sliding import local_layers
    from linearize.modules.attention import exact_softmax, linear_attention_layers

    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        teacher = tiny_model(family).eval()
        local = local_layers(teacher.config)
        assert bool(local) == (family == "gemma3")
        teacher = teacher(ids, use_cache=False).logits
        model = _linearized(family, window=8, softmax_layers=local)
        with exact_softmax(linear_attention_layers(model)):
            student = model(ids, use_cache=False).logits
    assert rel_err(student, teacher) < 1e-5


@pytest.mark.parametrize("feature_map", ["hedgehog", "based", "t2r", "elu", "performer"])
def test_parity_every_feature_map(feature_map):
    model = _linearized("llama", feature_map=feature_map, window=8)
    ids = torch.randint(0, 96, (1, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, _ = incremental_logits(model, ids, prefill=5)
    assert rel_err(inc, full) < 1e-5


def test_sinks_change_the_output_once_they_leave_the_window_and_prompts_shorter_than_the_sinks_decode_exactly():
    ids = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        plain = _linearized("llama", window=4).eval()(ids, use_cache=False).logits
        model = _linearized("llama", window=4, sinks=4)
        sinks = model(ids, use_cache=False).logits
    assert rel_err(sinks[:, :4], plain[:, :4]) < 1e-6  # no sink has left any window yet (key 0 leaves at query 4)
    assert rel_err(sinks[:, 8:], plain[:, 8:]) > 1e-3
    for prefill in (1, 2, 6):
        inc, cache = incremental_logits(model, ids, prefill=prefill)
        assert rel_err(inc, sinks) < 1e-5, prefill
        assert cache.layers[0].sink_pos.tolist() == [[0, 1, 2, 3]] * 2


def test_parity_state_per_query_head_and_softmax_layers():
    model = _linearized("llama", window=8, state_per="query", softmax_layers=[1])
    assert not hasattr(model.model.layers[1].self_attn, "linear_attn")
    assert model.model.layers[0].self_attn.linear_attn.num_state_heads == 4
    ids = torch.randint(0, 96, (2, 25))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, _ = incremental_logits(model, ids, prefill=3)
    assert rel_err(inc, full) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", *NEWER])
@pytest.mark.parametrize("window, sinks", [(0, 0), (8, 0), (8, 3), (4, 6)])
def test_left_padding_matches_unpadded(family, window, sinks):
    """A left-padded batch gives each sequence the logits it gets alone (padding leaks into neither the window
    nor the state, and the sinks are each row's first real tokens), in the parallel forward and in prefill +
    decode (with 6 sinks, the padded row's prompt of 5 real tokens is shorter than its sinks: decoding adds one)."""
    model = _linearized(family, window=window, sinks=sinks)
    ids = torch.randint(1, 96, (2, 20))
    pad = 7
    padded = ids.clone()
    padded[1, :pad] = 0
    mask = torch.ones_like(padded)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = model(padded, attention_mask=mask, position_ids=pos, use_cache=False).logits
        alone = model(ids[1:, pad:], use_cache=False).logits
    assert rel_err(batch[1, pad:], alone[0]) < 1e-5
    # decode with the mask growing by one each step
    with torch.no_grad():
        out = model(padded[:, :12], attention_mask=mask[:, :12], position_ids=pos[:, :12], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        for t in range(12, 20):
            out = model(padded[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                        past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    inc = torch.cat(logits, dim=1)
    assert rel_err(inc[1, pad:], alone[0]) < 1e-5


@pytest.mark.parametrize("window, sinks", [(0, 0), (8, 0), (8, 4)])
def test_cache_bytes_constant_once_window_full(window, sinks):
    model = _linearized("llama", window=window, sinks=sinks)
    ids = torch.randint(0, 96, (1, 4))
    sizes = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = output_cache(out)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(40):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            sizes.append(cache.nbytes())
    steady = sizes[window + 2 :]
    assert len(set(steady)) == 1, sizes
    # layers x state heads x (F*D + F) fp32, plus rings of W keys and values per kv head and W phi(k) per state head
    F, D, Hkv, L = 32, 16, 2, 2  # hedgehog: F = 2 * head_dim; state per kv head
    expected = L * Hkv * (F * D + F) * 4 + L * window * (2 * Hkv * D + Hkv * F) * 4 + L * sinks * 2 * Hkv * D * 4
    assert steady[0] == expected
    state, win = cache_bytes_per_sequence(linear_layers=L, num_state_heads=Hkv, num_kv_heads=Hkv, feature_dim=F,
                                          head_dim=D, window=window, dtype_bytes=4, sinks=sinks)
    assert state + win == expected


def test_generate_greedy_sampling_and_batched_left_padding():
    model = _linearized("llama", window=8)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 96, (2, 10))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert greedy.shape == (2, 22)
    # the padded row continues exactly as it does alone
    alone = model.generate(input_ids=ids[:1, 3:], max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy[0, 10:], alone[0, 7:])
    torch.manual_seed(0)
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20)
    assert sampled.shape == (2, 22)


def test_generate_matches_full_forward_argmax():
    """Greedy generation with the recurrent cache picks the argmax of a full parallel forward at every step."""
    model = _linearized("qwen2", window=8)
    ids = torch.randint(1, 96, (1, 6))
    out = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
    with torch.no_grad():
        logits = model(out, use_cache=False).logits
    assert torch.equal(logits[0, 5:-1].argmax(-1), out[0, 6:])


def test_unsupported_architecture_names_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    from linearize.errors import UnsupportedArchitectureError

    m = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedArchitectureError, match="supported: gemma3_text, gpt2, llama, mistral, phi3, qwen2, qwen3"):
        linearize_model(m, linear_config())


def _count_decode_steps(monkeypatch):
    from linearize.modules import attention

    calls = []
    real = attention.hybrid_decode_step

    def spy(*args, **kwargs):
        calls.append(kwargs["pos"].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "hybrid_decode_step", spy)
    return calls


@pytest.mark.parametrize("window", [0, 8])
def test_decode_runs_the_one_launch_step_over_ring_buffers(monkeypatch, window):
    """Every token after the prompt goes through hybrid_decode_step (ring buffers + state, in place), once per
    linear layer, at the right position, and still equals the parallel forward."""
    calls = _count_decode_steps(monkeypatch)
    model = _linearized("llama", window=window, softmax_layers=[1])
    ids = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, cache = incremental_logits(model, ids, prefill=5)
    assert rel_err(inc, full) < 1e-5
    assert len(calls) == (30 - 5) * 1  # layer 0 linear, layer 1 softmax
    assert [int(p[0]) for p in calls] == list(range(5, 30))
    assert cache.get_seq_length() == 30


def test_left_padding_decode_switches_to_ring_step_once_padding_leaves_the_window(monkeypatch):
    """With left padding the linear layers need the key mask while a padded key is within a new token's window;
    after that the mask is dropped and the one-launch decode step runs; outputs equal the unpadded sequence."""
    calls = _count_decode_steps(monkeypatch)
    model = _linearized("llama", window=8)
    ids = torch.randint(1, 96, (2, 4))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # row 0 has 2 padding tokens, its window reaches them for the first steps
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                         pad_token_id=0)
    # new token at position p: its window (p - 7, p] is clear of the padding (positions 0, 1) from p = 9 on;
    # tokens are fed at positions 4 .. 16 (the last generated one is not fed back), through two linear layers
    assert [int(c[0]) for c in calls] == [p for p in range(9, 17) for _ in range(2)]
    alone = model.generate(input_ids=ids[:1, 2:], max_new_tokens=14, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 4:], alone[0, 2:])


@pytest.mark.parametrize("family", ["llama", *NEWER])
@pytest.mark.parametrize("sinks", [0, 2])
def test_beam_search_reorders_ring_caches(sinks, family):
    model = _linearized(family, window=8, sinks=sinks)
    ids = torch.randint(1, 96, (1, 7))
    cached = model.generate(input_ids=ids, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    uncached = model.generate(input_ids=ids, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(cached, uncached)


def test_whole_model_on_triton_kernels_matches_torch_path():
    """Prefill (chunked kernel) and decode (one-launch step) on the Triton kernels (CPU interpreter here, the GPU
    check runs the same on CUDA) equal the PyTorch reference path, fp32."""
    if triton_problem():
        pytest.skip(triton_problem())
    dev = triton_device()
    ids = torch.randint(0, 96, (2, 40), device=dev)
    logits = {}
    for sinks in (0, 4):
        for backend in ("torch", "triton"):
            model = _linearized("llama", window=8, sinks=sinks, backend=backend).to(dev)
            inc, _ = incremental_logits(model, ids, prefill=21)
            logits[backend] = inc
        assert rel_err(logits["triton"], logits["torch"]) < 1e-5, f"sinks={sinks}"


@pytest.mark.parametrize("family", NEWER)
def test_family_on_triton_kernels_matches_torch_path(family):
    """The newer families' q/k (norms, fused projections, partial RoPE) feed the Triton kernels as they feed the
    PyTorch path: a short prefill (chunked kernel) and a few decode steps (one-launch step), window and sinks."""
    if triton_problem():
        pytest.skip(triton_problem())
    dev = triton_device()
    ids = torch.randint(0, 96, (1, 12), device=dev)
    logits = {}
    for backend in ("torch", "triton"):
        model = _linearized(family, window=4, sinks=2, backend=backend).to(dev)
        logits[backend], _ = incremental_logits(model, ids, prefill=9)
    assert rel_err(logits["triton"], logits["torch"]) < 1e-5


def test_cache_under_an_unknown_name_fails_loudly_instead_of_dropping_the_state():
    """The guard against the transformers 5.24 rename: an attention module asked to cache (use_cache=True) that
    finds no cache under any known keyword raises instead of running stateless."""
    from linearize.errors import LinearizeError

    model = _linearized("llama", window=8)
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 5, model.config.hidden_size)
    pos = model.model.rotary_emb(h, torch.arange(5)[None])
    with pytest.raises(LinearizeError, match="use_cache=True but received no cache"):
        attn(h, position_embeddings=pos, use_cache=True, cache_under_a_future_name=model.make_cache())
    out, _ = attn(h, position_embeddings=pos, use_cache=False)  # no cache asked for: a plain parallel pass
    assert out.shape == h.shape


def test_foreign_caches_are_replaced_when_empty_and_refused_when_filled():
    from transformers import DynamicCache

    from linearize.errors import LinearizeError

    model = _linearized("llama", window=8)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids, past_key_values=DynamicCache(), use_cache=True)  # what generate() makes before step 1
        assert rel_err(out.logits, full) < 1e-5
        assert type(output_cache(out)).__name__ == "LinearizedCache"
        filled = DynamicCache()
        filled.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
        with pytest.raises(LinearizeError, match="filled DynamicCache"):
            model(ids, cache=filled, use_cache=True)
        with pytest.raises(LinearizeError, match="two different caches"):
            model(ids, cache=model.make_cache(), past_key_values=model.make_cache())
        # the inner model alone makes a DynamicCache, which a linearized layer refuses
        with pytest.raises(LinearizeError, match="needs a recurrent cache"):
            model.model(ids, use_cache=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_prefill_computes_only_the_last_logits(family, monkeypatch):
    """generate() passes logits_to_keep=1 only to a forward whose signature names it: the prefill must not build
    [B, T, vocab] logits (that was the long-prompt memory peak)."""
    model = _linearized(family, window=8)
    import functools

    shapes = []
    real = type(model).forward

    @functools.wraps(real)  # keeps the signature generate() inspects
    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        shapes.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    ids = torch.randint(1, 96, (2, 30))
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    monkeypatch.undo()
    assert shapes[0][:2] == (2, 1) and all(s[:2] == (2, 1) for s in shapes)
    with torch.no_grad():  # and the tokens are still the full forward's argmax
        logits = model(out, use_cache=False).logits
    assert torch.equal(logits[:, 29:-1].argmax(-1), out[:, 30:])
