"""Where a fleet's units run, behind one seam: ``run(units, out, on_done)`` calls ``on_done``
with each unit's result as it finishes, in any order; a unit's failure is its result and never
stops the others.

- ``local`` (default): a process pool sized so the units' runtime threads fill the cores (one
  worker, in the calling process, when a profile lets the runtime take every core); each process
  keeps the base loaded between units, and units are queued grouped by target so they share it.
  In a resident worker (:mod:`.server`) the pools outlive the run.
- ``ray``: each unit a Ray task with the spec's per-unit ``resources``; ``ray.init()`` starts a
  local cluster, or attaches to the one ``RAY_ADDRESS`` names (the output folder must then be on
  a file system every node sees). Needs the ``[ray]`` extra.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from ..errors import LoradeployError
from .spec import Unit
from .unit import init_worker, run_unit

OnDone = Callable[[Unit, dict], None]
EXECUTORS = ("local", "ray")


def _error(unit: Unit, message: str) -> dict:
    return {"id": unit.id, "adapter": unit.adapter, "target": unit.target_name, "key": unit.key, "ran": True,
            "status": "error", "message": message, "seconds": 0.0}


def pool_size(unit_threads: int, cores: int | None = None) -> int:
    """Workers that fill the cores when each unit runs with ``unit_threads`` runtime threads
    (0: the runtime takes every core, so one unit at a time fills them)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // unit_threads) if unit_threads > 0 else 1


class Pools:
    """The local executor's process pools. A run makes its pool and ends it; a resident worker
    (``keep``) keeps each pool for its next runs, its processes with their imports and bases."""

    def __init__(self):
        self.keep = False
        self._pools: dict[tuple[int, int], ProcessPoolExecutor] = {}

    def get(self, workers: int, threads: int) -> ProcessPoolExecutor:
        key = (workers, threads)
        pool = self._pools.pop(key, None) if self.keep else None
        if pool is None:
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                                       initargs=(threads, os.getpid()))
        self._pools[key] = pool
        return pool

    def release(self, workers: int, threads: int, pending=(), broken: bool = False) -> None:
        """After a run: cancel what it left queued; end the pool unless kept (and whole)."""
        for fut in pending:
            fut.cancel()
        if broken or not self.keep:
            pool = self._pools.pop((workers, threads), None)
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        while self._pools:
            self._pools.popitem()[1].shutdown(wait=True, cancel_futures=True)


POOLS = Pools()


class LocalExecutor:
    """A pool of ``workers`` processes (spawned: a forked PyTorch is not safe), each with
    ``cores // workers`` PyTorch threads; by default sized so the units' runtime threads fill
    the cores (:func:`pool_size`)."""

    def __init__(self, workers: int | None = None, unit_threads: int = 0):
        self.workers = max(1, workers or pool_size(unit_threads))

    def describe(self) -> dict:
        return {"executor": "local", "workers": self.workers}

    def run(self, units: list[Unit], out: Path, on_done: OnDone) -> None:
        if not units:
            return
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        if self.workers == 1:
            init_worker(threads)
            for u in units:
                on_done(u, run_unit(u.to_dict(), str(out)))
            return
        size = self.workers if POOLS.keep else min(self.workers, len(units))
        pool = POOLS.get(size, threads)
        pending = {pool.submit(run_unit, u.to_dict(), str(out)): u for u in units}
        broken = False
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    unit = pending.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as e:  # the worker process died (killed, out of memory)  # noqa: BLE001
                        broken = broken or isinstance(e, BrokenProcessPool)
                        result = _error(unit, f"worker process failed: {type(e).__name__}: {e}")
                    on_done(unit, result)
        finally:
            POOLS.release(size, threads, pending, broken)


class RayExecutor:
    """Units as Ray tasks on ``ray.init()`` (a local cluster of ``num_cpus``, or ``RAY_ADDRESS``)."""

    def __init__(self, resources: dict | None = None, num_cpus: int | None = None):
        self.resources = {"num_cpus": 1, **(resources or {})}
        self.num_cpus = num_cpus
        self.address = os.environ.get("RAY_ADDRESS") or None

    def describe(self) -> dict:
        return {"executor": "ray", "ray_address": self.address or "local", "resources": self.resources}

    def run(self, units: list[Unit], out: Path, on_done: OnDone) -> None:
        try:
            import ray
        except ImportError as e:
            raise LoradeployError("--executor ray needs Ray: pip install 'loradeploy[ray]'") from e
        if not units:
            return
        started = not ray.is_initialized()
        if started:
            kwargs = {"address": self.address} if self.address else {"num_cpus": self.num_cpus or os.cpu_count()}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        try:
            threads = int(self.resources.get("num_cpus", 1)) or 1
            task = ray.remote(_ray_unit).options(**self.resources)
            pending = {task.remote(u.to_dict(), str(out), threads): u for u in units}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    unit = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # the task's worker died  # noqa: BLE001
                        result = _error(unit, f"ray task failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
                    on_done(unit, result)
        finally:
            if started:
                ray.shutdown()


def _ray_unit(unit_data: dict, out: str, threads: int) -> dict:
    init_worker(threads)
    return run_unit(unit_data, out)


def make(name: str, workers: int | None, resources: dict | None, unit_threads: int = 0):
    if name == "local":
        return LocalExecutor(workers, unit_threads)
    if name == "ray":
        return RayExecutor(resources, workers)
    raise LoradeployError(f"executor {name!r} is not one of {', '.join(EXECUTORS)}")
