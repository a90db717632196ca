"""The fused mean squared error (loss and gradient in one pass) against the PyTorch reference.

Runs on CPU through the Triton interpreter where there is no GPU (``TRITON_INTERPRET=1``) and compiled on CUDA
tensors where there is one. fp32 is checked exactly here; bf16 inputs only on the GPU (the interpreter's bf16 is
not the hardware's)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import triton_device, triton_problem

if triton_problem():
    pytest.skip(triton_problem(), allow_module_level=True)

from linearize.kernels.mse import mse, mse_torch
from tests.kernels.conftest import assert_close

DEV = triton_device()
DTYPES = [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else [])


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(*shape, generator=g).to(DEV, dtype).requires_grad_()
    t = (torch.randn(*shape, generator=g) * 0.5).to(DEV, dtype).requires_grad_()
    return o, t


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(2, 3, 37, 20), (4096,), (3, 4097)], ids=["ragged", "one-block", "two-blocks"])
def test_fused_mse_matches_reference(shape, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    o, t = _pair(shape, dtype)
    ref = mse_torch(o, t)
    ref_do, ref_dt = torch.autograd.grad(ref * 7.0, [o, t])
    got = mse(o, t, backend="triton")
    got_do, got_dt = torch.autograd.grad(got * 7.0, [o, t])
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - ref.item()) <= tol * ref.item()
    assert got_do.dtype == o.dtype
    assert_close("do", ref_do, got_do, tol)
    assert_close("dtarget", ref_dt, got_dt, tol)


def test_fused_mse_of_a_transposed_output_and_without_gradients():
    o, t = _pair((2, 16, 3, 8), torch.float32, seed=1)
    o_t = o.transpose(1, 2)  # [2, 3, 16, 8], not contiguous
    t_t = t.detach().transpose(1, 2)
    ref = mse_torch(o_t, t_t)
    got = mse(o_t, t_t, backend="triton")
    assert abs(got.item() - ref.item()) <= 1e-6 * ref.item()
    assert_close("do", torch.autograd.grad(ref, o)[0], torch.autograd.grad(got, o)[0], 1e-6)
    with torch.no_grad():
        assert abs(mse(o_t, t_t, backend="triton").item() - ref.item()) <= 1e-6 * ref.item()


def test_mse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        mse(torch.zeros(2, 3, device=DEV), torch.zeros(3, 2, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="differ in shape"):
        mse(torch.zeros(2, 3), torch.zeros(3, 2), backend="torch")
