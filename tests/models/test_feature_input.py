"""``feature_input: unrotated``: the feature maps read q and k before RoPE (a position-free state) while the window
and the sinks keep RoPE. Parallel == prefill + decode for every family; padding; the linear part ignores positions."""

from __future__ import annotations

import pytest
import torch

from linearize.errors import LinearizeError
from linearize.modules.attention import HybridLinearAttention
from tests.conftest import linear_config, rel_err
from tests.models.conftest import incremental_logits, tiny_linearized

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "gemma3", "gpt2"]


@pytest.mark.parametrize("attn", [dict(window=0), dict(window=8, sinks=4),
                                  dict(window=8, sinks=2, state_update="gated-delta"),
                                  dict(window=8, global_cache=4)], ids=["pure", "hybrid-sinks", "gated-delta", "global"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_equals_prefill_plus_decode(family, attn):
    model = tiny_linearized(family, feature_input="unrotated", **attn)
    ids = torch.randint(0, 96, (2, 37))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    inc, _ = incremental_logits(model, ids, prefill=11)
    assert rel_err(inc, full) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_the_linear_part_reads_no_position_and_the_rotated_one_does(family):
    """Pure linear attention (no window): with unrotated features, shifting every position by 1,000 leaves the
    logits as they are (RoPE enters only through the window, and there is none); with rotated features it moves
    them (the maps read RoPE'd q and k)."""
    ids = torch.randint(0, 96, (2, 24))
    pos = torch.arange(24)[None].expand(2, -1)
    for feature_input, same in (("unrotated", True), ("rotated", False)):
        model = tiny_linearized(family, window=0, feature_input=feature_input)
        with torch.no_grad():
            a = model(ids, position_ids=pos, use_cache=False).logits
            b = model(ids, position_ids=pos + 1000, use_cache=False).logits
        assert (rel_err(b, a) < 1e-5) == same, (feature_input, rel_err(b, a))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_left_padding_matches_unpadded(family):
    model = tiny_linearized(family, window=8, sinks=3, feature_input="unrotated")
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


def test_hybrid_with_unrotated_features_is_shift_invariant_like_its_teacher():
    """RoPE makes the teacher's scores depend on distances only, so shifting every position leaves its output as it
    is; with unrotated features the hybrid keeps that (the window's softmax is RoPE'd, the state reads no position).
    This is what lets it run past the transfer's sequence length on inputs its maps have seen."""
    ids = torch.randint(0, 96, (1, 24))
    pos = torch.arange(24)[None]
    for feature_input, same in (("unrotated", True), ("rotated", False)):
        model = tiny_linearized("llama", window=8, feature_input=feature_input)
        with torch.no_grad():
            a = model(ids, position_ids=pos, use_cache=False).logits
            b = model(ids, position_ids=pos + 1000, use_cache=False).logits
        assert (rel_err(b, a) < 1e-4) == same, (feature_input, rel_err(b, a))


def test_a_layer_that_reads_unrotated_features_refuses_a_call_without_them():
    la = HybridLinearAttention(linear_config(window=4, feature_input="unrotated"), 2, 2, 8, 8 ** -0.5)
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(LinearizeError, match="phi_in"):
        la(q, q, q)
    out = la(q, q, q, phi_in=(q, q))
    assert out.shape == (1, 2, 6, 8)
