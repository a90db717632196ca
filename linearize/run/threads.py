"""CPU threads for torch: as many as this process has CPUs free, never more (the CLI sets this at start).

torch's default is one intra-op thread per CPU of the machine. Where another process keeps some of those CPUs busy,
that oversubscribes them: every parallel region waits for a thread the scheduler has parked, and the many small
regions of generation stall. Measured 2026-12-07 on a 2-core machine with other CPU jobs running: sampling 8 x 64
tokens from SmolLM2-135M took 555 s on 2 threads and 33-76 s on 1 (a 4 x 512 forward: 74 s against 37-48 s).

    from linearize.run.threads import limit_cpu_threads
    limit_cpu_threads()   # before torch is imported: sets OMP_NUM_THREADS; after: torch.set_num_threads too

The count is the CPUs this process may run on (``os.sched_getaffinity``, capped by a cgroup CPU quota) less the
other threads runnable right now (``procs_running`` of ``/proc/stat``, the least of a few samples), at least 1. A
user's own ``OMP_NUM_THREADS`` is kept as it is. The inter-op pool is left alone: eager forward and backward passes
do not use it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["busy_cpus", "cpu_threads", "limit_cpu_threads", "usable_cpus"]


def _quota_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs a cgroup CPU quota allows (rounded up), or None without a quota (v2 ``cpu.max``, v1 ``cfs_quota_us``)."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup_root / "cpu/cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``os.cpu_count()`` where there is none), capped by a cgroup
    CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _quota_cpus()
    return max(1, min(n, quota) if quota else n)


def _procs_running(stat: str) -> int | None:
    for line in stat.splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    return None


def busy_cpus(samples: int = 5, interval_s: float = 0.01) -> int:
    """Threads of other processes runnable right now (the least over ``samples`` reads of ``/proc/stat``, so a
    moment's kernel work does not count; a CPU-bound job is runnable in every one); 0 where it cannot be read."""
    seen = []
    for i in range(samples):
        try:
            n = _procs_running(Path("/proc/stat").read_text())
        except OSError:
            n = None
        if n is None:
            return 0
        seen.append(n - 1)  # this thread, reading, is running too
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, min(seen))


def cpu_threads() -> int:
    """Threads for torch's CPU work: :func:`usable_cpus` less :func:`busy_cpus`, at least 1."""
    usable = usable_cpus()
    return max(1, usable - busy_cpus()) if usable > 1 else 1


def limit_cpu_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Set torch's CPU thread count to :func:`cpu_threads` and return it; None, changing nothing, where
    ``OMP_NUM_THREADS`` is set already (the user's choice, or a launcher's such as ``torchrun``'s 1 per process).
    Before torch is imported this only sets ``OMP_NUM_THREADS`` (torch reads it at import); after, it calls
    ``torch.set_num_threads`` as well."""
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    n = cpu_threads()
    environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n
