"""What the benchmarks share: result tables (a rich table when rich imports, plain text otherwise) and their output
files (``--json``, ``--plots``), checked before anything is timed and written marked as linearize's."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable


def check_outputs(json_path: str | Path | None, *, overwrite: bool, plots: str | Path | None = None,
                  plot_names: Iterable[str] = ()) -> None:
    """The rule of every result file (:func:`linearize.export.writer.check_output_file`) for ``json_path`` and the PNGs
    ``plot_names`` in the folder ``plots``, and matplotlib for plots; run before any model loads or kernel runs.

    Raises:
        LinearizeError: the first output that cannot be written (one line naming the flag and the path).
    """
    from linearize.errors import LinearizeError
    from linearize.export.writer import check_output_file

    if json_path is not None:
        check_output_file(json_path, overwrite=overwrite, flag="--json")
    if plots is not None:
        from linearize.eval.plots import require_matplotlib

        folder = Path(plots).expanduser()
        if folder.exists() and not folder.is_dir():
            raise LinearizeError(f"--plots {folder} is a file; name a folder for the PNGs")
        for name in plot_names:
            check_output_file(folder / name, overwrite=overwrite, flag="--plots")
        require_matplotlib("--plots")


def check_sources(*sources: str | None) -> None:
    """Each given model (an export, its teacher) checked as :func:`linearize.io.loading.check_source` checks it, before
    anything loads."""
    from linearize.io.loading import check_source

    for source in sources:
        if source:
            check_source(source)


def write_rows(json_path: str | Path | None, rows: list[dict], **fields) -> None:
    """``rows`` as ``{"written_by": "linearize X.Y.Z", "rows": [...], **fields}`` in ``json_path`` (nothing when
    None), replaced whole (a bench rewrites it after every row); ``fields`` are what the run measured once (e.g. the
    sweep's copy bandwidth)."""
    if json_path is not None:
        from linearize.export.writer import marked_json, write_output_file

        write_output_file(json_path, marked_json({"rows": rows, **fields}))


def fmt(x, nd: int = 3) -> str:
    """'-' for missing values, small floats in scientific notation, others with ``nd`` decimals."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2e}" if 0 < abs(x) < 1e-2 else f"{x:.{nd}f}"
    return str(x)


def print_table(title: str, cols: list[str], rows: list[dict], notes: Iterable[str] = (),
                cell: Callable[[object], str] = fmt) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for c in cols:
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(*[cell(r.get(c)) for c in cols])
        Console(width=250).print(t)
    except ImportError:
        print(title)
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(cell(r.get(c)) for c in cols))
    for n in notes:
        print("note:", n)
