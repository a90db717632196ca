"""Fused Triton feature maps (Hedgehog, Taylor / BASED; forward and backward) against the PyTorch references.

Runs on CPU through the Triton interpreter where there is no GPU (``TRITON_INTERPRET=1``, set before triton is
imported, here and in the conftests) and compiled on CUDA tensors where there is one. Sizes are tiny because the
interpreter is slow; ``block_t=16`` so T = 37 spans three blocks, the last one ragged. Outputs of ``torch.empty`` are NaN-poisoned (``tests/kernels/conftest.py``): an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import triton_device, triton_problem

if triton_problem():
    pytest.skip(triton_problem(), allow_module_level=True)

from linearize.kernels.feature_maps import (
    HAS_TRITON,
    based_feature_dim,
    based_features,
    based_features_torch,
    hedgehog_features,
    hedgehog_features_torch,
)
from linearize.kernels.feature_maps.fused import based_features_triton, hedgehog_features_triton
from linearize.modules.feature_maps import BasedFeatureMap, HedgehogFeatureMap
from tests.kernels.conftest import assert_close

if not HAS_TRITON:  # triton imports but the kernels module did not
    pytest.skip("linearize.kernels.feature_maps.fused did not import", allow_module_level=True)

DEV = triton_device()
TOL = 1e-4
LOW_TOL = 2e-2


def _inputs(B, h, T, d, p, bias=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h, T, d, generator=g)
    w = torch.randn(h, d, p, generator=g) * d**-0.5 * 2  # |y| ~ 2: peaked softmaxes, large pair products
    b = torch.randn(h, p, generator=g) * 0.5 if bias else None
    leaf = lambda t, dt=torch.float32: None if t is None else t.to(DEV, dt).requires_grad_()  # noqa: E731
    return leaf(x, dtype), leaf(w), leaf(b)


def _fwd_bwd(fn, x, w, b, seed=1):
    """phi and the gradients of sum(phi * G) for a fixed random G (weights every feature differently)."""
    phi = fn(x, w, b)
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(phi.shape, generator=gen).to(phi.device)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad((phi.float() * G).sum(), leaves)
    out = {"phi": phi, "dx": grads[0], "dW": grads[1]}
    if b is not None:
        out["db"] = grads[2]
    return out


def _hh_ref(x, w, b):
    return hedgehog_features_torch(x, w, b)


def _ty_ref(x, w, b):
    return based_features_torch(x, w)


HEDGEHOG_CASES = [
    # (B, h, T, d, p, bias, block_t, blocks_per_program)
    (2, 2, 37, 16, 16, True, 16, None),  # ragged last block
    (1, 2, 37, 32, 64, True, 16, 2),  # p > d; two blocks per program (dW partials summed over 2 programs)
    (2, 1, 20, 64, 32, False, 16, 1),  # no bias, p < d
    (1, 1, 9, 128, 128, True, None, None),  # widest tiles, default block (T < one block)
    (37, 3, 1, 16, 16, True, 16, None),  # one token per sequence (decode): a head's 37 sequences are its rows
    (40, 2, 1, 32, 16, True, 16, 1),  # ... over three programs per head (dW partials of 3 programs and 2 heads)
]


@pytest.mark.parametrize("case", HEDGEHOG_CASES, ids=lambda c: "B{}-h{}-T{}-d{}-p{}-bias{}-bt{}-nb{}".format(*c))
def test_hedgehog_fwd_bwd_matches_reference(case):
    B, h, T, d, p, bias, bt, nb = case
    x, w, b = _inputs(B, h, T, d, p, bias)
    ref = _fwd_bwd(_hh_ref, x, w, b)
    got = _fwd_bwd(lambda *a: hedgehog_features_triton(*a, block_t=bt, blocks_per_program=nb), x, w, b)
    assert got["phi"].shape == (B, h, T, 2 * p) and got["phi"].dtype == x.dtype
    for key in ref:
        assert_close(key, ref[key], got[key], TOL)


BASED_CASES = [
    # (B, h, T, d, r, block_t, blocks_per_program)
    (2, 2, 37, 16, 16, 16, None),  # ragged last block, F = 153
    (1, 2, 37, 64, 16, 16, 2),  # d > r; two blocks per program
    (1, 1, 21, 16, 32, 16, 1),  # r = 32: F = 561
    (37, 2, 1, 16, 16, 16, 1),  # one token per sequence (decode): the sequences are the rows, three programs
]


@pytest.mark.parametrize("case", BASED_CASES, ids=lambda c: "B{}-h{}-T{}-d{}-r{}-bt{}-nb{}".format(*c))
def test_based_fwd_bwd_matches_reference(case):
    B, h, T, d, r, bt, nb = case
    x, w, _ = _inputs(B, h, T, d, r, bias=False)
    ref = _fwd_bwd(_ty_ref, x, w, None)
    got = _fwd_bwd(lambda x_, w_, _: based_features_triton(x_, w_, block_t=bt, blocks_per_program=nb), x, w, None)
    assert got["phi"].shape == (B, h, T, based_feature_dim(r))
    for key in ref:
        assert_close(key, ref[key], got[key], TOL)


def test_non_contiguous_inputs_and_partial_grads():
    """A transposed view of x and a weight that needs no gradient (the dW partials are skipped)."""
    x0, w, b = _inputs(2, 2, 24, 16, 16)
    x = x0.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, strided
    assert not x.is_contiguous()
    w.requires_grad_(False)
    g = torch.randn(2, 2, 24, 32, device=DEV)
    ref = torch.autograd.grad((hedgehog_features_torch(x, w, b) * g).sum(), [x, b])
    got = torch.autograd.grad((hedgehog_features(x, w, b, backend="triton") * g).sum(), [x, b])
    for name, r_, g_ in zip(("dx", "db"), ref, got):
        assert_close(name, r_, g_, TOL)
    xt = x.detach().requires_grad_(False)
    wt = torch.randn(2, 16, 16, device=DEV, requires_grad=True)
    gt = torch.randn(2, 2, 24, 153, device=DEV)
    ref_w, = torch.autograd.grad((based_features_torch(xt, wt) * gt).sum(), [wt])
    got_w, = torch.autograd.grad((based_features(xt, wt, backend="triton") * gt).sum(), [wt])
    assert_close("dW", ref_w, got_w, TOL)


def test_one_token_from_a_transposed_projection():
    """The decode step's q / k: [B, 1, h, d] transposed to [B, h, 1, d] (strides of the projection, contiguous in
    memory), through the one-token layout, forward and backward, for both maps."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(19, 1, 2, 16, generator=g).to(DEV).transpose(1, 2).requires_grad_()
    w = (torch.randn(2, 16, 16, generator=g) * 0.5).to(DEV).requires_grad_()
    b = torch.randn(2, 16, generator=g).to(DEV).requires_grad_()
    for ref_fn, fn, args in ((hedgehog_features_torch, hedgehog_features_triton, (w, b)),
                             (based_features_torch, based_features_triton, (w,))):
        ref = ref_fn(x, *args)
        got = fn(x, *args, block_t=16)
        assert got.shape == ref.shape == (19, 2, 1, ref.shape[-1])
        assert_close("phi", ref, got, TOL)
        G = torch.randn(ref.shape, generator=g).to(DEV)
        for name, r_, g_ in zip(("dx", "dW", "db"), torch.autograd.grad((ref * G).sum(), [x, *args]),
                                torch.autograd.grad((got * G).sum(), [x, *args])):
            assert_close(name, r_, g_, TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_smoke(dtype):
    """bf16 / fp16 inputs (fp32 weights, as trained feature maps keep them): forward and dx against the fp32
    reference evaluated on the same rounded inputs."""
    x, w, b = _inputs(1, 2, 37, 32, 32, dtype=dtype)
    xr = x.detach().float().requires_grad_()
    wr = w.detach().to(dtype).float()
    for name, tri, ref, F, bb in (
        ("hedgehog", lambda a, c: hedgehog_features_triton(a, c, b), lambda a, c: _hh_ref(a, c, b.detach()), 64, b),
        ("taylor", based_features_triton, based_features_torch, based_feature_dim(32), None),
    ):
        G = torch.randn(1, 2, 37, F).to(DEV, dtype)
        phi = tri(x, w)
        assert phi.dtype == dtype
        dx, = torch.autograd.grad((phi.float() * G.float()).sum(), [x])
        phi_ref = ref(xr, wr)
        dx_ref, = torch.autograd.grad((phi_ref * G.float()).sum(), [xr])
        assert_close(f"{name} phi", phi_ref, phi, LOW_TOL)
        assert_close(f"{name} dx", dx_ref, dx, LOW_TOL)


@pytest.mark.parametrize("cls", [HedgehogFeatureMap, BasedFeatureMap])
def test_module_backends_agree(cls):
    torch.manual_seed(0)
    fm = cls(num_heads=2, head_dim=32).to(DEV)
    with torch.no_grad():  # move away from the identity / zero initialisation
        for prm in fm.parameters():
            prm.add_(torch.randn_like(prm) * 0.3)
    assert fm.backend == "auto" and "backend" not in fm.state_dict()
    x = torch.randn(2, 2, 19, 32, device=DEV)
    out = {}
    for backend in ("torch", "triton"):
        fm.backend = backend
        fm.zero_grad()
        phi = fm(x)
        (phi * torch.linspace(-1, 1, phi.numel(), device=DEV).view_as(phi)).sum().backward()
        out[backend] = {"phi": phi.detach(), **{n: prm.grad.clone() for n, prm in fm.named_parameters()}}
    assert out["triton"]["phi"].shape == (2, 2, 19, fm.feature_dim)
    for key in out["torch"]:
        assert_close(key, out["torch"][key], out["triton"][key], TOL)


def test_auto_on_cpu_is_the_reference_and_torch_backend_is_unchanged():
    x, w, b = _inputs(1, 2, 5, 16, 16)
    if DEV == "cpu":
        assert torch.equal(hedgehog_features(x, w, b), hedgehog_features_torch(x, w, b))
    # the module's torch path is exactly the reference (which is what the module computed before the dispatch)
    fm = HedgehogFeatureMap(2, 16)
    fm.backend = "torch"
    x = torch.randn(1, 2, 5, 16)
    y = torch.einsum("bhtd,hdp->bhtp", x, fm.weight) + fm.bias[None, :, None, :]
    assert torch.equal(fm(x), torch.cat([y.softmax(-1), (-y).softmax(-1)], -1))


def test_empty_sequence():
    x, w, b = _inputs(1, 2, 0, 16, 16)
    assert hedgehog_features(x, w, b, backend="triton").shape == (1, 2, 0, 32)
    assert based_features(x, w, backend="triton").shape == (1, 2, 0, 153)


def test_bad_inputs_raise_value_error():
    x, w, b = _inputs(1, 2, 8, 16, 16)
    with pytest.raises(ValueError, match="head dim"):
        hedgehog_features(torch.randn(1, 2, 8, 24), torch.randn(2, 24, 16), None, backend="triton")
    with pytest.raises(ValueError, match="projection dim"):
        based_features(x, torch.randn(2, 16, 12), backend="triton")
    with pytest.raises(ValueError, match="weight must be"):
        hedgehog_features(x, torch.randn(3, 16, 16), b, backend="triton")
    with pytest.raises(ValueError, match="bias must be"):
        hedgehog_features(x, w, torch.randn(2, 8), backend="torch")
    with pytest.raises(ValueError, match="x must be"):
        based_features(x[0], w, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        based_features(x, w, backend="cuda")
    with pytest.raises(ValueError, match="block_t"):
        hedgehog_features_triton(x, w, b, block_t=24)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        hedgehog_features_triton(x.double(), w, b)
    # auto falls back to the reference for sizes the kernels do not take (never raises for them)
    x24 = torch.randn(1, 2, 8, 24)
    w24 = torch.randn(2, 24, 16)
    assert torch.equal(hedgehog_features(x24, w24, None), hedgehog_features_torch(x24, w24, None))


def test_bench_runs_tiny_on_cpu():
    from linearize.bench.feature_maps import run_feature_map_bench

    rows = run_feature_map_bench(quick=True, device=DEV, shapes=[(1, 2, 20, 16)], with_compile=False)
    assert [r["map"] for r in rows] == ["hedgehog", "taylor"]
    for r in rows:
        assert not r.get("note"), r.get("note")
        for key in ("ref_fwd_ms", "ref_fb_ms", "tri_fwd_ms", "tri_fb_ms", "tri_fwd_GBps", "x_fwd", "x_fb"):
            assert r[key] > 0, key
        assert r["err_fwd"] < LOW_TOL and r["err_dx"] < LOW_TOL


def test_autocast_fp32_input_runs_low_precision():
    """Under autocast an fp32 x is projected in the autocast dtype, like the reference's einsum, and phi stays fp32."""
    x, w, b = _inputs(1, 2, 21, 16, 16)
    dev_type = x.device.type
    with torch.autocast(dev_type, dtype=torch.bfloat16):
        ref = hedgehog_features(x, w, b, backend="torch")
        got = hedgehog_features(x, w, b, backend="triton")
        ref_t = based_features(x, w, backend="torch")
        got_t = based_features(x, w, backend="triton")
    assert got.dtype == ref.dtype == torch.float32 and got_t.dtype == ref_t.dtype == torch.float32
    assert_close("hedgehog phi", ref, got, LOW_TOL)
    assert_close("taylor phi", ref_t, got_t, LOW_TOL)
