"""linearize/run/threads.py: torch's CPU threads never outnumber the CPUs free for this process (the CLI sets them at
start); busy CPUs are real spinning processes here, not patched readings."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from linearize.run.threads import busy_cpus, cpu_threads, limit_cpu_threads, usable_cpus

SPIN = "import time\nend = time.time() + 20\nwhile time.time() < end: pass\n"


@pytest.fixture
def every_cpu_busy():
    """One spinning process per usable CPU (at most 16), running until the test ends; yields the most threads
    linearize may take then (1 with up to 16 CPUs)."""
    usable = usable_cpus()
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(min(usable, 16))]
    time.sleep(0.2)  # runnable from the start: interpreter start-up is CPU work too
    yield max(1, usable - len(procs))
    for p in procs:
        p.kill()
        p.wait()


def test_usable_cpus_is_the_affinity_mask_at_most():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_busy_machine_gets_one_thread(every_cpu_busy):
    most = every_cpu_busy
    assert busy_cpus() >= usable_cpus() - most
    assert cpu_threads() <= most
    env: dict[str, str] = {}
    n = limit_cpu_threads(env)
    assert n <= most and env == {"OMP_NUM_THREADS": str(n)}


def test_limit_sets_torch_threads_once_torch_is_imported(every_cpu_busy, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # unset for linearize, restored after the test
    try:
        torch.set_num_threads(usable_cpus())
        n = limit_cpu_threads()
        assert n <= every_cpu_busy and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


def test_users_omp_num_threads_is_kept(every_cpu_busy):
    env = {"OMP_NUM_THREADS": "3"}
    assert limit_cpu_threads(env) is None and env == {"OMP_NUM_THREADS": "3"}


def test_cli_start_sets_the_threads(every_cpu_busy, monkeypatch):
    import torch

    from linearize.cli.main import main

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # unset for linearize, restored after the test
    monkeypatch.setattr(sys, "argv", ["linearize", "--version"])
    try:
        torch.set_num_threads(usable_cpus())
        with pytest.raises(SystemExit):
            main()
        n = int(os.environ["OMP_NUM_THREADS"])
        assert n <= every_cpu_busy and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
