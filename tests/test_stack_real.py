"""Real frames: the Seestar S50 M 94 session stacks and its noise drops as it should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from skystack.engine.session import SessionFiles
from skystack.engine.stack import StackConfig, combine_registered, register_session

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def _background_rms(img: np.ndarray) -> float:
    """Clipped RMS of (image - 15 px median) over the frame's outer 60 % border ring (away from M 94)."""
    g = img[1] if img.ndim == 3 else img
    h, w = g.shape
    res = g - ndimage.median_filter(np.nan_to_num(g), size=15)
    yy, xx = np.mgrid[0:h, 0:w]
    ring = (np.abs(yy - h / 2) > 0.3 * h) | (np.abs(xx - w / 2) > 0.3 * w)
    ring &= (yy > 40) & (yy < h - 40) & (xx > 40) & (xx < w - 40) & np.isfinite(res)
    v = res[ring].astype(np.float64)
    for _ in range(3):
        m, s = v.mean(), v.std()
        v = v[np.abs(v - m) < 3 * s]
    return float(v.std())


@pytest.mark.slow
def test_seestar_m94_session_stacks(realdata, tmp_path):
    lights = sorted((realdata / "seestar-m94" / "lights_session1").glob("*.fit"))
    assert len(lights) == 20
    cfg = StackConfig(quiet=True, backend="cpu", cache_dir=str(tmp_path / "c"))
    with register_session(SessionFiles(lights=tuple(lights)), cfg) as reg:
        assert len(reg.used) == 20, [r.reason for r in reg.records if r.reason]
        res = combine_registered(reg, cfg)
        single = _background_rms(reg.frame(reg.ref))
    stacked = _background_rms(res.image)
    drop = single / stacked
    print(f"seestar m94: background noise single {single:.3g}, stack {stacked:.3g}, drop {drop:.2f}x")
    assert drop >= 3.5, drop
    residuals = [r.residual_px for r in res.frames if r.used and r.residual_px]
    assert max(residuals) < 0.5
    from skystack.engine.report import write_outputs

    ARTIFACTS.mkdir(exist_ok=True)
    write_outputs(res, tiff=None, preview=str(ARTIFACTS / "seestar-m94-stack.png"),
                  report=str(ARTIFACTS / "seestar-m94-stack.json"))
