"""Kernel-test fixtures: NaN-poisoned ``torch.empty`` so a kernel that leaves part of its output unwritten fails."""

from __future__ import annotations

import pytest
import torch

_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    x = _empty(*args, **kwargs)
    if x.is_floating_point():
        x.fill_(float("nan"))
    elif x.dtype in (torch.int32, torch.int64):
        x.fill_(-(2**30))
    return x


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every ``torch.empty`` made during a kernel test starts as NaN (floats) or a large negative int."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b`` (NaN anywhere in ``a`` gives NaN)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor | None, got: torch.Tensor | None, tol: float) -> None:
    if ref is None or got is None:  # autograd gives None for an input that was never read: same as zero
        if ref is None and got is None:
            return
        ref = torch.zeros_like(got) if ref is None else ref
        got = torch.zeros_like(ref) if got is None else got
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: {int(torch.isnan(got).sum())} NaN entries (unwritten output?)"
    if ref.abs().max() == 0:
        assert got.abs().max() == 0, f"{name}: reference is zero, got max |x| = {got.abs().max().item():.3g}"
        return
    err = rel_err(got, ref)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g} (max abs diff {(got - ref).abs().max().item():.3g})"
