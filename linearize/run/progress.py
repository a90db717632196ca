"""Progress and log lines for long jobs, in a terminal and in logs.

Every long loop (teacher sampling, measuring passes, training steps, evaluation) reports through one
:class:`Progress` object that the caller picks:

- :class:`BarProgress`: rich progress bars, for a terminal (names and log lines printed verbatim, never as markup);
- :class:`LineProgress`: plain ``name: 40/100 (40%) ... elapsed 1m20s, ETA 2m00s`` lines at most every
  ``every_s`` seconds (and at the end), for logs and CI where bars would be noise or invisible;
- :class:`QuietProgress`: log lines only, no progress (library default inside tests and notebooks).

:func:`default_progress` picks the bar when stderr is a terminal and lines otherwise::

    progress = default_progress()
    with progress.task("attention transfer", total=steps, unit="steps") as task:
        for step in range(steps):
            ...
            task.update(step + 1, f"loss {loss:.4g} | {tps:,.0f} tok/s")
    progress.log("done")
"""

from __future__ import annotations

import sys
import time
from typing import IO, Protocol


class Task(Protocol):
    """One loop's progress: ``update(completed, info)`` with the absolute count done so far."""

    def update(self, completed: int, info: str = "") -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Task": ...

    def __exit__(self, *exc) -> None: ...


class Progress(Protocol):
    """Where a job reports: free-form log lines and per-loop tasks."""

    def log(self, message: str) -> None: ...

    def task(self, name: str, total: int | None, unit: str = "") -> Task: ...


class _TaskBase:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class _LineTask(_TaskBase):
    def __init__(self, owner: "LineProgress", name: str, total: int | None, unit: str):
        self.owner, self.name, self.total, self.unit = owner, name, total, unit
        self.t0 = time.monotonic()
        self.last_print = self.t0
        self.completed = 0
        self.info = ""
        self.printed_completed: int | None = None

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            pct = 100.0 * self.completed / self.total
            head = f"{self.name}: {self.completed:,}/{self.total:,}{unit} ({pct:.0f}%)"
            eta = ""
            if 0 < self.completed < self.total:
                eta = f", ETA {_duration(elapsed * (self.total - self.completed) / self.completed)}"
        else:
            head, eta = f"{self.name}: {self.completed:,}{unit}", ""
        info = f" {self.info}" if self.info else ""
        return f"{head}{info}, elapsed {_duration(elapsed)}{eta}"

    def update(self, completed: int, info: str = "") -> None:
        self.completed, self.info = int(completed), info or self.info
        now = time.monotonic()
        if now - self.last_print >= self.owner.every_s:
            self.last_print = now
            self.printed_completed = self.completed
            self.owner.log(self.line())

    def close(self) -> None:
        if self.printed_completed != self.completed or self.completed == 0:
            self.owner.log(self.line())
            self.printed_completed = self.completed


class LineProgress:
    """Plain lines on ``stream`` (default stderr): log messages as they come, a task's state at most every
    ``every_s`` seconds and once when it closes."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 30.0):
        self.stream = stream
        self.every_s = float(every_s)

    def log(self, message: str) -> None:
        stream = self.stream or sys.stderr
        print(message, file=stream, flush=True)

    def task(self, name: str, total: int | None, unit: str = "") -> _LineTask:
        return _LineTask(self, name, total, unit)


class _NullTask(_TaskBase):
    def update(self, completed: int, info: str = "") -> None:
        pass


class QuietProgress:
    """Log lines through ``log`` (default: none); no progress."""

    def __init__(self, log=None):
        self._log = log

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def task(self, name: str, total: int | None, unit: str = "") -> _NullTask:
        return _NullTask()


class _BarTask(_TaskBase):
    def __init__(self, bar, name: str, total: int | None):
        self.bar = bar
        self.id = bar.add_task(name, total=total, info="")

    def update(self, completed: int, info: str = "") -> None:
        self.bar.update(self.id, completed=completed, **({"info": info} if info else {}))

    def close(self) -> None:
        self.bar.stop_task(self.id)


class BarProgress:
    """rich progress bars on a console (stderr by default); log lines are printed above the bars."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        # Names, infos and log lines carry user text (paths, data sources): printed verbatim, never as markup.
        self.console = console or Console(stderr=True, markup=False, emoji=False, highlight=False)
        self.bar = RichProgress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=self.console, transient=False)
        self._open = 0

    def log(self, message: str) -> None:
        from rich.text import Text

        self.console.print(Text(message), soft_wrap=True)

    def task(self, name: str, total: int | None, unit: str = "") -> _BarTask:
        if self._open == 0:
            self.bar.start()
        self._open += 1
        task = _BarTask(self.bar, name, total)
        close = task.close

        def closing() -> None:
            close()
            self._open -= 1
            if self._open == 0:
                self.bar.stop()

        task.close = closing  # type: ignore[method-assign]
        return task


def default_progress(stream: IO[str] | None = None) -> Progress:
    """Bars when ``stream`` (default stderr) is a terminal, plain lines every 30 s otherwise."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return BarProgress()
    return LineProgress(stream)


__all__ = ["BarProgress", "LineProgress", "Progress", "QuietProgress", "Task", "default_progress"]
