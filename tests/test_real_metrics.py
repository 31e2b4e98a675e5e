"""bench/real_metrics.py: two stacks of real frames compared without a truth (the Siril comparison's Seestar mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from skystack.tools import bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from real_metrics import Scorer  # noqa: E402


@pytest.fixture(scope="module")
def sky():
    from skystack.tools.synth import build_truth

    return build_truth(bench.session_synth_config(5, 0.3)).sky(0)


def test_scorer_brings_a_second_stack_to_the_first_ones_units(sky):
    """Image B = 2.5 x (the same sky) + noise 2.5 sigma: scale 2.5, the same noise in A's units."""
    rng = np.random.default_rng(2)
    a, sigma = 2.5e-5, 3e-4
    img_a = (a * sky + rng.normal(0.0, sigma, sky.shape)).astype(np.float32)
    img_b = (2.5 * a * sky + rng.normal(0.0, 2.5 * sigma, sky.shape)).astype(np.float32)
    sc = Scorer({"a": img_a, "b": img_b})
    assert len(sc.boxes) >= 30
    qa, qb = sc.score(img_a, name="a"), sc.score(img_b, name="b")
    np.testing.assert_allclose(qb["scale"], 2.5, rtol=0.03)
    for q in (qa, qb):
        assert q["noise_mean"] == pytest.approx(sigma, rel=0.08)
        assert q["noise_binned_mean"] == pytest.approx(sigma, rel=0.15)  # white noise: the same at 4x4
        for c in q["colour_noise"]:
            assert c == pytest.approx(np.sqrt(2.0) * sigma, rel=0.08)  # independent noise per channel


def test_blurred_stack_is_scored_in_the_same_boxes(sky):
    """A Gaussian-blurred copy keeps its units (scale 1), loses pixel noise as the blur predicts, widens its stars."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(4)
    a, sigma = 2.5e-5, 3e-4
    img = (a * sky + rng.normal(0.0, sigma, sky.shape)).astype(np.float32)
    sc = Scorer({"a": img})
    blurred = np.stack([gaussian_filter(c, 1.0) for c in img]).astype(np.float32)
    q0, q1 = sc.score(img, name="a"), sc.score(blurred)
    assert q1["n_boxes"] == q0["n_boxes"]
    np.testing.assert_allclose(q1["scale"], 1.0, rtol=0.03)
    assert q1["noise_mean"] == pytest.approx(0.282 * sigma, rel=0.12)  # 1 / (2 sqrt(pi) s) for s = 1 px
    assert q1["fwhm_px"] > q0["fwhm_px"] + 0.5
