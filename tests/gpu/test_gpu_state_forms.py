"""The state forms beyond the additive one on a CUDA GPU: the global cache and the gated delta rule, in bf16 against
fp32, and generate() with CUDA graphs on against off (the graph captures the PyTorch decode steps of
``kernels/hybrid/global_cache.py`` and ``kernels/delta/decode.py``). Tiny random Llama, W 8 + 4 sinks.

Bounds as tests/gpu/test_gpu_model.py: bf16 logits within 2e-2 of fp32; graphs on == off token for token (the same
kernels on the same inputs). Not run yet on a GPU (written 2026-12-07, when the session's device time was spent).

    python -m pytest tests/gpu -q        (on a GPU machine; skipped without CUDA)"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: the global cache and the delta rule under bf16 and CUDA graphs "
                "(run `python -m pytest tests/gpu` on a GPU machine)", allow_module_level=True)

from tests.models.conftest import generate_graphs_on_and_off, gpu_model

FORMS = {"global-cache": {"global_cache": 4}, "gated-delta": {"state_update": "gated-delta"}}


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("form", list(FORMS))
def test_bf16_logits_follow_fp32(form):
    model = gpu_model(window=8, sinks=4, **FORMS[form])
    ids = torch.randint(1, 96, (2, 48), device="cuda")
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        model.to(torch.bfloat16)
        low = model(ids, use_cache=False).logits
    assert rel(low, ref) < 2e-2


@pytest.mark.parametrize("form", list(FORMS))
def test_generate_with_graphs_on_equals_off(monkeypatch, form):
    runs, replays = generate_graphs_on_and_off(gpu_model(window=8, sinks=4, **FORMS[form]), monkeypatch)
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    assert any(replays)  # the graph did replay
