"""The float16 conversions of the spilled frame store (``kernels/half.cu``) against their NumPy twins.

NumPy's float32 -> float16 cast is the reference (round to nearest, ties to
even; overflow to inf; NaN stays NaN). The kernels must give its bits for every
float32 exponent (random and edge mantissas, both signs, both store scales),
and decode all 65536 float16 patterns exactly; the native build gives the
emulator's bits.
"""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine import backend as be
from skystack.engine import framestore as fs
from skystack.kernels.emulate import emulated, emulator_available

pytestmark = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")

EDGE_MANTISSAS = [0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFFFF, 0x7FF000, 0x7FE000,
                  0x7FEFFF, 0x7FF001, 0x800, 0x400000, 0x3FFFFF]


def _float32_sweep(rng) -> np.ndarray:
    """Every float32 exponent with edge and random mantissas, both signs, and named values."""
    exps = np.arange(256, dtype=np.uint32) << 23
    mant = rng.integers(0, 1 << 23, size=(256, 600), dtype=np.uint32)
    mant[:, :len(EDGE_MANTISSAS)] = np.array(EDGE_MANTISSAS, dtype=np.uint32)
    bits = (exps[:, None] | mant).ravel()
    x = np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)
    named = np.array([65504, 65519.99, 65520, 65536, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25,
                      2.0 ** -25 * 1.0000001, np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=np.float32)
    return np.concatenate([x, named])


def _twin_half(x: np.ndarray, scale: float) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.float16)
    with np.errstate(all="ignore"):
        fs._to_half_numpy(x, scale, out)
    return out


def _assert_same_half(got_bits: np.ndarray, ref: np.ndarray) -> None:
    nan = np.isnan(ref)
    np.testing.assert_array_equal(got_bits[~nan], ref.view(np.uint16)[~nan])
    assert np.isnan(got_bits[nan].view(np.float16)).all()


def _modules():
    from skystack.kernels.native import available, native

    return [emulated("half.cu")] + ([native("half.cu")] if available() else [])


@pytest.mark.parametrize("scale", [1.0 / fs.HALF_SCALE, 1.0])
def test_to_half_gives_numpys_bits(rng, scale):
    x = _float32_sweep(rng)
    ref = _twin_half(x, scale)
    for mod in _modules():
        got = np.full(x.shape, 0xABCD, dtype=np.uint16)
        mod.launch("to_half", x.size, (x, got, np.int64(x.size), np.float32(scale)))
        _assert_same_half(got, ref)


def test_from_half_decodes_every_float16_exactly():
    h = np.arange(1 << 16, dtype=np.uint16)
    with np.errstate(all="ignore"):
        ref = np.multiply(h.view(np.float16), np.float32(fs.HALF_SCALE), dtype=np.float32)
    nan = np.isnan(ref)
    for mod in _modules():
        got = np.full(h.shape, -7.0, dtype=np.float32)
        mod.launch("from_half", h.size, (h, got, np.int64(h.size), np.float32(fs.HALF_SCALE)))
        np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
        assert np.isnan(got[nan]).all()


@pytest.mark.parametrize("native_mode", ["off", "on"])
def test_store_round_trip_is_the_twins_whichever_runs(rng, tmp_path, monkeypatch, native_mode):
    """A spilled float16 store gives the same bits with the twins and with the native kernels
    (frames, tiles of whole rows and of a column range), NaN kept as no-data, and values within
    float16's rounding (half a unit in the 11th bit) where they are normal float16 numbers."""
    monkeypatch.setenv("SKYSTACK_NATIVE", native_mode)
    monkeypatch.setattr(be, "_native_choice", {})
    frames = (rng.normal(800, 40, (3, 3, 37, 53)) * np.array([1, 1e-3, 3e2])[None, :, None, None]).astype(np.float32)
    frames[1, 2, 5:9, 7:11] = np.nan
    with fs.FrameStore(3, (3, 37, 53), ram_budget=1, dtype="float16", spill_dir=tmp_path) as store:
        for i, f in enumerate(frames):
            store.put(i, f)
        want = np.multiply(_twin_half(frames, 1.0 / fs.HALF_SCALE), np.float32(fs.HALF_SCALE), dtype=np.float32)
        for i in range(3):
            np.testing.assert_array_equal(store.get(i), want[i])
        np.testing.assert_array_equal(store.tile([2, 0], 4, 30), want[[2, 0], :, 4:30])
        np.testing.assert_array_equal(store.tile([1], 0, 37, 6, 20), want[[1], :, :, 6:20])
        assert np.isnan(store.get(1)[2, 5:9, 7:11]).all()
        normal = np.isfinite(frames) & (np.abs(frames) / fs.HALF_SCALE >= 2.0 ** -14)  # channel 1: subnormal
        assert normal.mean() > 0.6
        assert np.all(np.abs(want[normal] - frames[normal]) <= 2.0 ** -11 * np.abs(frames[normal]))
