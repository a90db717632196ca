"""Window dropout (``window_dropout``, #27): on drawn steps every linear layer runs pure linear attention over all
keys; the draw depends only on (seed, step), so a killed and resumed transfer equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from linearize.convert.transfer import TransferConfig, attention_modules, run_transfer
from linearize.errors import ConfigError, LinearizeError
from linearize.kernels import hybrid_attention_quadratic
from linearize.models import classes_for
from linearize.modules.attention import HybridLinearAttention, window_dropout, window_dropped
from tests.conftest import linear_config, tiny_model


def test_a_dropped_layer_is_pure_linear_attention_over_every_key():
    # no RoPE here: "rotated" = the maps read q and k as given
    la = HybridLinearAttention(linear_config(window=4, sinks=2, feature_input="rotated"), 4, 2, 8, 8**-0.5)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    hybrid = la(q, k, v)
    with window_dropout([la], True):
        dropped = la(q, k, v)
        fq, fk = la.features(q, k)
        weights = la.attention_weights(q, k)
    ref, _ = hybrid_attention_quadratic(None, None, v, fq, fk, None, window=0, scale=la.scale)
    torch.testing.assert_close(dropped, ref, atol=1e-5, rtol=1e-5)
    assert (dropped - hybrid).abs().max() > 1e-3
    assert not la.window_dropped  # restored
    # the cross-entropy's weights follow the same switch: pure linear, rows sum to 1 over every earlier key
    assert (weights[..., :, 1:].triu(1) == 0).all() and torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-4)
    with window_dropout([la], False):
        torch.testing.assert_close(la(q, k, v), hybrid)


def test_a_dropped_layer_refuses_a_cache():
    la = HybridLinearAttention(linear_config(window=4, feature_input="rotated"), 2, 2, 8, 0.3)
    x = torch.randn(1, 2, 3, 8)
    with window_dropout([la], True), pytest.raises(LinearizeError, match="training switch"):
        la(x, x, x, cache_layer=object())


def test_the_draw_depends_on_seed_and_step_only():
    draws = [window_dropped(0.25, s, seed=3) for s in range(2000)]
    assert draws == [window_dropped(0.25, s, seed=3) for s in range(2000)]
    assert 0.22 < sum(draws) / len(draws) < 0.28
    assert draws != [window_dropped(0.25, s, seed=4) for s in range(2000)]
    assert not any(window_dropped(0.0, s, seed=3) for s in range(100))
    with pytest.raises(ConfigError, match="window_dropout"):
        TransferConfig.build(window_dropout=1.0)


def _run(work, stop_after=None, **attn):
    torch.manual_seed(0)
    model = tiny_model("llama", 0, num_hidden_layers=2)
    adapter = classes_for(model.config.model_type)[1].adapter
    teacher = attention_modules(model, adapter)
    cfg = linear_config(window=8, **attn)
    students = {i: adapter.build(m, cfg, i) for i, m in teacher.items()}
    g = torch.Generator().manual_seed(0)
    train, valid = torch.randint(0, 96, (12, 32), generator=g), torch.randint(0, 96, (2, 32), generator=g)
    tcfg = TransferConfig(lr=1e-2, batch_size=2, checkpoint_every=1, grad_clip=0.0, window_dropout=0.5)
    run_transfer(model, adapter, teacher, students, train, valid, tcfg, work_dir=work, max_steps=6,
                 stop_after=stop_after)
    return {f"{i}.{k}": v.detach().clone() for i, s in students.items() for k, v in s.linear_attn.state_dict().items()}


@pytest.mark.parametrize("attn", [{}, {"state_update": "gated-delta"}, {"global_cache": 4}],
                         ids=["additive", "gated-delta", "global-cache"])
def test_transfer_with_window_dropout_resumes_to_the_same_weights(tmp_path, attn):
    whole = _run(tmp_path / "whole", **attn)
    _run(tmp_path / "cut", stop_after=3, **attn)
    resumed = _run(tmp_path / "cut", **attn)
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=1e-5, atol=1e-6, msg=k)
    plain_steps = [window_dropped(0.5, s, seed=0) for s in range(6)]
    assert any(plain_steps) and not all(plain_steps)  # both kinds of step happened
