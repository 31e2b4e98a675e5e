"""Executors: inline, a process pool, a dask cluster."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from typing import Any, Callable


from skystack.engine.errors import SkystackError
from skystack.engine.batch.tasks import _worker_init

# ----------------------------------------------------------------------------- executors


_DIED = "the worker process died while running it (crash or out of memory)"


class _Inline:
    """Runs tasks in this process, one after the other (``workers=0``)."""

    label = "inline"

    def map(self, fn: Callable[[Any], dict], items: list[tuple[str, Any]],
            on_result: Callable[[str, dict], None]) -> None:
        for key, payload in items:
            on_result(key, fn(payload))

    def close(self) -> None:
        pass


class _Pool:
    """A ``spawn`` process pool; a dead worker fails only the task it ran.

    With ``devices`` (``CUDA_VISIBLE_DEVICES`` names, :func:`~skystack.engine.backend.gpu_devices`)
    each worker process is given one of them in turn before it imports CuPy, so ``workers`` equal
    to the devices' count puts one process on each GPU.
    """

    def __init__(self, workers: int, devices: list[str] | None = None) -> None:
        import multiprocessing

        self.workers = max(1, int(workers))
        self.devices = list(devices or [])
        self.label = f"local:{self.workers}" + (f" on GPUs {','.join(self.devices)}" if len(self.devices) > 1
                                                else "")
        self._pool = None
        self._ctx = multiprocessing.get_context("spawn")
        self._next_device = self._ctx.Value("i", 0)  # the worker processes take their device in turn

    def _new(self, n: int):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=n, mp_context=self._ctx, initializer=_worker_init,
                                   initargs=(self._next_device, tuple(self.devices)))

    def map(self, fn: Callable[[Any], dict], items: list[tuple[str, Any]],
            on_result: Callable[[str, dict], None]) -> None:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        if not items:
            return
        if self._pool is None:
            self._pool = self._new(self.workers)
        futures = {self._pool.submit(fn, payload): (key, payload) for key, payload in items}
        broken: list[tuple[str, Any]] = []
        seen: set = set()
        try:
            for fut in as_completed(futures):
                seen.add(fut)
                key, payload = futures[fut]
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    broken.append((key, payload))
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
                    res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                on_result(key, res)
        except KeyboardInterrupt:
            self._stop()
            _journal_finished(futures, seen, on_result)
            raise
        if not broken:
            return
        # A worker died and took the pool down: rerun what it left one at a time,
        # each in a fresh single-worker pool after a death, so only the culprit fails.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        order = {k: i for i, (k, _p) in enumerate(items)}
        for key, payload in sorted(broken, key=lambda kp: order[kp[0]]):
            solo = self._new(1)
            try:
                res = solo.submit(fn, payload).result()
            except BrokenProcessPool:
                res = {"status": "failed", "error": _DIED}
            finally:
                solo.shutdown(wait=True, cancel_futures=True)
            on_result(key, res)

    def _stop(self) -> None:
        """Cancel what is queued and end the workers now (Ctrl-C): no new session starts."""
        if self._pool is None:
            return
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.join(timeout=5)
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _journal_finished(futures: dict, seen: set, on_result: Callable[[str, dict], None]) -> None:
    """After Ctrl-C: hand on the results that completed but were not handed on yet."""
    for fut, key in futures.items():
        if fut in seen or not fut.done() or fut.cancelled():
            continue
        with contextlib.suppress(BaseException):
            res = fut.result(timeout=0)
            on_result(key[0] if isinstance(key, tuple) else key, res)


class _Dask:
    """Tasks on a ``dask.distributed`` cluster."""

    def __init__(self, address: str) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise SkystackError("--scheduler needs dask.distributed; install it with "
                                "pip install 'dask[distributed]'") from None
        try:
            self._client = Client(address, timeout="20s", set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SkystackError(f"--scheduler {address}: cannot connect ({exc}); check the address and that "
                                "the dask scheduler is running") from None
        self.label = f"dask:{address}"

    def map(self, fn: Callable[[Any], dict], items: list[tuple[str, Any]],
            on_result: Callable[[str, dict], None]) -> None:
        from distributed import as_completed

        if not items:
            return
        futures = {}
        for key, payload in items:
            tok = hashlib.sha1(key.encode()).hexdigest()[:10]
            f = self._client.submit(fn, payload, pure=False, key=f"skystack-{fn.__name__.strip('_')}-{tok}-"
                                                                  f"{time.time_ns()}")
            futures[f] = key
        seen: set = set()
        try:
            for fut in as_completed(list(futures), loop=self._client.loop):
                seen.add(fut)
                key = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - KilledWorker, cancelled...
                    res = {"status": "failed", "error": f"{_DIED}: {type(exc).__name__}: {exc}"}
                on_result(key, res)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self._client.cancel([f for f in futures if f not in seen and not f.done()])
            _journal_finished({f: k for f, k in futures.items() if f.status == "finished"}, seen, on_result)
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def _default_workers(n_tasks: int, gpu: bool, n_devices: int = 1) -> int:
    """Worker processes of a local pool: one per GPU, or half the CPU cores; never more than the tasks."""
    if gpu:
        return max(1, min(n_tasks, n_devices))
    return max(1, min(n_tasks, (os.cpu_count() or 2) // 2))
