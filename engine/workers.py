"""Bounded thread pools: how per-frame and per-tile work is spread over the cores.

NumPy, SciPy's filters and the native kernels release the GIL, so threads run
side by side. :func:`run_parallel` keeps at most ``threads`` items in flight
(pulling a lazy iterator only as workers free up, so back-pressure reaches the
decoders) and gives each worker its share of the cores for native kernels;
:func:`map_threads` is the ordered map of a short list; :func:`read_ahead` reads the next
item (a tile from the store) while the caller works on the current one.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

__all__ = ["run_parallel", "map_threads", "read_ahead"]


def run_parallel(fn: Callable[[Any], None], items: Iterable[Any], threads: int, *,
                 on_done: Callable[[], None] | None = None) -> None:
    """Apply ``fn`` to every item with at most ``threads`` in flight; re-raise the first error.

    ``items`` may be a lazy iterator (the producer): it is pulled only as
    workers free up, so back-pressure reaches the decoders.
    """
    if threads <= 1:
        for it in items:
            fn(it)
            if on_done:
                on_done()
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from skystack.engine.backend import cpu_workers

    def one(it) -> None:
        with cpu_workers(threads):  # the workers' native kernels share the cores, not each all of them
            fn(it)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="skystack-work") as pool:
        pending: set = set()
        for it in items:
            pending.add(pool.submit(one, it))
            if len(pending) >= threads:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
                    if on_done:
                        on_done()
        for f in pending:
            f.result()
            if on_done:
                on_done()


def map_threads(fn: Callable[[Any], Any], items: list) -> list:
    """``[fn(x) for x in items]`` over the cores, in order."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skystack-map") as pool:
        return list(pool.map(fn, items))


def read_ahead(read: Callable[[Any], Any], keys: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """``(key, read(key))`` for each key in turn, the next key read on a thread while the caller
    works on the current one: at most two results are alive at once (the one handed out and the
    one being read). An error of ``read`` is raised where its result would be handed out.
    """
    from concurrent.futures import ThreadPoolExecutor

    keys = list(keys)
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="skystack-read") as pool:
        nxt = pool.submit(read, keys[0])
        for k, key in enumerate(keys):
            value = nxt.result()
            nxt = pool.submit(read, keys[k + 1]) if k + 1 < len(keys) else None
            yield key, value
            del value
