"""Where the per-unit passes run: in this process, a process pool on one machine
(``multiprocessing``), or Ray tasks on a cluster (``ray``, an optional extra). The work is a list
of independent units, so nothing here schedules more than a map does.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable

ENGINES = ("multiprocessing", "ray")
_SETTINGS = {}


def _init(settings) -> None:
    _SETTINGS["s"] = settings


def _task(args):
    fn, unit, *extra = args
    return fn(unit, _SETTINGS["s"], *extra)


def _ray_task(settings, args):
    fn, unit, *extra = args
    return fn(unit, settings, *extra)


def run_units(fn: Callable, tasks: list[tuple], settings, engine: str = "multiprocessing", workers: int = 1) -> list:
    """``fn(unit, settings, *extra)`` for each ``(unit, *extra)`` in ``tasks``, results in task order:
    in this process (one worker), a process pool (``settings`` sent once to each process), or Ray
    tasks (``settings`` put once in the object store; ``RAY_ADDRESS`` names the cluster)."""
    args = [(fn, *t) for t in tasks]
    if engine == "ray":
        import ray

        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
        remote, ref = ray.remote(_ray_task), ray.put(settings)
        return ray.get([remote.remote(ref, a) for a in args])
    if workers <= 1 or len(tasks) <= 1:
        _init(settings)
        return [_task(a) for a in args]
    with multiprocessing.get_context().Pool(min(workers, len(tasks)), _init, (settings,)) as pool:
        return pool.map(_task, args, chunksize=1)
