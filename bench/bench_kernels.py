"""Micro-benchmarks of each kernel operation, on the CPU (NumPy twin) and the GPU (CUDA kernel).

Run with ``python -m pytest bench/bench_kernels.py --benchmark-enable``
(add ``--benchmark-json=bench/results/kernels.json`` to keep the numbers).
Every operation is the public dispatching function the pipeline calls, so
the CPU case times the NumPy twin and the GPU case the kernel in
``kernels/*.cu`` (plus the device synchronisation). Frame size:
``SKYSTACK_BENCH_SIZE=WIDTHxHEIGHT`` (default 1800x1200); the combine cube
is 16 frames of a 256-row tile of that width.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

PATTERN = "RGGB"
BLACK = (2046.0, 2048.0, 2049.0, 2051.0)
WHITE = 16383.0


def _raw(rng, shape):
    return rng.integers(2000, 6000, size=shape, dtype=np.uint16)


def _float(rng, shape, lo=0.05, hi=0.3):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def _defects(rng, shape, fraction=2e-4):
    mask = np.zeros(shape, dtype=np.uint8)
    n = int(fraction * mask.size)
    mask.ravel()[rng.choice(mask.size, n, replace=False)] = 1
    return mask


def _calibration_inputs(xp, rng, shape) -> tuple:
    """A light, bias, dark and flat on the device (drawn in that order from ``rng``)."""
    light = xp.asarray(_float(rng, shape))
    bias = xp.asarray(_float(rng, shape, 0.0, 0.01))
    dark = xp.asarray(_float(rng, shape, 0.0, 0.01))
    flat = xp.asarray(_float(rng, shape, 0.8, 1.0))
    return light, bias, dark, flat


def _similarity(deg: float, dx: float, dy: float, shape) -> np.ndarray:
    h, w = shape
    th = math.radians(deg)
    c, s = math.cos(th), math.sin(th)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # rotation about the centre, then a shift
    return np.array([[c, -s, cx - c * cx + s * cy + dx], [s, c, cy - s * cx - c * cy + dy], [0, 0, 1.0]])


def test_cfa_to_float(benchmark, backend, sync, frame_size, bench_rng):
    from skystack.engine.rawconv import cfa_to_float

    raw = backend.xp.asarray(_raw(bench_rng, frame_size))
    out = benchmark(lambda: sync(cfa_to_float(raw, pattern=PATTERN, black_level=BLACK, white_level=WHITE)))
    assert out.shape == frame_size


def test_calibrate(benchmark, backend, sync, frame_size, bench_rng):
    from skystack.engine.calibrate import calibrate

    light, bias, dark, flat = _calibration_inputs(backend.xp, bench_rng, frame_size)
    out = benchmark(lambda: sync(calibrate(light, bias=bias, dark=dark, dark_scale=1.0, flat=flat)))
    assert out.shape == frame_size


def test_calibrate_fused_defects(benchmark, backend, sync, frame_size, bench_rng):
    from skystack.engine.calibrate import calibrate

    light, bias, dark, flat = _calibration_inputs(backend.xp, bench_rng, frame_size)
    mask = backend.xp.asarray(_defects(bench_rng, frame_size))
    out = benchmark(lambda: sync(calibrate(light, bias=bias, dark=dark, flat=flat, defects=mask,
                                           pattern=PATTERN)))
    assert out.shape == frame_size


def test_correct_defects(benchmark, backend, sync, frame_size, bench_rng):
    from skystack.engine.cosmetic import correct_defects

    xp = backend.xp
    img = xp.asarray(_float(bench_rng, frame_size))
    mask = xp.asarray(_defects(bench_rng, frame_size))
    out, n = benchmark(lambda: sync(correct_defects(img, mask, pattern=PATTERN)))
    assert out.shape == frame_size


@pytest.mark.parametrize("method", ["bilinear", "superpixel", "rcd"])
def test_debayer(benchmark, backend, sync, frame_size, bench_rng, method):
    from skystack.engine.debayer import debayer

    cfa = backend.xp.asarray(_float(bench_rng, frame_size))
    out = benchmark.pedantic(lambda: sync(debayer(cfa, PATTERN, method=method, wb=(2.0, 1.0, 1.5))),
                             rounds=5, warmup_rounds=1)
    assert out.shape[0] == 3


@pytest.mark.parametrize("method", ["lanczos3", "bilinear"])
def test_warp(benchmark, backend, sync, frame_size, bench_rng, method):
    from skystack.engine.warp import warp

    img = backend.xp.asarray(_float(bench_rng, (3, *frame_size)))
    t = _similarity(0.7, 3.3, -2.1, frame_size)
    out = benchmark.pedantic(lambda: sync(warp(img, t, frame_size, method=method)), rounds=5, warmup_rounds=1)
    assert out.shape == (3, *frame_size)


@pytest.mark.parametrize("method", ["sigma", "winsorized", "linear", "gesd", "percentile", "minmax", "median"])
def test_combine(benchmark, backend, sync, frame_size, bench_rng, method):
    from skystack.engine.combine import combine

    n, rows, w = 16, 256, frame_size[1]
    cube_h = _float(bench_rng, (n, rows, w), 0.09, 0.11)
    cube_h[3, ::17, ::13] = 0.9  # outliers to reject
    cube = backend.xp.asarray(cube_h)
    res = benchmark.pedantic(lambda: sync(combine(cube, method=method)), rounds=3, warmup_rounds=1)
    assert res.mean.shape == (rows, w)
