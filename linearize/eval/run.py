"""``linearize eval``: every evaluation of an :class:`~linearize.eval.config.EvalConfig`, for the model and (with
``compare``) its teacher, side by side.

The models are loaded one after the other (SDPA attention, bfloat16 on a GPU and float32 on the CPU unless
``dtype`` says otherwise), so only one is in memory at a time. Each gets the same tasks, seeds and prompts. The
result is a plain dict (JSON-ready):

    {"config": {...}, "device": "cuda", "dtype": "bfloat16",
     "model":   {"info": {...}, "ppl": {...}, "mc": {"piqa": {...}}, "passkey": {...}, "mqar": {...}, "seconds": {...}},
     "teacher": {... the same ...} or None,
     "summary": [{"metric": "ppl wiki.valid.raw", "model": 21.4, "teacher": 18.9, "better": "lower"}, ...]}

``info.state_bytes`` is what one sequence holds in the cache after a prompt of ``context`` tokens (measured from
the cache a real forward pass returns): constant for a linearized model, growing with the prompt for softmax.

    from linearize.eval import EvalConfig, render_table, run_eval
    result = run_eval(EvalConfig(model="out/export", compare="teacher/", tasks=["passkey", "mqar"]))
    rich.print(render_table(result))
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from torch import nn

from linearize.errors import LinearizeError
from linearize.eval.config import EvalConfig
from linearize.eval.multiple_choice import evaluate_task
from linearize.eval.perplexity import file_perplexity
from linearize.eval.recall import mqar, passkey
from linearize.eval.scoring import model_device
from linearize.io.loading import context_length
from linearize.run.progress import Progress, QuietProgress

__all__ = ["evaluate_model", "render_table", "run_eval", "state_bytes",
           "summarize", "write_json"]


def state_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes of cache one sequence holds after a prompt of ``tokens`` tokens, read from a real forward pass: a
    linearized cache's own ``nbytes()`` (recurrent states, window rings, softmax layers' KV), else every key and
    value tensor of the returned cache."""
    from linearize.models.base import output_cache
    from linearize.models.cache import cache_nbytes

    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(tokens) % vocab)[None].to(model_device(model))
    return cache_nbytes(output_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1)))


def _info(model: nn.Module, name: str, tokens: int) -> dict:
    config = model.config
    linearize = getattr(config, "linearize", None)
    return {"name": name, "model_type": config.model_type, "linearized": linearize is not None,
            "linearize": dict(linearize) if linearize else None,
            "params": sum(p.numel() for p in model.parameters()), "max_positions": context_length(model.config),
            "state_bytes": {"tokens": tokens, "bytes": state_bytes(model, tokens)}}


def evaluate_model(source: str, cfg: EvalConfig, *, device: str, dtype: str,
                   progress: Progress = QuietProgress()) -> dict:
    """Load ``source`` and run ``cfg.tasks`` on it; the model is freed before returning.

    Raises:
        ModelLoadError: ``source`` does not load; plus the data errors of the tasks (missing text or task file).
    """
    from linearize.io.loading import load_model, model_reference

    progress.log(f"loading {source} ({dtype}, {device})")
    model, tokenizer = load_model(source, dtype=dtype, device=device, attn_implementation="sdpa")
    limit = context_length(model.config)
    context, stride = cfg.context, cfg.stride
    if limit is not None and context > limit:
        context, stride = limit, min(stride, limit)
        if "ppl" in cfg.selected_tasks:
            progress.log(f"perplexity context {cfg.context} > max_position_embeddings {limit}: using context "
                         f"{context}, stride {stride}")
    out: dict = {"info": _info(model, model_reference(source), context), "seconds": {}}
    try:
        for task in cfg.selected_tasks:
            t0 = time.perf_counter()
            if task == "ppl":
                out["ppl"] = file_perplexity(model, tokenizer, cfg.text, context=context, stride=stride,
                                             max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, progress=progress)
            elif task == "mc":
                out["mc"] = {}
                for path in cfg.mc_files:
                    r = evaluate_task(model, tokenizer, path, limit=cfg.limit, delimiter=cfg.mc_delimiter,
                                      batch_size=cfg.batch_size, progress=progress)
                    out["mc"][r["task"]] = r
            elif task == "passkey":
                out["passkey"] = passkey(model, tokenizer, contexts=cfg.passkey_contexts, depths=cfg.passkey_depths,
                                         samples=cfg.passkey_samples, seed=cfg.seed, batch_size=cfg.batch_size,
                                         progress=progress)
                for skip in out["passkey"]["skipped"]:
                    progress.log(f"passkey context {skip['context']} skipped: {skip['reason']}")
            elif task == "mqar":
                out["mqar"] = mqar(model, tokenizer, pairs=cfg.mqar_pairs, samples=cfg.mqar_samples, seed=cfg.seed,
                                   batch_size=cfg.batch_size, progress=progress)
                for skip in out["mqar"]["skipped"]:
                    progress.log(f"mqar N={skip['pairs']} skipped: {skip['reason']}")
            out["seconds"][task] = time.perf_counter() - t0
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _rows(side: dict) -> dict[str, tuple[float, str]]:
    """metric name -> (value, "lower" | "higher") for one evaluated model."""
    rows: dict[str, tuple[float, str]] = {}
    if "ppl" in side:
        rows[f"ppl {Path(side['ppl']['text']).name}"] = (side["ppl"]["ppl"], "lower")
    for name, r in side.get("mc", {}).items():
        for key in ("acc", "acc_norm"):
            if key in r:
                rows[f"{name} {key}"] = (r[key], "higher")
        if "ppl" in r:
            rows[f"{name} ppl"] = (r["ppl"], "lower")
    if "passkey" in side and side["passkey"]["acc"] is not None:
        for ctx, acc in side["passkey"]["by_context"].items():
            rows[f"passkey acc @{ctx}"] = (acc, "higher")
        rows["passkey acc"] = (side["passkey"]["acc"], "higher")
    if "mqar" in side and side["mqar"]["acc"] is not None:
        for n, acc in side["mqar"]["by_pairs"].items():
            rows[f"mqar acc N={n}"] = (acc, "higher")
        rows["mqar acc"] = (side["mqar"]["acc"], "higher")
    sb = side["info"]["state_bytes"]
    rows[f"state MiB/seq @{sb['tokens']}"] = (sb["bytes"] / 2**20, "lower")
    return rows


def summarize(result: dict) -> list[dict]:
    """One ``{"metric", "model", "teacher", "better"}`` row per metric of either side (None where a side lacks it,
    e.g. a passkey context that only one of them could hold)."""
    mine = _rows(result["model"])
    theirs = _rows(result["teacher"]) if result.get("teacher") else {}
    names = list(dict.fromkeys([*mine, *theirs]))
    return [{"metric": n, "model": mine.get(n, (None,))[0], "teacher": theirs.get(n, (None,))[0],
             "better": (mine.get(n) or theirs.get(n))[1]} for n in names]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_table(result: dict):
    """A ``rich.table.Table`` of :func:`summarize`'s rows: metric, model, and with a teacher, the teacher and the
    model/teacher ratio (perplexities, state size: lower is better) or the model - teacher difference
    (accuracies)."""
    from rich.table import Table

    teacher = result.get("teacher")
    table = Table(title=f"eval: {result['model']['info']['name']}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if teacher:
        table.add_column("teacher", justify="right")
        table.add_column("model / teacher or model - teacher", justify="right")
    for row in result["summary"]:
        cells = [row["metric"], _fmt(row["model"])]
        if teacher:
            cells.append(_fmt(row["teacher"]))
            if row["model"] is None or row["teacher"] is None:
                cells.append("-")
            elif row["better"] == "lower":
                cells.append(f"x{row['model'] / row['teacher']:.3f}" if row["teacher"] else "-")
            else:
                cells.append(f"{row['model'] - row['teacher']:+.3f}")
        table.add_row(*cells)
    return table


def write_json(result: dict, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``result`` as indented JSON marked ``"written_by": "linearize X.Y.Z"`` (parent folders created); returns
    the path. An existing file is replaced only when linearize wrote it and ``overwrite`` is set.

    Raises:
        LinearizeError: ``path`` breaks the rule of :func:`linearize.export.writer.check_output_file`, or the write failed.
    """
    from linearize.export.writer import check_output_file, marked_json, write_output_file

    check_output_file(path, overwrite=overwrite, flag="--json-out")  # again at the end: the file may be new
    return write_output_file(path, marked_json(result))


def run_eval(cfg: EvalConfig, progress: Progress = QuietProgress()) -> dict:
    """Evaluate ``cfg.model`` (and ``cfg.compare``) on ``cfg.selected_tasks``; write ``cfg.json_out``, then the plots
    into ``cfg.plot``.

    Everything that needs no weights is checked before the first model loads: the settings, the outputs (a file
    linearize did not write is never replaced; matplotlib importable for plots), the device, both models' sources.

    Returns:
        the result dict described in the module docstring (with ``"plots"``: the PNG paths, when ``plot`` is set).

    Raises:
        ConfigError: invalid settings or outputs (all listed at once), or a CUDA device without a GPU.
        ModelLoadError: a model does not load.
        DataError: a text or task file is missing or unusable.
        LinearizeError: writing the JSON or a plot failed (naming the file).
    """
    from linearize.io.devices import check_device, resolve_dtype
    from linearize.io.loading import check_source

    cfg.check()
    device = check_device(None if cfg.device == "auto" else cfg.device, flag="--device")
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    for source in (cfg.model, cfg.compare):
        if source:
            check_source(source)
    result: dict = {"config": cfg.model_dump(), "device": device, "dtype": dtype}
    result["model"] = evaluate_model(cfg.model, cfg, device=device, dtype=dtype, progress=progress)
    result["teacher"] = (evaluate_model(cfg.compare, cfg, device=device, dtype=dtype, progress=progress)
                         if cfg.compare else None)
    result["summary"] = summarize(result)
    if cfg.json_out:  # the results first, then the extras
        progress.log(f"wrote {write_json(result, cfg.json_out, overwrite=cfg.overwrite)}")
    if cfg.plot:
        from linearize.eval.plots import write_plots

        try:
            result["plots"] = [str(p) for p in write_plots(result, cfg.plot)]
        except LinearizeError as e:
            raise type(e)(f"{e}" + (f" (the results are in {cfg.json_out})" if cfg.json_out else "")) from None
        progress.log(f"wrote {len(result['plots'])} plot(s) in {cfg.plot}")
    return result
