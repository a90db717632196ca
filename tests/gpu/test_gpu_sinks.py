"""The fused sinks kernel (``linearize/kernels/hybrid/sinks_fused.py``) compiled on a CUDA GPU, in bf16, against
the PyTorch form ``sinks.add_sinks``: the output and the gradients of o, den, c and gamma within 1e-2 relative, at
attention-transfer shapes (seq 2048 for Llama-2-7B / Llama-3-8B heads, 1024 for SmolLM2-135M; 4 sinks, W 64).
fp32 parity under the interpreter is ``tests/kernels/test_sinks.py``.

    python -m pytest tests/gpu -q        (on a GPU machine; skipped without CUDA)

Formerly the parity half of ``benchmarks/gpu_check_sinks.py``; its timing half is ``benchmarks/gpu_sinks_fused.py``."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: bf16 parity of the compiled fused sinks kernel "
                "(run `python -m pytest tests/gpu` on a GPU machine)", allow_module_level=True)

from linearize.kernels.hybrid.sinks import add_sinks  # noqa: E402
from linearize.kernels.hybrid.sinks_fused import add_sinks_fused  # noqa: E402

TOL = 1e-2
SHAPES = {  # name: (B, H, Hk, T, d = D)
    "llama-2-7b": (8, 32, 32, 2048, 128),
    "llama-3-8b": (8, 32, 8, 2048, 128),
    "smollm2-135m": (16, 9, 3, 1024, 64),
}


def sinks_inputs(B, H, Hk, T, d, E=4, W=64):
    """Arguments of ``add_sinks`` / ``add_sinks_fused`` (o, den, c, q, sinks, gamma) and their keywords."""
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    o = r(B, H, T, d).bfloat16().requires_grad_()
    den = (r(B, H, T).abs() * 4 + 1).requires_grad_()
    c = r(B, H, T).requires_grad_()
    gamma = torch.rand(H, device="cuda").requires_grad_()
    q, k_s, v_s = (r(B, H, T, d) * 2).bfloat16(), (r(B, Hk, E, d) * 2).bfloat16(), r(B, Hk, E, d).bfloat16()
    pos = torch.arange(E, device="cuda").expand(B, E).contiguous()
    return (o, den, c, q, (k_s, v_s, pos), gamma), dict(scale=d**-0.5, window=W, first_query=0)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


KNOWN = {"llama-3-8b": "bf16 dgamma 7.7e-2 from the torch form (H100, 2026-12-07; out, do, dden, dc within 1e-2): "
                       "the fused kernel is not on the chunk path until this is explained (docs/kernels.md)"}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_sinks_match_torch_form_in_bf16(shape, request):
    if shape in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[shape], strict=True))
    args, kw = sinks_inputs(*SHAPES[shape])
    o, den, c, _, _, gamma = args
    leaves = [o, den, c, gamma]
    w = torch.randn_like(o)
    res = {}
    for form, fn in (("torch", add_sinks), ("fused", add_sinks_fused)):
        y = fn(*args, **kw)
        res[form] = [y] + list(torch.autograd.grad((y.float() * w.float()).sum(), leaves))
    errs = {k: rel(a, b) for k, a, b in zip(("out", "do", "dden", "dc", "dgamma"), res["fused"], res["torch"])}
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e < TOL}
    assert not bad, f"{shape}: fused sinks differ from add_sinks by >= {TOL:g} (relative) in {bad}"
