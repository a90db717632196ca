"""Teachers with sliding-window (local) layers: which layers are local, ``layers: global`` (Gemma 3's default), the
local layers' own attention and cache inside the linearized cache, what ``linearize info`` and the budget count."""

from __future__ import annotations

import json

import pytest
import torch

from linearize.convert.surgery import linearize_model
from linearize.errors import ConfigError
from linearize.models.base import output_cache
from linearize.models.sliding import SlidingCacheGeometry, cache_geometry, kept_local_layers, layer_kinds
from linearize.models.softmax import KeptSoftmaxAttention
from tests.conftest import linear_config, rel_err, tiny_config, tiny_model

WINDOW = 6  # the tiny Gemma 3's sliding_window (tests/conftest.py)


def test_which_layers_are_local_and_what_layers_keeps():
    from transformers import Gemma3TextConfig, MistralConfig, Qwen3Config

    # Gemma 3 270M: 18 layers, window 512, every sixth layer global
    real = Gemma3TextConfig(num_hidden_layers=18, sliding_window=512)
    assert [i for i, k in enumerate(layer_kinds(real)) if k == "global"] == [5, 11, 17]
    assert kept_local_layers(None, real) == [i for i in range(18) if i not in (5, 11, 17)]  # default: global
    assert kept_local_layers("all", real, seq_len=512) == []
    with pytest.raises(ConfigError, match=r"--layers all converts the local layers \[0, 1, 2, 3, 4, 6, \.\.\. 16\] "
                                          r"too.*sliding window of 512 tokens.*--seq-len 512 or less, or --layers global"):
        kept_local_layers("all", real, seq_len=1024)
    # config.json as transformers 5 writes it: the same kinds from the dict
    assert layer_kinds(real.to_dict()) == layer_kinds(real)

    # Qwen3 with use_sliding_window: the layers from max_window_layers on are local
    qwen = Qwen3Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=2)
    assert layer_kinds(qwen) == ["global", "global", "local", "local"] and kept_local_layers(None, qwen) == [2, 3]
    assert layer_kinds(Qwen3Config(num_hidden_layers=2)) == ["global", "global"]  # use_sliding_window off

    llama = tiny_config("llama")
    assert kept_local_layers(None, llama) == [] and kept_local_layers("all", llama) == []
    with pytest.raises(ConfigError, match="this model has none.*use --layers all"):
        kept_local_layers("global", llama)
    # Mistral 7B v0.1: every layer sliding; the default converts them all, `global` would convert nothing
    mistral = MistralConfig(num_hidden_layers=2, sliding_window=4096)
    assert layer_kinds(mistral) == ["local", "local"] and kept_local_layers(None, mistral, seq_len=1024) == []
    with pytest.raises(ConfigError, match=r"every layer of this model is local \(sliding_window 4096 on all 2\)"):
        kept_local_layers("global", mistral)


def test_gemma3_270m_cache_bytes_and_budget_count_local_layers_at_their_window():
    """Gemma 3 270M's shapes (config only), converted with the defaults (global layers 5, 11, 17 linear: window 256,
    4 sinks, Hedgehog F = 512, one kv head, bf16): the cache stops at its constant size; the teacher's own grows in
    its 3 global layers only. The budget's candidates are the global layers."""
    from transformers import Gemma3TextConfig

    from linearize.convert.config import ConvertConfig
    from linearize.convert.selection import extra_softmax_count

    real = Gemma3TextConfig(num_hidden_layers=18, sliding_window=512, hidden_size=640, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=256, intermediate_size=2048, vocab_size=262144)
    local = kept_local_layers(None, real)
    cfg = ConvertConfig(softmax_layers=local)
    g = cache_geometry(real.to_dict(), cfg.attention(), dtype_bytes=2)
    linear = (512 * 256 + 512) * 4 + 256 * (2 * 256 + 512) * 2 + 4 * 2 * 256 * 2  # state + window ring + sinks
    windows = 15 * 2 * 256 * 511 * 2  # each local layer: its last 511 keys and values
    for context in (512, 4096, 32768):
        assert g.bytes_per_sequence(len(local), context) == 3 * linear + windows == 11_013_120
    assert g.teacher_bytes(4096) == 3 * 2 * 256 * 4096 * 2 + windows == 20_431_872
    assert extra_softmax_count(cfg.replace(auto_softmax_layers=2), g) == 2
    with pytest.raises(ConfigError, match="auto_softmax_layers=3 leaves no linear layer"):
        extra_softmax_count(cfg.replace(auto_softmax_layers=3), g)
    # one global layer back to softmax costs its KV at 4096 tokens (2 MiB) less the linear layer's 1 MiB
    assert extra_softmax_count(cfg.replace(state_budget=11_013_120 + 2 * 256 * 4096 * 2 - linear), g) == 1


def _decode(model, ids, prefill):
    """Logits of a prefill and then one token at a time, and the cache's bytes after each decode step. The cache
    goes under the name the model's transformers class takes (a plain teacher before 5.24 ignores ``cache=``)."""
    from linearize.models.keywords import cache_kwarg_of

    sizes = []
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{cache_kwarg_of(type(model)): cache})
            logits.append(out.logits)
            sizes.append(cache.nbytes() if hasattr(cache, "nbytes") else None)
    return torch.cat(logits, dim=1), cache, sizes


def test_gemma3_kept_local_layers_are_the_teachers_and_their_cache_stays_within_the_window():
    """Converted global-only, a random Gemma 3 keeps its local layers bit-identical to the teacher's: with the global
    layer kept softmax too, every logit equals the teacher's, in one pass and in prefill + decode far past the local
    window (the local layers' sliding cache inside ours is the teacher's own); with the global layer linear, prefill
    + decode equals the parallel forward and the cache stops growing once the window is full."""
    teacher = tiny_model("gemma3")
    local = kept_local_layers("global", teacher.config)
    assert local == [0, 1, 3]
    ids = torch.randint(0, 96, (2, 5 * WINDOW))
    with torch.no_grad():
        want = teacher(ids, use_cache=False).logits
    want_inc, teacher_cache, _ = _decode(teacher, ids, prefill=4)
    assert type(teacher_cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"  # what ours must match

    every_softmax = linearize_model(tiny_model("gemma3"), linear_config(window=4, softmax_layers=local + [2]))
    assert not every_softmax.linear_attention_modules()
    with torch.no_grad():
        assert torch.equal(every_softmax(ids, use_cache=False).logits, want)
    got_inc, cache, _ = _decode(every_softmax, ids, prefill=4)
    # the kept global layer (2) decodes from its static KV buffer (models/softmax.py, #28): equal to rounding
    assert type(cache).__name__ == "LinearizedCache" and rel_err(got_inc, want_inc) < 1e-5
    assert torch.equal(got_inc.argmax(-1), want_inc.argmax(-1))
    kinds = [type(layer).__name__ for layer in teacher_cache.layers]
    kinds[2] = "SoftmaxKVLayer"
    assert [type(layer).__name__ for layer in cache.layers] == kinds

    model = linearize_model(tiny_model("gemma3"), linear_config(window=4, sinks=2, softmax_layers=local))
    assert sorted(model.linear_attention_modules()) == [2]
    for i in local:  # the teacher's module, only re-classed for the static decode step (models/softmax.py)
        mine, theirs = model.model.layers[i].self_attn, teacher.model.layers[i].self_attn
        assert type(mine).__bases__ == (KeptSoftmaxAttention, type(theirs))
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, cache, sizes = _decode(model, ids, prefill=1)
    assert rel_err(inc, full) < 1e-5 and rel_err(full, want) > 1e-3  # the global layer is linear now
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicSlidingWindowLayer"] * 2 + [
        "RecurrentStateLayer", "DynamicSlidingWindowLayer"]
    steady = sizes[WINDOW:]  # from token 2 + WINDOW on every window (ours 4 + 2 sinks, the teacher's 6) is full
    assert len(set(steady)) == 1 and len(steady) >= 3 * WINDOW, sizes
    g = cache_geometry(model.config.to_dict(), model.linear_config, dtype_bytes=4)
    assert isinstance(g, SlidingCacheGeometry) and (g.local_layers, g.local_window) == (3, WINDOW)
    assert steady[0] == 2 * g.bytes_per_sequence(len(local), ids.shape[1])  # a batch of 2
    assert sizes[0] < steady[0]  # the local windows filled up first


def test_gemma3_global_only_left_padding_matches_unpadded():
    """A left-padded row of a global-only Gemma 3 gets the logits it gets alone, past the local window: the local
    layers' masks come from transformers (padding and window), the linear layer's from the padding mask."""
    model = linearize_model(tiny_model("gemma3"), linear_config(window=4, sinks=2, softmax_layers=[0, 1, 3]))
    ids = torch.randint(1, 96, (2, 20))
    pad = 5
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :pad], mask[1, :pad] = 0, 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = model(padded, attention_mask=mask, position_ids=pos, use_cache=False).logits
        alone = model(ids[1:, pad:], use_cache=False).logits
    assert rel_err(batch[1, pad:], alone[0]) < 1e-5
    greedy = model.generate(input_ids=padded[:, :12], attention_mask=mask[:, :12], max_new_tokens=10,
                            do_sample=False, pad_token_id=0)
    solo = model.generate(input_ids=ids[1:, pad:12], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy[1, 12:], solo[0, 12 - pad:])


@pytest.fixture
def gemma3_dir(tiny_dir, tmp_path):
    """The tiny random Gemma 3 saved with tiny_dir's word-level tokenizer (and its text beside it as data)."""
    from transformers import AutoTokenizer

    d = tmp_path / "gemma3"
    tiny_model("gemma3").save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(d)
    return d


def test_convert_keeps_gemma3_local_layers_by_default_and_info_names_them(gemma3_dir, tiny_dir, tmp_path):
    from linearize.convert.pipeline import convert
    from linearize.export.describe import describe
    from tests.conftest import tiny_convert_job

    out = convert(tiny_convert_job(tiny_dir, tmp_path / "out", model=str(gemma3_dir), tokens=4 * 32,
                                   softmax_layers=[], auto_window_only=False), log=lambda m: None)
    config = json.loads((out / "config.json").read_text())
    assert config["linearize"]["softmax_layers"] == [0, 1, 3]
    assert json.loads((out / "transfer_report.json").read_text())["local_layers"] == [0, 1, 3]
    rows = describe(out)
    assert rows["layers"] == ("1 linear, 3 local [0, 1, 3] (the teacher's sliding-window attention over 6 tokens), "
                              "0 softmax")
    assert rows["teacher KV cache"] == "256 B per token + at most 3.8 KiB in its 3 local layers"  # fp32, 1 kv head

    # `all` within the local window converts them, and says what sinks do there (Gemma 3 270M: 171 against 17.9)
    said = []
    for sinks in (1, 0):
        convert(tiny_convert_job(tiny_dir, tmp_path / f"all-{sinks}", model=str(gemma3_dir), layers="all", seq_len=6,
                                 window=4, sinks=sinks, tokens=2 * 6, val_tokens=12, softmax_layers=[]), log=said.append)
        assert json.loads((tmp_path / f"all-{sinks}" / "config.json").read_text())["linearize"]["softmax_layers"] == []
    warned = [m for m in said if m.startswith("warning: --layers all converts the local layers")]
    assert len(warned) == 1 and "with --sinks 1 every query keeps the first tokens" in warned[0]
    assert "stop seeing 6 tokens later" in warned[0] and "--sinks 0 or --layers global avoid it" in warned[0]

    # `all` past the local window is refused before any weight loads (the transfer's teacher would be wrong there)
    with pytest.raises(ConfigError, match=r"--layers all converts the local layers \[0, 1, 3\] too"):
        convert(tiny_convert_job(tiny_dir, tmp_path / "all", model=str(gemma3_dir), layers="all"))
    with pytest.raises(ConfigError, match="this model has none"):
        convert(tiny_convert_job(tiny_dir, tmp_path / "llama", layers="global"))
    assert not (tmp_path / "all").exists() and not (tmp_path / "llama").exists()
