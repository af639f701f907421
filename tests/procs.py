"""Independent one-process runs, two at a time: each run is one thread (``OMP_NUM_THREADS=1``), so
on the 2-core CI machine a pair takes the wall time of one. Results are what the runs compute
alone (deterministic CPU kernels); multi-rank runs, which use both cores, stay sequential."""
from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

JOBS = 2


def run(cmd: list[str], cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``cmd`` with one thread; the test fails with the run's output tail unless it exits 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r


def run_pairs(cmds: dict[str, list[str]], cwd=None, timeout: int = 600) -> dict[str, subprocess.CompletedProcess]:
    """``run`` for every command, ``JOBS`` at a time; results by name."""
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {name: pool.submit(run, cmd, cwd, timeout) for name, cmd in cmds.items()}
        return {name: f.result() for name, f in futures.items()}
