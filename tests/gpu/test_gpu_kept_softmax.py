"""Kept softmax layers on a GPU (#28): a model with softmax layers decodes from one CUDA-graph replay per token
(its kept layers read a static KV buffer, ``models/softmax.py``), with the same greedy and sampled tokens as with
graphs off; and the compiled Triton step matches its reference there.

    python -m pytest tests/gpu -q        (on a GPU machine; skipped without CUDA)
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: CUDA-graph capture of the kept softmax layers' decode step and the compiled "
                "Triton kernel (run `python -m pytest tests/gpu` on a GPU machine)", allow_module_level=True)
pytest.importorskip("triton", reason="the decode kernels on CUDA are Triton")

from linearize.kernels.softmax_decode import softmax_decode_step_naive, softmax_decode_step_triton
from linearize.models.cache import SoftmaxKVLayer
from tests.models.conftest import generate_graphs_on_and_off, gpu_model


@pytest.mark.parametrize("softmax_layers", [[1], [0, 1]], ids=["one-kept", "all-kept"])
def test_generate_with_kept_softmax_layers_graphs_on_equals_off(monkeypatch, softmax_layers):
    model = gpu_model(window=8, sinks=4, softmax_layers=softmax_layers)
    runs, replays = generate_graphs_on_and_off(model, monkeypatch)
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    # per generate(): 23 decode steps, the first eager, then a warm-up and the capture, then 20 replays (the
    # 11-token prompt leaves 256 free slots: no reallocation)
    assert replays == 2 * ([False, False] + [True] * 20)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_compiled_kernel_matches_reference(dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, Hk, d, C = 3, 9, 3, 64, 1000
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)
    q, k, v, kc, vc = mk(B, H, d), mk(B, Hk, d), mk(B, Hk, d), mk(B, Hk, C, d), mk(B, Hk, C, d)
    pos = torch.tensor([0, 517, 999], dtype=torch.int32, device="cuda")
    kr, vr = kc.float().clone(), vc.float().clone()
    ref = softmax_decode_step_naive(q.float(), k.float(), v.float(), k_cache=kr, v_cache=vr, pos=pos, scale=0.125)
    got = softmax_decode_step_triton(q, k, v, k_cache=kc, v_cache=vc, pos=pos, scale=0.125)
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < tol, err
    assert torch.equal(kc.float(), kr.to(dtype).float())


def test_static_kv_layer_is_used_on_gpu():
    model = gpu_model(window=8, softmax_layers=[1])
    ids = torch.randint(1, 96, (2, 9), device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = out.get("cache", None) or out.past_key_values
    assert isinstance(cache.layers[1], SoftmaxKVLayer) and int(cache.layers[1].pos[0]) == 12
