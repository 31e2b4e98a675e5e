"""sep's C library through ctypes (``engine/extraction.py``): sep's Python results bit for bit, without the GIL."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from skystack.engine import extraction


def _field(rng, shape=(600, 800), n=300):
    img = rng.normal(200.0, 6.0, shape).astype(np.float32)
    img += np.linspace(0, 40, shape[1], dtype=np.float32)[None, :]  # a gradient for the mesh
    ys, xs = rng.uniform(8, shape[0] - 8, n), rng.uniform(8, shape[1] - 8, n)
    yy, xx = np.mgrid[-7:8, -7:8]
    for y, x, f in zip(ys, xs, rng.lognormal(6.0, 1.2, n)):
        iy, ix = int(y), int(x)
        img[iy - 7:iy + 8, ix - 7:ix + 8] += (f * np.exp(-((yy + iy - y) ** 2 + (xx + ix - x) ** 2) / 3.2)).astype(
            np.float32)
    return img


@pytest.fixture(scope="module")
def c_path():
    if not extraction.available():
        pytest.skip("this sep is not 1.4 (its C structures are not the ones extraction.py mirrors)")


@pytest.mark.parametrize("deblend", [False, True])
def test_c_path_gives_seps_python_results(c_path, rng, deblend):
    """Background, its subtraction and every catalogue column equal sep's Python API, masked or not."""
    import sep

    img = _field(rng)
    mask = np.zeros(img.shape, dtype=bool)
    mask[100:180, 300:420] = True
    for m in (None, mask):
        a, b = img.copy(), img.copy()
        ref = sep.Background(a, mask=m, bw=64, bh=64, fw=3, fh=3)
        got = extraction.Background(b, mask=m, box=64, filt=3)
        assert (got.globalback, got.globalrms) == (float(ref.globalback), float(ref.globalrms))
        ref.subfrom(a)
        got.subfrom(b)
        np.testing.assert_array_equal(a, b)
        cont = 0.005 if deblend else 1.0
        o1 = sep.extract(a, 3.0, err=ref.globalrms, minarea=5, deblend_cont=cont, clean=deblend)
        o2 = extraction.extract(b, 3.0, err=ref.globalrms, minarea=5, deblend_cont=cont, clean=deblend)
        assert len(o1) > 150 and o1.dtype == o2.dtype
        for k in o1.dtype.names:
            np.testing.assert_array_equal(o1[k], o2[k], err_msg=k)


def test_c_path_raises_seps_pixel_buffer_error(c_path, rng):
    """A full pixel buffer raises what sep raises (detect grows the buffer on that message)."""
    import sep

    img = _field(rng, (300, 300), 0)
    img[50:250, 50:250] += 500.0  # one object of 40 000 pixels
    was = sep.get_extract_pixstack()
    sep.set_extract_pixstack(1000)
    try:
        with pytest.raises(Exception, match="pixel buffer full"):
            extraction.extract(img, 3.0, err=6.0, minarea=5, deblend_cont=1.0, clean=False)
        with pytest.raises(Exception, match="pixel buffer full"):
            sep.extract(img, 3.0, err=6.0, minarea=5, deblend_cont=1.0, clean=False)
    finally:
        sep.set_extract_pixstack(was)


def test_c_path_lets_other_threads_run(c_path, rng):
    """While one thread measures a background in C, another thread's Python code runs: it ticks
    inside the call's time span (sep's Python API holds the GIL for all of it)."""
    img = _field(rng, (3000, 3000), 50)
    ticks: list[float] = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0)

    th = threading.Thread(target=ticker)
    th.start()
    try:
        time.sleep(0.02)
        t0 = time.perf_counter()
        extraction.Background(img, mask=None, box=64, filt=3)
        t1 = time.perf_counter()
    finally:
        stop.set()
        th.join()
    inside = [t for t in ticks if t0 + 0.2 * (t1 - t0) < t < t1 - 0.2 * (t1 - t0)]
    assert len(inside) > 10, (len(inside), t1 - t0)
