"""PNG plots of eval and benchmark results (matplotlib, Agg canvas: no display, no pyplot global state).

- :func:`plot_passkey`: passkey accuracy vs prompt length, model, teacher and baselines (linear-off, streaming);
- :func:`plot_mqar`: MQAR accuracy vs number of pairs N and vs token distance, the same lines;
- :func:`plot_distance`: perplexity by position within the window, the same lines, the window's end marked;
- :func:`plot_quality_vs_state`: one point per conversion (a list of :func:`~linearize.eval.run_eval` results or
  their JSON files): a quality metric against the cache bytes one sequence holds, teachers marked apart;
- :func:`plot_throughput`: decode tokens/s vs batch size from a ``linearize bench generate --json`` file, one line
  per (model, prompt length).

Each takes plain result dicts (or JSON paths), writes one PNG and returns its path. The PNG's ``Software`` text chunk
names linearize (:func:`linearize.export.writer.png_metadata`), so a later ``--overwrite`` knows the file is one of ours.

    from linearize.eval.plots import plot_quality_vs_state, plot_throughput
    plot_quality_vs_state(["hedgehog.json", "based.json", "t2r.json"], "quality.png", metric="piqa acc")
    plot_throughput("bench.json", "throughput.png")
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from linearize.errors import ConfigError, DataError

__all__ = ["PLOTTED_TASKS", "plot_distance", "plot_mqar", "plot_passkey", "plot_quality_vs_state", "plot_throughput",
           "require_matplotlib", "write_plots"]

PLOTTED_TASKS = ("passkey", "mqar", "distance")
"""The eval tasks :func:`write_plots` draws, each as ``<task>.png``."""

_STYLES = {"model": "o-", "teacher": "s--", "linear-off": "^:", "streaming": "v-."}


def require_matplotlib(setting: str = "plot") -> None:
    """Raise unless matplotlib's Agg canvas imports (checked before a run, not after it).

    Raises:
        ConfigError: matplotlib is missing or broken; the message names ``setting`` and the install command.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ConfigError(f"{setting} needs matplotlib: pip install 'linearize[eval]' (or leave {setting} "
                          "unset)") from None


def _figure(ncols: int = 1):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path: str | Path) -> Path:
    """The PNG, marked as linearize's, written whole or not at all (LinearizeError naming the file on failure)."""
    from linearize.export.writer import png_metadata, write_output_file

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, metadata=png_metadata())
    return write_output_file(path, png.getvalue())


def _load(item: dict | str | Path, what: str):
    if isinstance(item, (dict, list)):
        return item
    path = Path(item).expanduser()
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise DataError(f"{what} file {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{what} file {path} is not JSON ({e.msg} at line {e.lineno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} file {path} cannot be read ({getattr(e, 'strerror', None) or e})") from e


def _log2_axis(ax, values) -> None:
    """A base-2 log x axis ticked at the values themselves, written plainly (1024, not 2^10)."""
    ticks = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()


def _sides(result: dict, task: str):
    """``(label, task result, line style)`` of every side that has ``task``: model, teacher, then the baselines."""
    sides = {"model": result.get("model"), "teacher": result.get("teacher"), **(result.get("baselines") or {})}
    for key, side in sides.items():
        if side and side.get(task):
            yield f"{key}: {Path(side['info']['name']).name}", side[task], _STYLES.get(key, "x-")


def plot_passkey(result: dict, path: str | Path) -> Path:
    """Passkey accuracy vs prompt length (log2 axis) for the model and, when present, the teacher.

    Raises:
        DataError: ``result`` has no scored passkey cell.
    """
    fig, (ax,) = _figure()
    xs: list[int] = []
    for label, pk, style in _sides(result, "passkey"):
        if not pk["by_context"]:
            continue
        contexts = [int(c) for c in pk["by_context"]]
        ax.plot(contexts, list(pk["by_context"].values()), style, label=label)
        xs += contexts
    if not xs:
        raise DataError("the result has no passkey accuracy to plot (no passkey task, or every context skipped)")
    _log2_axis(ax, xs)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title("passkey retrieval vs context")
    ax.legend()
    return _save(fig, path)


def plot_mqar(result: dict, path: str | Path) -> Path:
    """MQAR accuracy vs number of pairs (left) and vs token distance between a pair and its query (right).

    Raises:
        DataError: ``result`` has no scored MQAR prompt.
    """
    fig, (by_n, by_d) = _figure(2)
    ns: list[int] = []
    distances: list[int] = []
    for label, mq, style in _sides(result, "mqar"):
        if not mq["by_pairs"]:
            continue
        n = [int(k) for k in mq["by_pairs"]]
        d = [b["max_distance"] for b in mq["by_distance"]]
        by_n.plot(n, list(mq["by_pairs"].values()), style, label=label)
        by_d.plot(d, [b["acc"] for b in mq["by_distance"]], style, label=label)
        ns, distances = ns + n, distances + d
    if not ns:
        raise DataError("the result has no MQAR accuracy to plot (no mqar task, or every N skipped)")
    for ax, xs, xlabel in ((by_n, ns, "key-value pairs N"),
                           (by_d, distances, "distance pair -> query (tokens, bin upper edge)")):
        _log2_axis(ax, xs)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MQAR accuracy")
        ax.legend()
    by_n.set_title("associative recall vs N")
    by_d.set_title("associative recall vs distance")
    return _save(fig, path)


def plot_distance(result: dict, path: str | Path) -> Path:
    """Perplexity by position within the window (bucket upper edges, log2 axis), one line per side; a
    vertical line where the model's exact part ends (window + sinks): positions past it read the recurrent state.

    Raises:
        DataError: ``result`` has no perplexity-by-distance bucket.
    """
    fig, (ax,) = _figure()
    xs: list[int] = []
    beyond = None
    for label, d, style in _sides(result, "distance"):
        buckets = [b for b in d["by_position"] if b["ppl"] is not None]
        if not buckets:
            continue
        x = [b["to"] + 1 for b in buckets]
        ax.plot(x, [b["ppl"] for b in buckets], style, label=label)
        xs += x
        beyond = beyond or (d["beyond"] or {}).get("from")
    if not xs:
        raise DataError("the result has no perplexity by distance to plot (no distance task)")
    if beyond:
        ax.axvline(beyond, color="grey", linewidth=0.8, linestyle=":", label=f"window + sinks = {beyond}")
    _log2_axis(ax, xs)
    ax.set_xlabel("position in the window (tokens, bucket upper edge)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity by distance")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _metric(result: dict, side: str, metric: str) -> float | None:
    for row in result.get("summary", []):
        if row["metric"] == metric:
            return row[side]
    return None


def plot_quality_vs_state(results: list[dict | str | Path], path: str | Path, metric: str | None = None,
                          labels: list[str] | None = None) -> Path:
    """``metric`` (a row name of a result's ``summary``, default its first ``ppl ...`` row) against the cache bytes
    per sequence (log axis), one point per result (labelled ``labels[i]``, default the model folder's name); each
    distinct teacher is drawn once, as a reference.

    Raises:
        DataError: no result holds ``metric`` (the message lists the metrics the first result has).
    """
    loaded = [_load(r, "eval result") for r in results]
    if not loaded:
        raise DataError("plot_quality_vs_state needs at least one eval result")
    names = [row["metric"] for row in loaded[0].get("summary", [])]
    if metric is None:
        metric = next((n for n in names if n.startswith("ppl ")), names[0] if names else None)
    fig, (ax,) = _figure()
    points = 0
    teachers: set[str] = set()
    for i, result in enumerate(loaded):
        for side in ("model", "teacher"):
            value = _metric(result, side, metric) if result.get(side) else None
            if value is None:
                continue
            info = result[side]["info"]
            if side == "teacher":
                if info["name"] in teachers:
                    continue
                teachers.add(info["name"])
            x = info["state_bytes"]["bytes"]
            ax.scatter([x], [value], marker="o" if side == "model" else "*", s=40 if side == "model" else 120,
                       color="C0" if side == "model" else "C3")
            label = labels[i] if labels and side == "model" else Path(info["name"]).name
            ax.annotate(label, (x, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
            points += 1
    if not points:
        raise DataError(f"no result has the metric {metric!r}; the first result has: {', '.join(names)}")
    tokens = loaded[0]["model"]["info"]["state_bytes"]["tokens"]
    ax.set_xscale("log")
    ax.set_xlabel(f"cache bytes per sequence after {tokens} tokens")
    ax.set_ylabel(metric)
    ax.set_title("quality vs state size (o conversion, * teacher)")
    return _save(fig, path)


def plot_throughput(bench: list[dict] | str | Path, path: str | Path) -> Path:
    """Decode tokens/s vs batch size (log-log) from ``linearize bench generate`` rows (the list it returns or the
    ``--json`` file it writes): one line per (model row name, prompt length); rows without a positive ``tok_per_s``
    (out of memory, triton missing, a timing lost in host noise) are left out.

    Raises:
        DataError: the file is missing or not JSON, or no row has a throughput.
    """
    from linearize.export.writer import result_rows

    rows = result_rows(_load(bench, "bench generate"))
    lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for row in rows:
        if isinstance(row, dict) and (row.get("tok_per_s") or 0) > 0:
            lines.setdefault((row["model"], row["prompt"]), []).append((row["batch"], row["tok_per_s"]))
    if not lines:
        raise DataError("no bench generate row has tok_per_s; run `linearize bench generate --json FILE` first")
    fig, (ax,) = _figure()
    for (name, prompt), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [t for _, t in pts], "o-", label=f"{name}, prompt {prompt}")
    _log2_axis(ax, [b for pts in lines.values() for b, _ in pts])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens / s")
    ax.set_title("generation throughput")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(result: dict, folder: str | Path) -> list[Path]:
    """``passkey.png``, ``mqar.png`` and ``distance.png`` in ``folder`` for the tasks ``result`` scored; returns the
    paths written."""
    folder = Path(folder).expanduser()
    written = []
    for task, plot in zip(PLOTTED_TASKS, (plot_passkey, plot_mqar, plot_distance)):
        side = result["model"].get(task)
        if side and (side["by_position"] if task == "distance" else side["acc"] is not None):
            written.append(plot(result, folder / f"{task}.png"))
    return written
