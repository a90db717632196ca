"""Backend choice of the delta rule (``linearize/kernels/delta/__init__.py``) and the fla path's errors on a machine
without fla-core or CUDA. The fla kernels themselves are compared with the PyTorch form in
``tests/gpu/test_gpu_delta.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from linearize.errors import LinearizeError
from linearize.kernels.delta import (
    FLA_CORE_VERSION,
    delta_attention,
    delta_fla,
    delta_recurrent,
    has_fla,
    pick_delta_backend,
)
from linearize.kernels.delta.fla import fla_adapted, fla_backward_refused
from tests.kernels.conftest import assert_close
from tests.kernels.test_delta_reference import make_inputs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_fla(monkeypatch):
    """fla-core absent, whether or not it is installed here (a None entry in sys.modules makes the import fail)."""
    for name in ("fla", "fla.ops", "fla.ops.gated_delta_rule"):
        monkeypatch.setitem(sys.modules, name, None)
    has_fla.cache_clear()
    yield
    has_fla.cache_clear()


def test_missing_fla_core_names_the_pinned_install(no_fla):
    fq, fk, v, beta, log_a, _ = (x.detach() for x in make_inputs())
    for call in (lambda: delta_fla(fq, fk, v, beta, log_a, window=2),
                 lambda: delta_attention(fq, fk, v, beta, log_a, window=2, backend="fla")):
        with pytest.raises(LinearizeError, match=rf"pip install fla-core=={FLA_CORE_VERSION}"):
            call()
    assert not has_fla()
    assert pick_delta_backend("auto", fq) == "torch"


def test_auto_takes_torch_for_cpu_tensors_and_fla_refuses_them():
    fq, fk, v, beta, log_a, _ = (x.detach() for x in make_inputs())
    assert pick_delta_backend("auto", fq, fk, v) == "torch"
    assert pick_delta_backend("fla", fq) == "fla"  # forced: delta_fla then says what is wrong
    assert not fla_backward_refused(fq.device)
    if has_fla():
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            delta_fla(fq, fk, v, beta, log_a, window=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        pick_delta_backend("cuda", fq)


def test_pyproject_delta_extra_pins_the_version_the_wrapper_names():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["delta"] == [f"fla-core=={FLA_CORE_VERSION}"]


def test_fla_chunk_size_is_checked_before_anything_runs():
    fq, fk, v, beta, log_a, _ = (x.detach() for x in make_inputs())
    with pytest.raises(ValueError, match="chunk size must be 16, 32 or 64"):
        delta_fla(fq, fk, v, beta, log_a, window=2, chunk=48)


CASES = [(0, 0, 2, False), (1, 5, 4, True), (5, 3, 2, True), (40, 5, 4, True)]  # (window, P, Hs, S0)


@pytest.mark.parametrize("window,P,Hs,s0", CASES, ids=[f"W{w}-P{p}-Hs{h}-{'S0' if s else 'zero'}"
                                                      for w, p, h, s in CASES])
def test_fla_conventions_through_fla_cores_own_naive_recurrence(window, P, Hs, s0):
    """The adaptation ``delta_fla`` applies (window shift, repeated heads, padded sizes, scale 1) around fla-core's
    pure-PyTorch ``naive_recurrent_gated_delta_rule`` gives ``delta_recurrent``: fla's sign and ordering conventions
    are ours. Runs on CPU where fla-core is installed."""
    fla_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason=f"needs fla-core=={FLA_CORE_VERSION}")

    def kernel(q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, chunk_size):
        assert not use_qk_l2norm_in_kernel and chunk_size == 64
        return fla_naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                                          output_final_state=output_final_state)

    fq, fk, v, beta, log_a, S0 = (x.detach() if x is not None else None for x in make_inputs(P=P, Hs=Hs, s0=s0))
    ref = delta_recurrent(fq, fk, v, beta, log_a, window=window, initial_state=S0, output_final_state=True)
    got = fla_adapted(kernel, fq, fk, v, beta, log_a, window=window, initial_state=S0, output_final_state=True)
    for name, r, o in zip(("L_n", "L_d", "final_state"), ref, got):
        assert_close(name, r, o, 1e-5)
