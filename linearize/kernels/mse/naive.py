"""Reference: the mean squared error of attention transfer, ``mean((o - target)^2)`` in fp32 over every element, for
``o`` and ``target`` of any shape and float dtype (LoLCATs' stage-1 loss on the attention outputs)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_pair(o: Tensor, target: Tensor) -> None:
    if o.shape != target.shape:
        raise ValueError(f"mse: output {tuple(o.shape)} and target {tuple(target.shape)} differ in shape")
    if o.numel() == 0:
        raise ValueError("mse: empty tensors have no mean")


def mse_torch(o: Tensor, target: Tensor) -> Tensor:
    """``mean((o - target)^2)`` as an fp32 scalar; differentiable in ``o`` (and ``target``)."""
    check_pair(o, target)
    return torch.mean((o.float() - target.float()) ** 2)


__all__ = ["check_pair", "mse_torch"]
