"""One run per output folder: an exclusive lock beside it (``.<name>.lock``), held while a run writes there.

A second ``convert`` / ``finetune`` on the same output would otherwise "resume" the live run's work folder, repeat
its work and fail at the export. The lock is an ``fcntl.flock`` on an open file, so the kernel releases it when the
process dies (a ``kill -9`` leaves no stale lock). The file records the holder's pid; a run that ends (finished,
failed or interrupted) removes it while still holding the lock, so no ``.NAME.lock`` stays beside a finished export. A
process that was waiting on the removed file sees that it no longer is the one at the path and takes the lock again
on the new one, so two runs never hold the same output's lock.
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
    if path.is_file() and not path.read_bytes()[:64].strip().isdigit() and path.stat().st_size:
        raise LinearizeError(f"{path} exists and is not a linearize lock file (it holds no pid); move it away")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LinearizeError(f"another linearize run (pid {holder}) is writing {Path(out)}; wait for it to finish "
                                 "or choose another output") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder before us removed this file on its way out: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still holding the lock: nobody else can be between their lock and this check
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
