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
