"""MTF autostretch: the background lands on the target, shadows clip where Siril clips."""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine.stretch import StretchConfig, autostretch, mtf, stretch_params, to_8bit


@pytest.mark.parametrize("m", [0.01, 0.1, 0.5, 0.9])
def test_mtf_fixed_points(m):
    assert mtf(0.0, m) == pytest.approx(0.0)
    assert mtf(1.0, m) == pytest.approx(1.0)
    assert mtf(m, m) == pytest.approx(0.5)
    x = np.linspace(0, 1, 101)
    assert np.all(np.diff(mtf(x, m)) > 0)  # monotonic


def test_background_lands_on_target(rng):
    bg, sigma = 0.02, 0.002
    img = (bg + sigma * rng.standard_normal((3, 300, 400))).astype(np.float32)
    img[:, 100:103, 200:203] = 0.9  # a star
    out = autostretch(img, StretchConfig(target_background=0.25))
    assert np.median(out) == pytest.approx(0.25, abs=0.01)
    # Shadows clip at median - 2.8 sigma: the clipped fraction is P(z < -2.8) = 0.26 %.
    frac0 = float(np.mean(out == 0.0))
    assert 0.001 < frac0 < 0.006
    assert out[:, 101, 201].min() > 0.95


def test_linked_vs_unlinked_colour_cast(rng):
    img = np.stack([0.03 + 0.002 * rng.standard_normal((200, 200)),
                    0.02 + 0.002 * rng.standard_normal((200, 200)),
                    0.01 + 0.002 * rng.standard_normal((200, 200))]).astype(np.float32)
    unl = autostretch(img, StretchConfig(linked=False))
    med = np.median(unl.reshape(3, -1), axis=1)
    assert np.allclose(med, 0.25, atol=0.01)  # unlinked neutralises the cast
    # Linked: one curve for all channels, shadows clipped per channel, so the
    # background comes out neutral too...
    lk = autostretch(img, StretchConfig(linked=True))
    medl = np.median(lk.reshape(3, -1), axis=1)
    assert np.ptp(medl) < 0.03
    # ...and a red star keeps R > G > B above the background.
    star = img.copy()
    star[0, 50, 50] += 0.3
    star[1, 50, 50] += 0.2
    star[2, 50, 50] += 0.1
    px = autostretch(star, StretchConfig(linked=True))[:, 50, 50]
    assert px[0] > px[1] > px[2]


def test_params_sigma_is_mad_based(rng):
    v = (0.1 + 0.01 * rng.standard_normal(200_000)).astype(np.float32)
    c0, _m = stretch_params(v)
    assert c0 == pytest.approx(0.1 - 2.8 * 0.01, abs=5e-4)


def test_to_8bit_layout():
    a = np.zeros((3, 4, 5), np.float32)
    a[0] = 1.0
    b = to_8bit(a)
    assert b.shape == (4, 5, 3) and b.dtype == np.uint8
    assert b[..., 0].min() == 255 and b[..., 1].max() == 0
