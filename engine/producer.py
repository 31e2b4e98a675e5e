"""Producer side of the streaming engine: decode frames in a thread pool into a bounded queue.

rawpy, astropy and tifffile release the GIL while decoding, so a small pool
keeps the consumer fed. The queue bound limits how many decoded frames exist
at once (back-pressure): at most ``queue_size`` waiting plus ``workers`` being
decoded plus the one the consumer holds.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from skystack.engine.errors import SkystackError
from skystack.engine.frame import Frame


@dataclass(frozen=True, kw_only=True)
class Decoded:
    """One item of the queue: a frame or the error that stopped it."""

    index: int
    path: Path
    frame: Frame | None
    error: str | None = None


class _Gauge:
    """Counts decoded frames alive in the pipeline; remembers the peak."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = 0
        self.peak = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.live += n
            self.peak = max(self.peak, self.live)


class FrameProducer:
    """Iterate over decoded frames in input order with bounded memory.

    Parameters
    ----------
    paths : sequence of path
        Files to decode.
    workers : int
        Decoder threads.
    queue_size : int
        Decoded frames that may wait for the consumer.
    reader : callable
        ``reader(path) -> Frame`` (default :func:`skystack.engine.io.read_frame`), called in the
        decoder threads; the attribute :attr:`reader` may be replaced before iterating.
    manual_release : bool
        When True the consumer calls :meth:`release` once it is done with an
        item (so frames handed to worker threads still count against the
        bound); otherwise an item is released when the next one is requested.
    """

    def __init__(self, paths: Sequence[Path], *, workers: int | None = None, queue_size: int = 4,
                 reader: Callable[[Path], Frame] | None = None, manual_release: bool = False) -> None:
        if reader is None:
            from skystack.engine.io import read_frame as reader  # noqa: N813
        self.paths = [Path(p) for p in paths]
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))
        self.queue_size = max(1, queue_size)
        self.reader = reader
        self.gauge = _Gauge()
        # A slot is taken before decoding starts and given back when the consumer
        # is done with the frame: this is the bound on decoded frames alive.
        self._slots = threading.Semaphore(self.queue_size + self.workers)
        self._manual = manual_release

    @property
    def bound(self) -> int:
        """Most decoded frames that can be alive at once (queue + decoders), consumer's included."""
        return self.queue_size + self.workers

    def release(self, item: Decoded) -> None:
        """Give back the slot of ``item`` (``manual_release`` mode)."""
        if item.frame is not None:
            self.gauge.add(-1)
        self._slots.release()

    def __iter__(self) -> Iterator[Decoded]:
        n = len(self.paths)
        results: dict[int, Decoded] = {}
        cond = threading.Condition()
        next_index = iter(range(n))
        index_lock = threading.Lock()
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                # Take a slot first, then the next index: the slots are then always
                # held by the lowest undelivered indices, so the consumer never waits
                # on a frame that cannot start (no deadlock), and decoding never runs
                # ahead of the consumer by more than the bound.
                while not self._slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                with index_lock:
                    i = next(next_index, None)
                if i is None:
                    self._slots.release()
                    return
                path = self.paths[i]
                try:
                    item = Decoded(index=i, path=path, frame=self.reader(path))
                    self.gauge.add(1)
                except SkystackError as exc:
                    item = Decoded(index=i, path=path, frame=None, error=str(exc))
                except Exception as exc:  # a decoder bug must not kill the stack
                    item = Decoded(index=i, path=path, frame=None,
                                   error=f"{path.name}: cannot decode ({type(exc).__name__}: {exc})")
                with cond:
                    results[i] = item
                    cond.notify_all()

        threads = [threading.Thread(target=work, daemon=True, name=f"skystack-decode-{k}")
                   for k in range(min(self.workers, max(1, n)))]
        for t in threads:
            t.start()
        try:
            for i in range(n):
                with cond:
                    while i not in results:
                        cond.wait()
                    item = results.pop(i)
                yield item
                if not self._manual:
                    self.release(item)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=5)
