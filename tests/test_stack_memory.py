"""A stack larger than its memory limit: spills, stays under the limit, same answer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from skystack.engine.session import discover_session
from skystack.engine.stack import StackConfig, stack_session
from skystack.engine.synth import SynthConfig, simulate

MB = 1 << 20


@pytest.mark.slow
def test_stack_three_times_the_memory_limit(tmp_path):
    w, h, n = 1200, 1100, 32
    cfg = SynthConfig(seed=11, width=w, height=h, n_lights=n, n_bias=3, n_darks=3, n_flats=3,
                      n_dark_flats=0, trail_frames=None, cloudy_frame=None, shake_frame=None)
    simulate(cfg, tmp_path / "s")
    registered_bytes = n * 3 * h * w * 4
    limit = registered_bytes // 3
    out = tmp_path / "lim.tif"
    cmd = [sys.executable, "-m", "skystack", "stack", str(tmp_path / "s"), "-o", str(out), "--quiet",
           "--backend", "cpu", "--memory-limit", str(limit), "--cache-dir", str(tmp_path / "cache")]
    subprocess.run(cmd, check=True, timeout=600)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["frames_used"] == n
    assert report["memory"]["store_on_disk"] is True
    peak = report["memory"]["peak_rss_bytes"]
    # The acceptance bound, and (stricter) proof that the store did not sit in RAM:
    # holding it would need registered_bytes = 3 x limit on top of the interpreter.
    assert peak < limit + 500 * MB, (peak / MB, limit / MB)
    assert peak < registered_bytes, (peak / MB, registered_bytes / MB)

    # Same frames, no limit, in this process: the same image to float32 rounding.
    ref = stack_session(discover_session(tmp_path / "s"),
                        StackConfig(quiet=True, backend="cpu", cache_dir=str(tmp_path / "cache")))
    assert ref.store_on_disk is False
    got = np.moveaxis(tifffile.imread(out), -1, 0)
    both = np.isfinite(got) & np.isfinite(ref.image)
    assert np.array_equal(np.isfinite(got), np.isfinite(ref.image))
    scale = np.nanmax(np.abs(ref.image))
    assert np.max(np.abs(got[both] - ref.image[both])) <= 4 * np.finfo(np.float32).eps * scale


def test_pipeline_never_exceeds_the_queue_bound(tmp_path):
    cfg = SynthConfig(seed=12, width=640, height=480, n_lights=10, n_bias=0, n_darks=0, n_flats=0,
                      n_dark_flats=0)
    simulate(cfg, tmp_path / "s")
    res = stack_session(discover_session(tmp_path / "s"),
                        StackConfig(quiet=True, backend="cpu", queue_size=1, workers=2,
                                    cache_dir=str(tmp_path / "c")))
    assert 1 <= res.queue_peak <= res.queue_bound == 3
