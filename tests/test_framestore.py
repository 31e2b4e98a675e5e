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


def test_float16_in_ram_when_only_it_fits_the_budget(rng):
    """A store whose float32 frames exceed the RAM budget but whose float16 ones fit stays in RAM as
    float16: within the budget, no spill file, and every read (frame, frame into a buffer, tile, a
    subset's tile) gives the float16 spill's values bit for bit."""
    n, shape = 4, (3, 13, 19)
    frames = rng.normal(900.0, 40.0, (n, *shape)).astype(np.float32)
    frames[1, 0, 2, 3] = np.nan
    frames[2, 1, 4, 5] = 3.0e5
    f32 = n * int(np.prod(shape)) * 4
    with FrameStore(n, shape, ram_budget=f32 // 2, dtype="float16") as ram, \
            FrameStore(n, shape, ram_budget=f32 // 2 - 1, dtype="float16") as disk, \
            FrameStore(n, shape, ram_budget=f32 // 2, dtype="float32") as f32_disk:
        assert (ram.on_disk, ram.dtype, ram.nbytes, ram.where) == (False, np.float16, f32 // 2, "RAM")
        assert ram._dir is None
        assert disk.on_disk and disk.dtype == np.float16 and f32_disk.on_disk and f32_disk.dtype == np.float32
        for i, f in enumerate(frames):
            ram.put(i, f)
            disk.put(i, f)
        buf = np.empty(shape, np.float32)
        for i in range(n):
            np.testing.assert_array_equal(ram.get(i), disk.get(i))
            assert ram.get(i, out=buf) is buf
            np.testing.assert_array_equal(buf, disk.get(i))
        np.testing.assert_array_equal(ram.tile(range(n), 2, 9, 1, 15), disk.tile(range(n), 2, 9, 1, 15))
        np.testing.assert_array_equal(ram.tile([3, 1], 0, 13), disk.tile([3, 1], 0, 13))
        assert np.nanmax(np.abs(ram.tile(range(n), 0, 13) - frames) / np.abs(frames)) <= 2.0 ** -11
