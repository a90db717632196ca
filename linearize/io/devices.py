"""Devices and dtypes: the one place that resolves ``--device`` / ``--dtype`` (CLI, recipes, evaluation, loading).

    check_device(None)                      # "cuda" when a GPU is visible, else "cpu"
    resolve_dtype("auto", "cuda")           # torch.bfloat16 (float32 on CPU)
    to_dtype("bf16")                        # torch.bfloat16
"""

from __future__ import annotations

import torch

from linearize.errors import ConfigError

#: accepted dtype names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def to_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A dtype or its name (``None`` = float32).

    Raises:
        ConfigError: an unknown name.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = dtype.removeprefix("torch.").lower()
    if key not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of float32, bfloat16, float16")
    return DTYPES[key]


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """``dtype``, where ``None`` / ``"auto"`` means bfloat16 on CUDA and float32 elsewhere."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return to_dtype(dtype)


def check_device(device: str | None, *, flag: str = "--device") -> str:
    """``device`` (None = cuda when available) if this PyTorch can use it.

    Raises:
        ConfigError: not a device name, or a CUDA device this PyTorch cannot see.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {device!r} is not a device; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise ConfigError(f"{flag} {device}: this PyTorch ({torch.__version__}, {build}) has no CUDA GPU; "
                              f"use {flag} cpu")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{flag} {device}: only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise ConfigError(f"{flag} {device!r}: linearize runs on cpu or cuda")
    return device


__all__ = ["DTYPES", "check_device", "resolve_dtype", "to_dtype"]
