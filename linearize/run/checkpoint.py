"""Resumable training state: parameters + optimizer state as safetensors, everything else as JSON (no pickle).

Shared by attention transfer and LoRA finetuning. A checkpoint is a folder (``state.safetensors`` + ``meta.json``)
replaced atomically: written beside the old one, then renamed over it, so a kill never leaves half a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from linearize.errors import ConfigError

NamedParams = list[tuple[str, Tensor]]


def save_training_state(path: Path, params: NamedParams, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Write ``params`` (name, tensor), the optimizer's state and ``meta`` to the folder ``path``."""
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params}
    scalars: dict[str, float] = {}
    for pid, st in opt.state_dict()["state"].items():
        for name, val in st.items():
            if isinstance(val, Tensor) and val.dim() > 0:
                tensors[f"opt.{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = float(val)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "param_names": [n for n, _ in params],
                                               "opt_scalars": scalars}, indent=1))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(path: Path, params: NamedParams, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into ``params`` and ``opt``; return the meta dict.

    Raises:
        ConfigError: the checkpoint holds other parameters than ``params`` (the settings changed).
    """
    tensors = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    if meta["param_names"] != [n for n, _ in params]:
        raise ConfigError(f"checkpoint {path} was written for other trainable parameters; "
                          "resume with the same settings, or start over (--overwrite / overwrite: true)")
    with torch.no_grad():
        for n, p in params:
            p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
    device = params[0][1].device if params else torch.device("cpu")
    osd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = val.to(device)
    for key, val in meta["opt_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = torch.tensor(val)
    osd["state"] = state
    opt.load_state_dict(osd)
    return meta


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training loop at a step boundary, after saving a checkpoint; rerunning resumes there."""


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True) -> Iterator[Callable[[], bool]]:
    """Inside the block the first Ctrl-C (SIGINT) only sets a flag, read by the yielded ``requested()``: the loop
    finishes its step, checkpoints and raises :class:`Interrupted`. A second Ctrl-C raises at once. Off (plain
    KeyboardInterrupt) outside the main thread, when ``enabled`` is False (several processes: they would not stop at
    the same step) or where SIGINT is ignored."""
    if not enabled or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    state = {"hit": False}

    def handler(signum, frame):
        if state["hit"]:
            raise KeyboardInterrupt
        state["hit"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: state["hit"]
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
