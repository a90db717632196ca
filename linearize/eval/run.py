"""``linearize eval``: every evaluation of an :class:`~linearize.eval.config.EvalConfig`, for the model and (with
``compare``) its teacher, side by side, with two baselines that say what the linear part is worth.

The models are loaded one after the other (SDPA attention, bfloat16 on a GPU and float32 on the CPU unless
``dtype`` says otherwise), so only one is in memory at a time. Each gets the same tasks, seeds and prompts. The
result is a plain dict (JSON-ready):

    {"config": {...}, "device": "cuda", "dtype": "bfloat16",
     "model":   {"info": {...}, "ppl": {...}, "distance": {...}, "mc": {"piqa": {...}}, "passkey": {...},
                 "mqar": {...}, "seconds": {...}},
     "teacher": {... the same ...} or None,
     "baselines": {"linear-off": {... the same ...}, "streaming": {... the same ...}},
     "baselines_skipped": {"streaming": "no teacher to cut to the model's sinks + window (pass compare)"},
     "summary": [{"metric": "ppl wiki.valid.raw", "model": 21.4, "teacher": 18.9, "linear-off": 35.0,
                  "streaming": 30.2, "better": "lower"}, ...]}

The baselines (``baselines``, both by default, each where it can run) are rows a linearized model must beat for its
recurrent state to be worth anything:

- ``linear-off``: the model itself with its linear part switched off
  (:func:`~linearize.modules.attention.linear_part_off`): sinks + window + softmax layers only. Every task runs a
  second time on the already-loaded model.
- ``streaming``: StreamingLLM (arXiv:2309.17453) at the model's settings: the teacher converted in place to the
  model's sinks, window and softmax layers, with the linear part off. A model with a global cache of K pairs gets
  the same number of exact keys: a window of W + K. Every task runs a second time on the
  already-loaded teacher; needs ``compare`` and a linearized model with a window.

``info.state_bytes`` is what one sequence holds in the cache after a prompt of ``context`` tokens (measured from
the cache a real forward pass returns): constant for a linearized model, growing with the prompt for softmax. The
baselines report what their cache holds here (the linearized cache, with its state zero), not StreamingLLM's own
layout.

    from linearize.eval import EvalConfig, render_table, run_eval
    result = run_eval(EvalConfig(model="out/export", compare="teacher/", tasks=["passkey", "mqar"]))
    rich.print(render_table(result))
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from linearize.errors import LinearizeError
from linearize.eval.config import EvalConfig
from linearize.eval.multiple_choice import evaluate_task
from linearize.eval.perplexity import distance_perplexity, file_perplexity, read_text_file
from linearize.eval.recall import mqar, passkey
from linearize.eval.scoring import model_device
from linearize.io.loading import context_length
from linearize.run.progress import Progress, QuietProgress

__all__ = ["evaluate_model", "exact_part", "render_table", "run_eval", "state_bytes", "summarize", "write_json"]


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


def _sizes(model: nn.Module, cfg: EvalConfig, progress: Progress) -> tuple[int, int, int]:
    """``(context, stride, distance_context)`` of ``cfg`` cut to the model's ``max_position_embeddings`` (logged)."""
    limit = context_length(model.config)
    context, stride, far = cfg.context, cfg.stride, cfg.distance_context
    if limit is not None and context > limit:
        context, stride = limit, min(stride, limit)
        if "ppl" in cfg.selected_tasks:
            progress.log(f"perplexity context {cfg.context} > max_position_embeddings {limit}: using context "
                         f"{context}, stride {stride}")
    if limit is not None and far > limit:
        far = limit
        if "distance" in cfg.selected_tasks:
            progress.log(f"distance_context {cfg.distance_context} > max_position_embeddings {limit}: using {far}")
    return context, stride, far


def exact_part(linearize: dict | None) -> int | None:
    """``window + sinks`` of a linearized model's ``config.linearize`` (None for a softmax model): a query at that
    position in a sequence, or later, has keys in the recurrent state."""
    if not linearize:
        return None
    from linearize.models.base import split_linearize_dict

    settings, _ = split_linearize_dict(linearize)
    return settings.window + settings.sinks


def _evaluate_loaded(model: nn.Module, tokenizer, name: str, cfg: EvalConfig, sizes: tuple[int, int, int], *,
                     beyond: int | None, progress: Progress) -> dict:
    """``cfg.selected_tasks`` on a loaded model: ``{"info", <task>: ..., "seconds"}``."""
    context, stride, far = sizes
    out: dict = {"info": _info(model, name, context), "seconds": {}}
    for task in cfg.selected_tasks:
        t0 = time.perf_counter()
        if task == "ppl":
            out["ppl"] = file_perplexity(model, tokenizer, cfg.text, context=context, stride=stride,
                                         max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, progress=progress)
        elif task == "distance":
            out["distance"] = {"text": str(Path(cfg.text).expanduser()), **distance_perplexity(
                model, tokenizer, read_text_file(cfg.text), context=far, max_tokens=cfg.distance_tokens,
                beyond=beyond, batch_size=cfg.batch_size, progress=progress)}
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
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _exact_part_problem(linearize: dict | None, what: str) -> str | None:
    """Why a baseline that keeps only the exact part (sinks + window) of ``linearize``'s settings cannot run."""
    if not linearize:
        return f"the model is not linearized: {what}"
    from linearize.models.base import split_linearize_dict

    if split_linearize_dict(linearize)[0].window == 0:
        return "the model has no window (pure linear attention): without the linear part no attention is left"
    return None


Pass = Callable[[nn.Module, object, str, tuple[int, int, int], int | None], dict]
"""A second evaluation of a loaded model (``model, tokenizer, name, sizes, beyond``): a side dict, or
``{"skipped": reason}``."""


def _linear_off_pass(cfg: EvalConfig, progress: Progress) -> Pass:
    """The linear-off baseline: the loaded model again with its linear part switched off."""

    def run(model, tokenizer, name, sizes, beyond) -> dict:
        from linearize.modules.attention import linear_attention_layers, linear_part_off

        why = _exact_part_problem(getattr(model.config, "linearize", None), "it has no linear part to switch off")
        if why:
            return {"skipped": why}
        progress.log("linear-off baseline: the same model with its linear part switched off (sinks + window + "
                     "softmax layers only), every task again")
        with linear_part_off(linear_attention_layers(model)):
            return _evaluate_loaded(model, tokenizer, f"{name} (linear part off)", cfg, sizes, beyond=beyond,
                                    progress=progress)

    return run


def _streaming_pass(cfg: EvalConfig, progress: Progress, linearize: dict) -> Pass:
    """The streaming baseline: the loaded teacher converted in place to the model's attention settings
    (``linearize``, its ``config.linearize``) and run with the linear part off, i.e. StreamingLLM at the model's
    sinks + window, with the model's softmax layers. The new feature maps are never read."""

    def run(model, tokenizer, name, sizes, beyond) -> dict:
        from linearize.convert.surgery import linearize_model
        from linearize.models.base import split_linearize_dict
        from linearize.modules.attention import linear_attention_layers, linear_part_off

        if getattr(model.config, "linearize", None):
            return {"skipped": "the teacher (compare) is itself linearized"}
        settings, _ = split_linearize_dict(linearize)
        # StreamingLLM: sinks + window, no global cache; its K exact pairs become K more window keys (equal memory)
        settings = settings.replace(window=settings.window + settings.global_cache, global_cache=0)
        weights = next(model.parameters()).dtype
        try:
            linearize_model(model, settings, teacher=name)
        except LinearizeError as e:
            return {"skipped": f"the teacher does not take the model's attention settings: {e}"}
        model.to(dtype=weights)  # the new feature maps in the weights' dtype, as in a loaded export
        layers = f" and softmax layers {settings.softmax_layers}" if settings.softmax_layers else ""
        progress.log(f"streaming baseline: the teacher with the model's {settings.sinks} sinks + window "
                     f"{settings.window}{layers} only, every task again")
        with linear_part_off(linear_attention_layers(model)):
            return _evaluate_loaded(model, tokenizer, f"{name} (streaming: {settings.sinks} sinks + window "
                                    f"{settings.window})", cfg, sizes, beyond=beyond, progress=progress)

    return run


def _evaluate_source(source: str, cfg: EvalConfig, *, device: str, dtype: str, progress: Progress,
                     beyond: int | None = None, then: Pass | None = None) -> tuple[dict, dict | None]:
    """``(side, then's side)``: ``source`` loaded and evaluated, then ``then`` on the same loaded model (no second
    load); the model is freed before returning."""
    from linearize.io.loading import load_model, model_reference

    progress.log(f"loading {source} ({dtype}, {device})")
    model, tokenizer = load_model(source, dtype=dtype, device=device, attn_implementation="sdpa")
    try:
        sizes = _sizes(model, cfg, progress)
        name = model_reference(source)
        beyond = exact_part(getattr(model.config, "linearize", None)) if beyond is None else beyond
        out = _evaluate_loaded(model, tokenizer, name, cfg, sizes, beyond=beyond, progress=progress)
        return out, then(model, tokenizer, name, sizes, beyond) if then else None
    finally:
        del model
        _free()


def evaluate_model(source: str, cfg: EvalConfig, *, device: str, dtype: str, progress: Progress = QuietProgress(),
                   beyond: int | None = None) -> dict:
    """Load ``source`` and run ``cfg.tasks`` on it; the model is freed before returning.

    Args:
        beyond: where the distance task's "beyond the window" starts (None: the model's own ``window + sinks``
            when it is linearized, else no such number).

    Raises:
        ModelLoadError: ``source`` does not load; plus the data errors of the tasks (missing text or task file).
    """
    return _evaluate_source(source, cfg, device=device, dtype=dtype, progress=progress, beyond=beyond)[0]


def _rows(side: dict) -> dict[str, tuple[float, str]]:
    """metric name -> (value, "lower" | "higher") for one evaluated model."""
    rows: dict[str, tuple[float, str]] = {}
    if "ppl" in side:
        rows[f"ppl {Path(side['ppl']['text']).name}"] = (side["ppl"]["ppl"], "lower")
    if "distance" in side:
        d = side["distance"]
        rows[f"distance ppl @{d['context']} blocks"] = (d["ppl"], "lower")
        for b in d["by_position"]:
            rows[f"distance ppl pos {b['from']}-{b['to']}"] = (b["ppl"], "lower")
        if d["beyond"] is not None:
            rows[f"distance ppl pos >={d['beyond']['from']} (beyond window)"] = (d["beyond"]["ppl"], "lower")
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


def _sides(result: dict) -> dict[str, dict]:
    """Every evaluated side of ``result`` by its column name: model, teacher (when present), then the baselines."""
    sides = {"model": result["model"]}
    if result.get("teacher"):
        sides["teacher"] = result["teacher"]
    sides.update(result.get("baselines") or {})
    return sides


def summarize(result: dict) -> list[dict]:
    """One ``{"metric", "model", "teacher", <baseline>..., "better"}`` row per metric of any side (None where a side
    lacks it, e.g. a passkey context that only some of them could hold); a key per baseline present in
    ``result["baselines"]``."""
    rows = {side: _rows(r) for side, r in _sides(result).items()}
    rows.setdefault("teacher", {})
    names = list(dict.fromkeys(n for r in rows.values() for n in r))
    baselines = list(result.get("baselines") or {})
    return [{"metric": n, "model": rows["model"].get(n, (None,))[0], "teacher": rows["teacher"].get(n, (None,))[0],
             **{b: rows[b].get(n, (None,))[0] for b in baselines},
             "better": next(r[n][1] for r in rows.values() if n in r)} for n in names]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_table(result: dict):
    """A ``rich.table.Table`` of :func:`summarize`'s rows: metric, model, and with a teacher, the teacher and the
    model/teacher ratio (perplexities, state size: lower is better) or the model - teacher difference
    (accuracies); then one column per baseline (linear-off, streaming) present."""
    from rich.table import Table

    teacher = result.get("teacher")
    baselines = list(result.get("baselines") or {})
    table = Table(title=f"eval: {result['model']['info']['name']}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if teacher:
        table.add_column("teacher", justify="right")
        table.add_column("model / teacher or model - teacher", justify="right")
    for b in baselines:
        table.add_column(b, justify="right")
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
        cells += [_fmt(row.get(b)) for b in baselines]
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
    runs: dict[str, dict | None] = {}  # baseline -> its side, or {"skipped": why}
    result["model"], runs["linear-off"] = _evaluate_source(
        cfg.model, cfg, device=device, dtype=dtype, progress=progress,
        then=_linear_off_pass(cfg, progress) if "linear-off" in cfg.baselines else None)
    linearize = result["model"]["info"]["linearize"]
    streaming = None
    if "streaming" in cfg.baselines:
        why = (_exact_part_problem(linearize, "no sinks + window to cut the teacher to") if cfg.compare
               else "no teacher to cut to the model's sinks + window (pass compare)")
        runs["streaming"] = {"skipped": why} if why else None
        streaming = None if why else _streaming_pass(cfg, progress, linearize)
    result["teacher"] = None
    if cfg.compare:
        result["teacher"], teacher_then = _evaluate_source(
            cfg.compare, cfg, device=device, dtype=dtype, progress=progress, beyond=exact_part(linearize),
            then=streaming)
        if streaming:
            runs["streaming"] = teacher_then
    result["baselines"] = {b: side for b, side in runs.items() if side and "skipped" not in side}
    result["baselines_skipped"] = {b: side["skipped"] for b, side in runs.items() if side and "skipped" in side}
    for b, why in result["baselines_skipped"].items():
        progress.log(f"{b} baseline skipped: {why}")
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
