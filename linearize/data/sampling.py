"""Data-free calibration: the frozen teacher writes its own documents, resumably.

:func:`sample_teacher_tokens` samples from BOS (plus optional prompts), seeded, leaving the global RNG untouched;
with ``resume_dir`` the documents so far and the sampler's RNG state are saved after every batch, so a run killed
while sampling continues where it stopped with the samples an uninterrupted run draws.

Sampling is a decode loop whose steps cost about the same at batch 8 or 512 on a GPU (launch- and weight-bound), so
on CUDA the batch defaults to every document still needed at once, as far as a quarter of the GPU's memory holds
their KV cache (:func:`auto_batch_size`): the default conversion of SmolLM2-135M samples 412 documents in one pass
of 1,023 steps where batches of 64 took five (H100, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from linearize.errors import ConfigError, DataError
from linearize.run.progress import Progress, QuietProgress

CPU_BATCH = 64  # sequences per generate() call on the CPU, where a step's cost grows with the batch
_MAX_GPU_BATCH = 1024
_KV_SHARE = 0.25  # of the GPU's total memory, for the samples' KV cache


def kv_bytes_per_token(model: Any) -> int | None:
    """Bytes one token's keys and values take over all layers in ``model``'s dtype (the teacher's KV cache of
    :class:`~linearize.models.cache.CacheGeometry`), or None when its config does not say."""
    from linearize.models.cache import CacheGeometry
    from linearize.modules.config import LinearAttentionConfig

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        return CacheGeometry.from_config(cfg.to_dict(), LinearAttentionConfig(),
                                         next(model.parameters()).element_size()).teacher_bytes(1)
    except TypeError:  # no head or layer count in the config
        return None


def auto_batch_size(per_token: int | None, seq_len: int, rows_needed: int, device: torch.device) -> int:
    """Documents to sample at once: on CUDA all ``rows_needed`` as far as their KV cache (``per_token`` bytes a
    token, :func:`kv_bytes_per_token`) at ``seq_len`` tokens fits a quarter of the GPU's total memory (at most 1,024;
    deterministic for a device and model, so a resumed run picks the same); otherwise :data:`CPU_BATCH`."""
    if device.type != "cuda" or per_token is None:
        return max(1, min(CPU_BATCH, rows_needed))
    total = torch.cuda.get_device_properties(device).total_memory
    fits = int(total * _KV_SHARE) // (per_token * seq_len)
    return max(1, min(rows_needed, fits, _MAX_GPU_BATCH))


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    stops = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


@torch.no_grad()
def sample_teacher_tokens(
    model: Any,
    tokenizer: Any,
    *,
    n_tokens: int,
    seq_len: int,
    batch_size: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    prompts: Sequence[str] | None = None,
    resume_dir: Path | None = None,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Let the frozen teacher write its own calibration documents, as token ids (no re-tokenization drift).

    With ``resume_dir``, the documents so far and the sampler's RNG state are saved there after every batch, so a
    run killed while sampling continues where it stopped, with the samples an uninterrupted run draws.

    Each document starts at BOS (EOS for tokenizers without one), optionally followed by one of ``prompts`` (batch
    ``i`` uses ``prompts[i % len(prompts)]``, so a batch needs no padding), and runs until the model emits EOS or
    the document reaches ``seq_len`` tokens. Sampling is seeded and leaves the global RNG untouched; its samples
    depend on ``batch_size`` (None: :func:`auto_batch_size`). ``progress`` shows the tokens written so far.

    Returns:
        1-D int64 CPU tensors, one per document, together holding at least ``n_tokens`` tokens; a document ends with
        EOS only when the model ended it.

    Raises:
        ConfigError: ``temperature <= 0`` (greedy decoding from one start token repeats one sample) or bad sizes.
        DataError: the tokenizer has neither BOS nor EOS to start from.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0: greedy decoding from BOS gives identical samples")
    if n_tokens < 1 or seq_len < 2 or (batch_size is not None and batch_size < 1):
        raise ConfigError(f"need n_tokens >= 1, seq_len >= 2, batch_size >= 1; got {n_tokens}, {seq_len}, {batch_size}")
    device = next(model.parameters()).device
    # a first guess at a document's length: the full seq_len, or on CUDA with the automatic batch half of it (extra
    # rows cost next to nothing there, and a second pass of seq_len steps for the documents that ended early costs
    # as much as the first); later batches use the mean length of the documents written so far
    guess = seq_len
    if batch_size is None:
        guess = seq_len // 2 if device.type == "cuda" else seq_len
        batch_size = auto_batch_size(kv_bytes_per_token(model), seq_len, math.ceil(n_tokens / guess), device)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError("the tokenizer has no BOS or EOS token to start teacher sampling from; pass text data")
    starts = [[start] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts] if prompts else [[start]]
    too_long = [len(s) for s in starts if len(s) >= seq_len]
    if too_long:
        raise ConfigError(f"a prompt has {too_long[0]} tokens, not shorter than seq_len={seq_len}")
    stops = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    docs: list[torch.Tensor] = []
    _sample_loop(model, starts, stops, pad, device, docs, n_tokens, seq_len, batch_size, guess, seed, temperature,
                 top_p, resume_dir, progress or QuietProgress())
    return docs


def _sample_loop(model: Any, starts: list[list[int]], stops: set[int], pad: int, device: torch.device,
                 docs: list[torch.Tensor], n_tokens: int, seq_len: int, batch_size: int, guess: int, seed: int,
                 temperature: float, top_p: float, resume_dir: Path | None, progress: Progress) -> None:
    collected = 0
    cuda = device.type == "cuda"
    settings = {"n_tokens": n_tokens, "seq_len": seq_len, "batch_size": batch_size, "guess": guess, "seed": seed,
                "temperature": temperature, "top_p": top_p, "starts": starts, "device": device.type}
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(seed)
        step = 0
        saved = _load_sampling_state(resume_dir, settings) if resume_dir is not None else None
        if saved is not None:
            step, restored, cpu_rng, cuda_rng = saved
            docs.extend(restored)
            collected = sum(d.numel() for d in restored)
            torch.set_rng_state(cpu_rng)
            if cuda and cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
        with progress.task("sampling calibration text from the teacher", n_tokens, "tokens") as task:
            task.update(collected)
            while collected < n_tokens:
                prefix = starts[step % len(starts)]
                expected = collected / len(docs) if docs else guess  # tokens a document gets, on average
                rows = min(batch_size, math.ceil((n_tokens - collected) / expected))  # a short last batch
                ids = torch.tensor([prefix] * rows, device=device)  # (B, P)
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                    top_p=top_p, top_k=0, max_new_tokens=seq_len - len(prefix), pad_token_id=pad,
                    eos_token_id=sorted(stops) or None,
                ).cpu()  # (B, <= seq_len)
                for row in out:
                    new = row[len(prefix):]
                    hits = [i for i, t in enumerate(new.tolist()) if t in stops]
                    doc = row[: len(prefix) + hits[0] + 1] if hits else row
                    docs.append(doc.long())
                    collected += doc.numel()
                step += 1
                task.update(min(collected, n_tokens))
                if resume_dir is not None and collected < n_tokens:
                    _save_sampling_state(resume_dir, settings, step, docs, device if cuda else None)


def _save_sampling_state(folder: Path, settings: dict, step: int, docs: list[torch.Tensor],
                         cuda_device: torch.device | None) -> None:
    """Documents (concatenated + lengths) and RNG states as safetensors, settings as JSON; replaced atomically."""
    from safetensors.torch import save_file

    tensors = {"tokens": torch.cat(docs), "lengths": torch.tensor([d.numel() for d in docs]),
               "cpu_rng": torch.get_rng_state()}
    if cuda_device is not None:
        tensors["cuda_rng"] = torch.cuda.get_rng_state(cuda_device)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.tmp.safetensors"
    save_file(tensors, str(tmp))
    (folder / "meta.tmp.json").write_text(json.dumps({"settings": settings, "step": step}))
    tmp.replace(folder / "state.safetensors")  # the tensors first: meta names a step only once they are in place
    (folder / "meta.tmp.json").replace(folder / "meta.json")


def _load_sampling_state(folder: Path, settings: dict):
    """(step, documents, cpu RNG, cuda RNG or None) saved with the same settings, or None."""
    from safetensors.torch import load_file

    meta_file, state_file = folder / "meta.json", folder / "state.safetensors"
    if not (meta_file.is_file() and state_file.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("settings") != json.loads(json.dumps(settings)):
        return None
    t = load_file(str(state_file))
    if int(t["lengths"].numel()) == 0:
        return None
    docs = list(torch.split(t["tokens"], t["lengths"].tolist()))
    return meta["step"], docs, t["cpu_rng"], t.get("cuda_rng")


