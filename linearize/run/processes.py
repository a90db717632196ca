"""Process coordination, in one place: one process, or every process of a ``torchrun`` / ``accelerate launch``.

The group is an ``accelerate.Accelerator`` (:func:`make_processes`; :func:`launched_processes` for a launch that
set ``WORLD_SIZE``), or :class:`SingleProcess` where a stage runs alone; the step loop needs only the
:class:`Processes` protocol. One idiom for work that one process does for all (building data, measuring,
choosing layers, exporting): :func:`on_main` runs it on the main process while the others wait, and a failure
there stops them too instead of leaving them waiting. Data-parallel steps exchange tensors through
:func:`average_gradients` and :func:`broadcast_from_main` (bucketed all-reduces) and split a batch with
:func:`share`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

from linearize.errors import ConfigError, LinearizeError
from linearize.io.devices import check_device

T = TypeVar("T")


class Processes(Protocol):
    """The part of ``accelerate.Accelerator`` the loop uses."""

    num_processes: int
    process_index: int
    is_main_process: bool
    device: torch.device

    def wait_for_everyone(self) -> None: ...

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor: ...

    def backward(self, loss: Tensor) -> None: ...

    def clip_grad_norm_(self, parameters, max_norm: float): ...

    def prepare_optimizer(self, optimizer): ...


class SingleProcess:
    """One process, no accelerate: what attention transfer runs in."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def wait_for_everyone(self) -> None:
        pass

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        return tensor

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def prepare_optimizer(self, optimizer):
        return optimizer


def make_processes(*, cpu: bool, mixed_precision: str = "no"):
    """The process group of both stages: an ``accelerate.Accelerator`` (one process, or every process of a
    ``torchrun`` / ``accelerate launch``), with a 12 h process-group timeout so the other processes can wait out
    the main one's calibration sampling and exports."""
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    return Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])


def launched_processes(device: str | None) -> Processes | None:
    """The process group of a distributed launch (``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE`` > 1): an
    ``accelerate.Accelerator`` (gloo on CPU, NCCL on CUDA with one GPU per process, no autocast), with a 12 h
    process-group timeout so the others can wait out the main process's calibration sampling and export. None when
    this is the only process.

    Raises:
        ConfigError: ``device`` is not usable (see :func:`~linearize.io.devices.check_device`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return make_processes(cpu=not check_device(device).startswith("cuda"))


def on_main(processes: Processes | None, fn: Callable[[], T]) -> T | None:
    """``fn()`` on the main process only (None on the others), which all wait for it; when it raised, it raises
    again on the main process and the others stop with a LinearizeError instead of waiting forever."""
    if processes is None or processes.num_processes == 1:
        return fn()
    result, error = None, None
    if processes.is_main_process:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    flag = torch.tensor([0.0 if error is None else 1.0], device=processes.device)
    failed = processes.reduce(flag, reduction="sum").item() > 0
    if error is not None:
        raise error
    if failed:
        raise LinearizeError("stopped: the main process failed (its own error message says why)")
    return result


BUCKET_ELEMENTS = 1 << 25
"""Elements per all-reduce (128 MiB in fp32): feature maps of a 70B model are ~95M parameters (docs/convert.md)."""


def _buckets(tensors: list[Tensor]) -> Iterator[list[Tensor]]:
    """``tensors`` in order, grouped by dtype and device, in runs of at most :data:`BUCKET_ELEMENTS` elements (a
    larger tensor alone)."""
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        run: list[Tensor] = []
        size = 0
        for t in group:
            if run and size + t.numel() > BUCKET_ELEMENTS:
                yield run
                run, size = [], 0
            run.append(t)
            size += t.numel()
        if run:
            yield run


def _all_reduce(tensors: list[Tensor], processes: Processes, *, mean: bool) -> None:
    """Replace every tensor by its sum (or mean) over the processes, in place: one all-reduce per bucket."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket]).to(processes.device)
        flat = processes.reduce(flat, reduction="sum")
        if mean:
            flat = flat / processes.num_processes
        offset = 0
        for t in bucket:
            with torch.no_grad():
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: Iterable[nn.Parameter], processes: Processes | None) -> None:
    """Average the gradients of ``params`` over the processes (nothing with one). Parameters without a gradient
    are left so: every process runs the same step code, so the same ones have none everywhere."""
    if processes is None or processes.num_processes == 1:
        return
    _all_reduce([p.grad for p in params if p.grad is not None], processes, mean=True)


def broadcast_from_main(tensors: Iterable[Tensor], processes: Processes | None) -> None:
    """Give every process the main process's values of ``tensors`` (floating point; in place). A sum in which every
    other process adds zeros, so the values arrive exactly."""
    if processes is None or processes.num_processes == 1:
        return
    tensors = [t for t in tensors if t.is_floating_point()]
    if not processes.is_main_process:
        with torch.no_grad():
            for t in tensors:
                t.zero_()
    _all_reduce(tensors, processes, mean=False)


def share(batch_size: int, processes: Processes | None) -> tuple[int, int]:
    """(first, end) of this process's contiguous share of a step's ``batch_size`` sequences.

    Raises:
        ConfigError: ``batch_size`` does not split evenly over the processes.
    """
    world, rank = (processes.num_processes, processes.process_index) if processes is not None else (1, 0)
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} (convert.batch_size) must be a multiple of the number of "
                          f"processes ({world}): every process takes an equal share of each step's batch")
    per = batch_size // world
    return rank * per, (rank + 1) * per


__all__ = ["Processes", "SingleProcess", "average_gradients", "broadcast_from_main", "launched_processes",
           "make_processes", "on_main", "share"]
