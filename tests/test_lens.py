"""Radial lens model: undistort inverts distort; kernel parameters."""

import numpy as np
import pytest

from skystack.engine.lens import RadialLens


@pytest.mark.parametrize("k1,k2", [(-0.045, 0.0), (-0.1, 0.02), (0.05, -0.01), (0.0, 0.0)])
def test_undistort_inverts_distort(k1, k2):
    lens = RadialLens.for_shape((720, 960), k1=k1, k2=k2)
    rng = np.random.default_rng(3)
    p = rng.uniform([-200, -150], [1160, 870], size=(500, 2))
    d = lens.distort(p)
    back = lens.undistort(d)
    np.testing.assert_allclose(back, p, atol=1e-8)
    # barrel pulls points towards the centre, pincushion pushes them out
    r0 = np.hypot(p[:, 0] - lens.cx, p[:, 1] - lens.cy)
    r1 = np.hypot(d[:, 0] - lens.cx, d[:, 1] - lens.cy)
    if k1 < 0:
        assert np.all(r1 <= r0 + 1e-9)
    elif k1 > 0:
        assert np.all(r1 >= r0 - 1e-9)


def test_corner_displacement_matches_k1():
    lens = RadialLens.for_shape((720, 960), k1=-0.03)
    corner = np.array([[lens.cx + 480.0, lens.cy + 360.0]])  # rho = 1
    d = lens.distort(corner)[0]
    assert np.hypot(d[0] - lens.cx, d[1] - lens.cy) == pytest.approx(600.0 * 0.97, rel=1e-12)


def test_kernel_params_and_validation():
    lens = RadialLens.for_shape((100, 200), k1=-0.05, k2=0.01)
    ocx, ocy, cx, cy, inv, k1, k2 = lens.kernel_params((3.0, -2.0))
    assert (float(ocx), float(ocy)) == (lens.cx + 3.0, lens.cy - 2.0)
    assert float(inv) == pytest.approx(1.0 / lens.r_norm ** 2)
    with pytest.raises(ValueError):
        RadialLens(cx=0.0, cy=0.0, r_norm=0.0)
