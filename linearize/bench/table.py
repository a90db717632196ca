"""Result tables shared by the benchmarks: a rich table when rich imports, plain text otherwise."""

from __future__ import annotations

from typing import Callable, Iterable


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
