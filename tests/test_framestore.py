"""Frame store: RAM and spilled storage give the same tiles."""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine.framestore import FrameStore


@pytest.mark.parametrize("budget,dtype,on_disk", [(None, "float32", False), (1000, "float32", True),
                                                  (1000, "float16", True)])
def test_tiles_match_what_was_put(rng, budget, dtype, on_disk):
    frames = rng.random((5, 3, 17, 23)).astype(np.float32)
    with FrameStore(5, (3, 17, 23), ram_budget=budget, dtype=dtype) as store:
        assert store.on_disk is on_disk
        for i, f in enumerate(frames):
            store.put(i, f)
        t = store.tile(range(5), 3, 11, 2, 20)
        tol = 1e-3 if dtype == "float16" else 0
        assert t.dtype == np.float32
        assert np.allclose(t, frames[:, :, 3:11, 2:20], atol=tol, rtol=tol)
        sub = store.tile([1, 3], 0, 17)
        assert np.allclose(sub, frames[[1, 3]], atol=tol, rtol=tol)
        d = store._dir
    if on_disk:
        assert not d.exists()  # spill file removed on close


def test_float16_spill_keeps_saturated_flat_fielded_stars_and_rounds_as_it_says(rng):
    """The float16 spill holds values far past float16's 65504 (a saturated star over a flat's dark
    corner: ~1e5 ADU) and the negatives of a dark-subtracted sky, each within half a unit of its
    11th significant bit."""
    frame = rng.normal(800.0, 30.0, (3, 20, 30)).astype(np.float32)
    frame[:, 5, 5:9] = [9.3e4, 2.1e5, 6.5e5, 1.0e6]
    frame[1, 10, :4] = [-12.5, -0.004, 0.0, 3e-6]
    frame[2, 0, 0] = np.nan
    with FrameStore(2, (3, 20, 30), ram_budget=1000, dtype="float16") as store:
        store.put(1, frame)
        back = store.get(1)
        np.testing.assert_array_equal(store.tile([1], 0, 20)[0], back)
    ok = np.isfinite(frame)
    assert np.array_equal(np.isfinite(back), ok)
    rel = np.abs(back[ok] - frame[ok]) / np.maximum(np.abs(frame[ok]), 2.0 ** -14 * 16)
    assert rel.max() <= 2.0 ** -11 * 1.0001, rel.max()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_get_into_a_callers_buffer(rng, dtype):
    """A spilled frame read into a caller's reused buffer: the same values as a fresh read, in it."""
    frames = rng.normal(500.0, 20.0, (3, 2, 9, 11)).astype(np.float32)
    with FrameStore(3, (2, 9, 11), ram_budget=10, dtype=dtype) as store:
        for i, f in enumerate(frames):
            store.put(i, f)
        buf = np.full((2, 9, 11), -1.0, np.float32)
        for i in (2, 0, 1):
            got = store.get(i, out=buf)
            assert got is buf
            np.testing.assert_array_equal(got, store.get(i))
