"""engine/workers.py: the read-ahead of the combine's tiles."""

from __future__ import annotations

import threading
import pytest

from skystack.engine.workers import read_ahead


def test_read_ahead_reads_the_next_key_while_the_caller_works_and_keeps_two_alive():
    """Each key is read once, in order; the next key's read starts while the caller still works on
    the current value (the caller waits for it: read in turn, it would never start), and at most
    two values are alive at once."""
    alive, peak, log = set(), [0], []
    lock = threading.Lock()
    started = {k: threading.Event() for k in range(6)}

    class Value:
        def __init__(self, key):
            with lock:
                alive.add(key)
                peak[0] = max(peak[0], len(alive))
            self.key = key

        def __del__(self):
            with lock:
                alive.discard(self.key)

    def read(key):
        started[key].set()
        log.append(key)
        return Value(key)

    got, overlapped = [], []
    for key, value in read_ahead(read, range(6)):
        got.append((key, value.key))
        if key + 1 in started:  # the caller's work on this value
            overlapped.append(started[key + 1].wait(timeout=10))
        del value
    assert got == [(k, k) for k in range(6)]
    assert log == list(range(6))
    assert overlapped == [True] * 5
    assert peak[0] <= 2


def test_read_ahead_raises_the_read_error_where_its_value_would_come():
    def read(key):
        if key == 2:
            raise OSError("disk gone")
        return key

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for key, value in read_ahead(read, range(5)):
            got.append(value)
    assert got == [0, 1]
    assert list(read_ahead(read, [])) == []
