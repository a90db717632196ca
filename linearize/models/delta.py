"""Delta exports: only the parameters linearization added, plus the name of the base model they go on.

A conversion (stage 1) trains the feature maps and mix factors and leaves every base weight as it was, so an export
can hold just those (``linearize_delta.safetensors``: a few MB for a 7B model instead of 13 GB) and the base model's
reference (``config.json``: ``linearize.delta_base``, a hub id, a local folder or a .gguf file, the teacher the
conversion loaded). ``from_pretrained`` on such a folder (registered classes or ``trust_remote_code``) loads the base
through :func:`linearize.io.loading.load_model`, puts the added parameters next to its weights and returns the full
linearized model: the same logits as a full export of the same conversion.

The base must be the same weights the conversion saw: a local folder or GGUF file that changed since, or a hub id
whose files were updated, gives a different model (nothing here can tell). A local base is recorded by its absolute
path, the one local path an export may hold (it cannot load without it): such a folder loads only where that path
exists, and its model card says so; share a full export instead. A model loaded from a delta export is whole, and
saves (``save_pretrained``, ``push_to_hub``) as a full export without ``delta_base``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from linearize.errors import ConfigError, ModelLoadError

DELTA_FILE = "linearize_delta.safetensors"


def added_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters linearization added (every linear attention layer's feature maps and mix factor), by their
    names in ``model``'s state dict."""
    from linearize.modules.attention import HybridLinearAttention

    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, HybridLinearAttention):
            for name, tensor in module.state_dict().items():
                out[f"{prefix}.{name}"] = tensor.detach().contiguous()
    return out


def write_delta(model: nn.Module, folder: Path, base: str) -> int:
    """Write ``model``'s config (naming ``base``), generation config and added parameters into ``folder``; returns the
    bytes of the weights file."""
    from safetensors.torch import save_file

    model.config.linearize = {**model.config.linearize, "delta_base": base}
    try:
        model.config.save_pretrained(folder)  # the remote-code shim too (LinearizedConfigMixin)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
    finally:
        model.config.linearize = {k: v for k, v in model.config.linearize.items() if k != "delta_base"}
    save_file(added_parameters(model), str(folder / DELTA_FILE), metadata={"format": "pt", "delta_base": base})
    return (folder / DELTA_FILE).stat().st_size


def is_delta_export(path: str | Path) -> bool:
    return (Path(str(path)) / DELTA_FILE).is_file()


def load_delta(cls: type, path: str | Path, **kwargs: Any):
    """``cls.from_pretrained(path)`` for a delta export: base weights from ``linearize.delta_base`` + the added
    parameters. Takes ``dtype`` / ``torch_dtype`` (a dtype, a name or "auto") and ``device_map`` as a single device.

    Raises:
        ModelLoadError: the config names no base, or the base's weights do not fit this model's layout.
        ConfigError: a ``device_map`` that is not one device.
    """
    from safetensors.torch import load_file

    from linearize.io.loading import load_model

    path = Path(str(path))
    config = kwargs.pop("config", None) or cls.config_class.from_pretrained(path)
    base = (config.linearize or {}).get("delta_base")
    if not base:
        raise ModelLoadError(f"{path} holds {DELTA_FILE} but its config.json names no linearize.delta_base")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    device = kwargs.get("device_map")
    if device is not None and not isinstance(device, (str, torch.device)):
        raise ConfigError(f"a delta export loads onto one device; got device_map={device!r}")
    teacher, _ = load_model(base, dtype=dtype)
    weights = teacher.state_dict()
    weights.update(load_file(str(path / DELTA_FILE)))
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not _tied(model, k)]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: the base {base} does not fit this export (missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}); it must be the model the conversion started from")
    buffers = dict(teacher.named_buffers())
    for name, buf in list(model.named_buffers()):  # non-persistent buffers (RoPE tables) are not in a state dict
        if buf.is_meta:
            if name not in buffers:
                raise ModelLoadError(f"{path}: buffer {name} is in neither the base {base} nor {DELTA_FILE}")
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name).register_buffer(attr, buffers[name], persistent=False)
    model.tie_weights()
    # the loaded model is whole: its save_pretrained / push_to_hub writes a full export, which names no base
    model.config.linearize = {k: v for k, v in model.config.linearize.items() if k != "delta_base"}
    model = model.to(dtype=dtype).eval()
    return model.to(device) if device is not None else model


def _tied(model: nn.Module, key: str) -> bool:
    """``key`` is a weight tied to another (the LM head to the embeddings) that the state dict lists once."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = tied.keys() if isinstance(tied, dict) else tied
    return key in names and getattr(model.config, "tie_word_embeddings", False)


__all__ = ["DELTA_FILE", "added_parameters", "is_delta_export", "load_delta", "write_delta"]
