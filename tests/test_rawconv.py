"""Raw conversion (uint16/float CFA -> normalised float32): twin vs float64 truth, kernel vs twin."""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine import rawconv
from skystack.engine.backend import get_backend, to_host
from skystack.engine.errors import SkystackError
from skystack.engine.rawconv import _cfa_to_float_numpy, _levels, cfa_to_float
from skystack.kernels.emulate import emulated, emulator_available, use_emulator

needs_gxx = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")

BLACK = (512.0, 498.0, 505.0, 2047.5)
WHITE = 16383.0
SHAPES = [(1, 1), (1, 9), (9, 1), (2, 2), (13, 17), (64, 47), (3, 5, 7)]


def _truth(raw: np.ndarray, black, white) -> np.ndarray:
    """float64 (raw - black[pos]) / (white - black[pos]), pos from each pixel's (y, x)."""
    h, w = raw.shape[-2:]
    y, x = np.indices((h, w))
    b = np.asarray(black, np.float64)[(y % 2) * 2 + (x % 2)]
    return (raw.astype(np.float64) - b) / (float(white) - b)


def _raw_u16(rng, shape):
    raw = rng.integers(0, 16384, size=shape).astype(np.uint16)
    raw.flat[0] = 0
    raw.flat[-1] = 65535  # above white: kept > 1
    return raw


def _raw_f32(rng, shape):
    raw = rng.uniform(-100, 17000, size=shape).astype(np.float32)
    flat = raw.reshape(-1)
    flat[:: 7] = np.nan
    flat[3:: 11] = np.inf
    flat[5:: 13] = -np.inf
    return raw


def _kernel_args(raw, out, black, white):
    b, r = _levels("RGGB", black, white)
    h, w = raw.shape[-2:]
    return (raw, out, np.int64(raw.size), np.int32(w), np.int32(h),
            *(np.float32(v) for v in b), *(np.float32(v) for v in r))


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_truth(backend, rng, shape):
    raw = _raw_u16(rng, shape)
    got = to_host(cfa_to_float(backend.asarray(raw), pattern="RGGB", black_level=BLACK, white_level=WHITE))
    assert got.dtype == np.float32 and got.shape == raw.shape
    np.testing.assert_allclose(got, _truth(raw, BLACK, WHITE), rtol=1e-6, atol=1e-9)


def test_negatives_and_overrange_are_kept(backend):
    raw = np.array([[0, 498], [505, 65535]], dtype=np.uint16)
    got = to_host(cfa_to_float(backend.asarray(raw), pattern="GRBG", black_level=BLACK, white_level=WHITE))
    assert got[0, 0] == pytest.approx(-512 / (WHITE - 512), rel=1e-6)  # below black: negative
    assert got[0, 1] == 0.0 and got[1, 0] == 0.0
    assert got[1, 1] == pytest.approx((65535 - 2047.5) / (WHITE - 2047.5), rel=1e-6)  # > 1


def test_mono_and_single_black_level(rng):
    raw = _raw_u16(rng, (11, 6))
    a = cfa_to_float(raw, pattern=None, black_level=(100.0,) * 4, white_level=4095)
    b = cfa_to_float(raw, pattern=None, black_level=(100.0,), white_level=4095)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, (raw - 100.0) / 3995.0, rtol=1e-6)


def test_float_and_other_integer_inputs(rng):
    raw = _raw_f32(rng, (10, 12))
    got = cfa_to_float(raw, pattern="RGGB", black_level=BLACK, white_level=WHITE)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(got, _truth(raw, BLACK, WHITE), rtol=1e-6, atol=1e-9)
    assert np.isnan(got.flat[0]) and got.flat[3] == np.inf and got.flat[5] == -np.inf
    as_u8 = rng.integers(0, 255, size=(5, 6)).astype(np.uint8)
    np.testing.assert_array_equal(
        cfa_to_float(as_u8, pattern=None, black_level=(4,) * 4, white_level=255),
        cfa_to_float(as_u8.astype(np.uint16), pattern=None, black_level=(4,) * 4, white_level=255))


def test_out_argument_and_input_untouched(rng):
    raw = _raw_u16(rng, (8, 8))
    before = raw.copy()
    out = np.empty(raw.shape, np.float32)
    got = cfa_to_float(raw, pattern="RGGB", black_level=BLACK, white_level=WHITE, out=out)
    assert got is out
    np.testing.assert_array_equal(raw, before)
    with pytest.raises(SkystackError, match="out must be"):
        cfa_to_float(raw, pattern="RGGB", black_level=BLACK, white_level=WHITE,
                     out=np.empty(raw.shape, np.float64))


@pytest.mark.parametrize("kw, match", [
    ({"white_level": 400.0}, "must exceed every black level"),
    ({"pattern": "RGBG"}, "unknown CFA pattern"),
    ({"black_level": (1.0, 2.0)}, "black_level must be 4"),
    ({"black_level": (np.nan, 0, 0, 0)}, "black_level must be 4"),
])
def test_bad_levels(kw, match):
    args = {"pattern": "RGGB", "black_level": BLACK, "white_level": WHITE, **kw}
    with pytest.raises(SkystackError, match=match):
        cfa_to_float(np.zeros((4, 4), np.uint16), **args)


# ----------------------------------------------------------------------------- kernel vs twin


@needs_gxx
@pytest.mark.parametrize("shape", SHAPES)
def test_emulated_u16_kernel_equals_twin(rng, shape):
    raw = _raw_u16(rng, shape)
    out = np.full(raw.shape, np.nan, np.float32)
    emulated("rawconv.cu").launch("cfa_to_float_u16", raw.size, _kernel_args(raw, out, BLACK, WHITE))
    b, r = _levels("RGGB", BLACK, WHITE)
    twin = _cfa_to_float_numpy(raw, b, r, np.empty(raw.shape, np.float32))
    np.testing.assert_array_equal(out, twin)  # identical float32 operations: exact


@needs_gxx
@pytest.mark.parametrize("shape", SHAPES)
def test_emulated_f32_kernel_equals_twin(rng, shape):
    raw = _raw_f32(rng, shape)
    out = np.zeros(raw.shape, np.float32)
    emulated("rawconv.cu").launch("cfa_to_float_f32", raw.size, _kernel_args(raw, out, BLACK, WHITE),
                                  block=64)
    b, r = _levels("RGGB", BLACK, WHITE)
    with np.errstate(invalid="ignore"):
        twin = _cfa_to_float_numpy(raw, b, r, np.empty(raw.shape, np.float32))
    np.testing.assert_array_equal(out, twin)


@needs_gxx
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int32])
def test_operation_device_branch_in_emulator(monkeypatch, rng, dtype):
    # The op's GPU branch (argument building, kernel choice) run through the emulator.
    raw = _raw_u16(rng, (7, 10)).astype(dtype)
    expect = cfa_to_float(raw, pattern="BGGR", black_level=BLACK, white_level=WHITE)
    use_emulator(monkeypatch, rawconv)
    got = cfa_to_float(raw, pattern="BGGR", black_level=BLACK, white_level=WHITE)
    np.testing.assert_array_equal(got, expect)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["u16", "f32"])
def test_gpu_kernel_equals_twin(rng, shape, kind):
    backend = get_backend("gpu")
    raw = _raw_u16(rng, shape) if kind == "u16" else _raw_f32(rng, shape)
    with np.errstate(invalid="ignore"):
        expect = cfa_to_float(raw, pattern="RGGB", black_level=BLACK, white_level=WHITE)
    got = cfa_to_float(backend.asarray(raw), pattern="RGGB", black_level=BLACK, white_level=WHITE)
    np.testing.assert_array_equal(to_host(got), expect)  # --fmad=false, IEEE division: exact
