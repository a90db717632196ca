"""One run per output folder: an exclusive lock beside it (``.<name>.lock``), held while a run writes there.

A second ``convert`` / ``finetune`` on the same output would otherwise "resume" the live run's work folder, repeat
its work and fail at the export. The lock is an ``fcntl.flock`` on an open file, so the kernel releases it when the
process dies (a ``kill -9`` leaves no stale lock); the file itself stays and records the holder's pid.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from linearize.errors import LinearizeError


def lock_path(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of output folder ``out`` for the ``with`` block.

    Raises:
        LinearizeError: another process holds it (the message names its pid).
    """
    import fcntl

    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LinearizeError(f"another linearize run (pid {holder}) is writing {Path(out)}; wait for it to finish "
                                 "or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
