"""Producer pool: input order, bounded memory, errors reported per file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from skystack.engine.errors import FrameReadError
from skystack.engine.frame import Frame, FrameMeta
from skystack.engine.producer import FrameProducer


def _fake_reader(delay_s: float = 0.0, bad: set[str] = frozenset()):
    def read(path: Path) -> Frame:
        if delay_s:
            time.sleep(delay_s * (1 + hash(path.name) % 3) / 2)
        if path.name in bad:
            raise FrameReadError(f"{path.name}: corrupt")
        data = np.full((4, 4), int(path.stem.split("_")[1]), dtype=np.uint16)
        return Frame(data=data, meta=FrameMeta(path=str(path), format="raw", shape=(4, 4)))

    return read


@pytest.mark.parametrize("workers,queue_size", [(1, 1), (2, 2), (4, 3)])
def test_order_and_bound_with_slow_consumer(workers, queue_size):
    paths = [Path(f"f_{i}.dng") for i in range(20)]
    prod = FrameProducer(paths, workers=workers, queue_size=queue_size, reader=_fake_reader(0.002))
    seen = []
    for item in prod:
        seen.append(int(item.frame.data[0, 0]))
        time.sleep(0.005)  # slow consumer: producers must wait, not pile up
    assert seen == list(range(20))
    assert prod.gauge.peak <= prod.bound == queue_size + workers  # consumer's frame counted while alive
    assert prod.gauge.live == 0


def test_manual_release_bounds_frames_held_by_workers():
    from concurrent.futures import ThreadPoolExecutor

    paths = [Path(f"f_{i}.dng") for i in range(30)]
    prod = FrameProducer(paths, workers=2, queue_size=2, reader=_fake_reader(0.001), manual_release=True)
    held = []

    def slow(item):
        time.sleep(0.01)
        held.append(prod.gauge.live)
        prod.release(item)

    with ThreadPoolExecutor(4) as pool:  # more consumers than the bound allows frames
        list(pool.map(slow, prod))
    assert max(held) <= prod.bound and prod.gauge.peak <= prod.bound
    assert prod.gauge.live == 0


def test_bad_frames_are_reported_and_rest_goes_on():
    paths = [Path(f"f_{i}.dng") for i in range(6)]
    prod = FrameProducer(paths, workers=2, queue_size=2, reader=_fake_reader(bad={"f_2.dng", "f_5.dng"}))
    items = list(prod)
    assert [it.index for it in items] == list(range(6))
    assert [it.error is not None for it in items] == [False, False, True, False, False, True]
    assert "f_2.dng" in items[2].error


def test_early_exit_stops_threads():
    paths = [Path(f"f_{i}.dng") for i in range(50)]
    prod = FrameProducer(paths, workers=3, queue_size=2, reader=_fake_reader(0.001))
    before = threading.active_count()
    for k, _item in enumerate(prod):
        if k == 3:
            break
    time.sleep(0.3)
    assert threading.active_count() <= before
