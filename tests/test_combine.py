"""Kappa-sigma clipped mean: analytic cases, a float64 reference, kernel (emulated/GPU) vs NumPy twin."""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine import combine as combine_mod
from skystack.engine.backend import get_backend, to_host
from skystack.engine.combine import MAX_SUPPORTED_FRAMES, ClipResult, combine, max_frames_define, sigma_clip_mean
from skystack.engine.rejection.sigma import _sigma_clip_mean_numpy
from skystack.engine.errors import SkystackError
from skystack.kernels.emulate import emulated, emulator_available, use_emulator

from refcombine import clip_round, reference_combine

needs_gxx = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")


#: Croux and Rousseeuw's small-sample MAD factors b_m, m = 2..9 (then m / (m - 0.8)).
_MAD_B = {2: 1.196, 3: 1.495, 4: 1.363, 5: 1.206, 6: 1.200, 7: 1.140, 8: 1.129, 9: 1.107}


def _reference(cube, kappa_low, kappa_high, max_iter, scale=None, offset=None, weights=None):
    """float64, pixel by pixel, straight from the definition (independent of the twin)."""

    def keep_of(v, valid):
        keep = valid.copy()
        for it in range(max_iter):
            if keep.sum() < 3:
                break
            kv = v[keep]
            centre = np.median(kv)
            if it == 0:
                sigma = 1.4826 * _MAD_B.get(kv.size, kv.size / (kv.size - 0.8)) * np.median(np.abs(kv - centre))
            else:
                sigma = np.std(kv)
            if not sigma > 0:
                break
            new = clip_round(v, valid, keep, centre, sigma, kappa_low, kappa_high)
            if new is None:
                break
            keep = new
        return keep

    return reference_combine(cube, keep_of, scale=scale, offset=offset, weights=weights)


def _cube(rng, n, h, w, *, nan=0.05, inf=0.01, outliers=0.03):
    c = rng.normal(0.2, 0.01, size=(n, h, w)).astype(np.float32)
    c[rng.random(c.shape) < outliers] += np.float32(0.5)
    c[rng.random(c.shape) < outliers / 2] -= np.float32(0.4)
    c[rng.random(c.shape) < nan] = np.nan
    c[rng.random(c.shape) < inf] = np.inf
    if h * w > 1:
        c[:, 0, -1] = np.nan  # an all-NaN pixel
    return c


def _per_frame(rng, n):
    return (rng.uniform(0.8, 1.2, n).astype(np.float32), rng.uniform(-0.02, 0.02, n).astype(np.float32),
            rng.uniform(0.2, 3.0, n).astype(np.float32))


def _on(backend, cube, **kw):
    kw = {k: (backend.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    r = sigma_clip_mean(backend.asarray(cube), **kw)
    return to_host(r.mean), to_host(r.count), to_host(r.rejected)


# ----------------------------------------------------------------------------- analytic cases


def test_hand_computed_example(backend):
    # [1, 2, 3, 4, 100], kappa 1.5: median 3, MAD 1, sigma 1.4826 * 1.206 = 1.788 -> reject 100
    # (> 5.68; the std, 39, would keep it); then [1..4]: median 2.5, MAD 1, sigma 1.4826 * 1.363
    # = 2.02 -> keep all; mean 2.5 of 4 values.
    cube = np.array([1, 2, 3, 4, 100], np.float32).reshape(5, 1, 1)
    mean, count, rej = _on(backend, cube, kappa_low=1.5, kappa_high=1.5)
    assert (mean[0, 0], count[0, 0]) == (2.5, 4)
    assert list(rej) == [0, 0, 0, 0, 1]


def test_one_outlier_among_three_goes_but_never_below_two_values(backend):
    # N=3: [0, 1, 100] kappa 3: median 1, MAD 1, sigma 1.4826 * 1.495 = 2.216 -> 100 goes
    # (a std-based clip cannot: the largest z-score of 3 values is 2/sqrt(3) = 1.15).
    mean, count, rej = _on(backend, np.array([0, 1, 100], np.float32).reshape(3, 1, 1))
    assert (mean[0, 0], count[0, 0], list(rej)) == (0.5, 2, [0, 0, 1])
    # [0, 10, 20] kappa 0.4: MAD 10, sigma 22.2, bounds 10 +- 8.9 would keep 1 value -> not applied.
    mean, count, rej = _on(backend, np.array([0, 10, 20], np.float32).reshape(3, 1, 1),
                           kappa_low=0.4, kappa_high=0.4)
    assert (mean[0, 0], count[0, 0]) == (10.0, 3) and rej.sum() == 0
    # a MAD of 0 (more than half the values equal) rejects nothing: [1, 1, 1, 100]
    _, count, rej = _on(backend, np.array([1, 1, 1, 100], np.float32).reshape(4, 1, 1))
    assert count[0, 0] == 4 and rej.sum() == 0


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_frames_are_averaged(backend, n):
    cube = np.array([[[0.0, np.nan]], [[100.0, 5.0]]], np.float32)[:n]
    mean, count, rej = _on(backend, cube, kappa_low=0.1, kappa_high=0.1)
    assert mean[0, 0] == (0.0 if n == 1 else 50.0)
    assert count[0, 0] == n
    assert (np.isnan(mean[0, 1]) and count[0, 1] == 0) if n == 1 else (mean[0, 1] == 5.0 and count[0, 1] == 1)
    assert rej.sum() == 0


def test_all_nan_pixel_and_inf(backend):
    cube = np.full((6, 2, 3), np.nan, np.float32)
    cube[:, 1, 2] = [1, 2, np.inf, -np.inf, 3, np.nan]
    mean, count, rej = _on(backend, cube)
    assert np.isnan(mean[0]).all() and (count[0] == 0).all()
    assert mean[1, 2] == 2.0 and count[1, 2] == 3  # inf is not data
    assert rej.sum() == 0


def test_weights_scale_offset(backend):
    cube = np.array([1, 2, 4], np.float32).reshape(3, 1, 1)
    w = np.array([1, 1, 2], np.float32)
    mean, count, _ = _on(backend, cube, weights=w, max_iter=0)
    assert mean[0, 0] == pytest.approx((1 + 2 + 8) / 4, rel=1e-7)
    # frames offset by 0.5 f and scaled by 2: normalisation brings them to the same level
    base = np.array([[3.0]], np.float32)
    cube = np.stack([(base - 0.5 * f) / 2 for f in range(5)]).astype(np.float32)
    mean, count, _ = _on(backend, cube, scale=np.full(5, 2, np.float32),
                         offset=np.arange(5, dtype=np.float32) * 0.5)
    assert mean[0, 0] == pytest.approx(3.0, rel=1e-6) and count[0, 0] == 5


def test_planted_outliers_are_rejected(backend, rng):
    n, h, w = 15, 24, 20
    cube = rng.normal(0.1, 0.01, size=(n, h, w)).astype(np.float32)
    ys, xs = rng.integers(0, h, 30), rng.integers(0, w, 30)
    cube[3, ys, xs] += np.float32(1.0)  # satellite trail / hot pixel in frame 3
    cube[7, ys[:10], xs[:10]] -= np.float32(0.5)  # dark outliers in frame 7
    planted3, planted7 = len(set(zip(ys, xs))), len(set(zip(ys[:10], xs[:10])))
    mean, count, rej = _on(backend, cube)
    assert rej[3] >= planted3 and rej[7] >= planted7
    assert (count[ys, xs] <= n - 1).all()
    # kept, the +1.0 outlier would lift the mean by 1/15 = 0.067
    assert np.abs(mean[ys, xs] - 0.1).max() < 0.02
    # Gaussian data alone: only a few tail values go (the first round's MAD-sigma of 15 values
    # scatters by ~30 %, and the std of what it kept reads low: ~1.2 % go at kappa 3 against
    # 0.3 % for a known sigma)
    others = np.delete(rej, [3, 7])
    assert others.max() <= 0.05 * h * w


@pytest.mark.parametrize("n, h, w", [(3, 5, 4), (9, 7, 6), (25, 6, 5)])
def test_twin_agrees_with_float64_reference(backend, rng, n, h, w):
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    kw = dict(kappa_low=2.0, kappa_high=2.5, max_iter=10)
    mean, count, rej = _on(backend, cube, scale=scale, offset=offset, weights=weights, **kw)
    rmean, rcount, rrej = _reference(cube, 2.0, 2.5, 10, scale, offset, weights)
    np.testing.assert_array_equal(count, rcount)
    np.testing.assert_array_equal(rej, rrej)
    np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-7)
    assert np.isnan(mean[0, -1]) and count[0, -1] == 0


def test_max_iter_zero_is_the_plain_weighted_mean(rng):
    cube = _cube(rng, 8, 6, 5)
    _s, _o, weights = _per_frame(rng, 8)
    r = sigma_clip_mean(cube, max_iter=0, weights=weights)
    rmean, rcount, _ = _reference(cube, 3, 3, 0, weights=weights)
    np.testing.assert_allclose(r.mean, rmean, rtol=1e-5)
    np.testing.assert_array_equal(r.count, rcount)
    assert r.rejected.sum() == 0


def test_result_types_and_input_untouched(rng):
    cube = _cube(rng, 5, 4, 3)
    before = cube.copy()
    r = sigma_clip_mean(cube)
    assert isinstance(r, ClipResult)
    assert (r.mean.dtype, r.count.dtype, r.rejected.dtype) == (np.float32, np.int32, np.int64)
    assert r.mean.shape == (4, 3) and r.count.shape == (4, 3) and r.rejected.shape == (5,)
    np.testing.assert_array_equal(cube, before)


def test_bad_input():
    with pytest.raises(SkystackError, match=r"\(N, H, W\)"):
        sigma_clip_mean(np.zeros((4, 4), np.float32))
    with pytest.raises(SkystackError, match="at most 4096 frames"):
        sigma_clip_mean(np.zeros((MAX_SUPPORTED_FRAMES + 1, 1, 1), np.float32))
    with pytest.raises(SkystackError, match="kappa"):
        sigma_clip_mean(np.zeros((3, 1, 1), np.float32), kappa_low=-1)
    with pytest.raises(SkystackError, match="weights must be finite and >= 0"):
        sigma_clip_mean(np.zeros((3, 1, 1), np.float32), weights=np.array([1, -1, 1], np.float32))
    with pytest.raises(SkystackError, match="one value per frame"):
        sigma_clip_mean(np.zeros((3, 1, 1), np.float32), scale=np.ones(2, np.float32))


def test_max_frames_buckets():
    assert max_frames_define(1) == ("MAX_FRAMES=64",)
    assert max_frames_define(64) == ("MAX_FRAMES=64",)
    assert max_frames_define(65) == ("MAX_FRAMES=256",)
    assert max_frames_define(4096) == ("MAX_FRAMES=4096",)


def test_combine_methods(rng):
    cube = _cube(rng, 6, 3, 3)
    a = combine(cube, method="sigma", kappa_low=2, kappa_high=2)
    b = sigma_clip_mean(cube, kappa_low=2, kappa_high=2)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(combine(cube, method="mean").mean, sigma_clip_mean(cube, max_iter=0).mean)
    with pytest.raises(SkystackError, match="unknown rejection method 'kappa'; use one of sigma, winsorized"):
        combine(cube, method="kappa")


# ----------------------------------------------------------------------------- kernel vs twin


def _kernel_run(mod, cube, scale, offset, weights, kl, kh, max_iter, *, block=256, reverse=False):
    n, h, w = cube.shape
    mean = np.full((h, w), -7.0, np.float32)
    count = np.full((h, w), -7, np.int32)
    rejected = np.zeros(n, np.uint64)
    mod.launch("sigma_clip_mean", h * w,
               (cube, np.int64(h * w), np.int32(n), scale, offset, weights, np.float32(kl),
                np.float32(kh), np.int32(max_iter), mean, count, rejected), block=block, reverse=reverse)
    return mean, count, rejected.astype(np.int64)


EMU_CASES = [(1, 1, 1), (1, 4, 5), (2, 3, 3), (3, 1, 9), (4, 9, 1), (5, 13, 17), (20, 16, 15),
             (64, 6, 7), (65, 5, 3)]


@needs_gxx
@pytest.mark.parametrize("n, h, w", EMU_CASES)
def test_emulated_kernel_equals_twin(rng, n, h, w):
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    mod = emulated("combine.cu", max_frames_define(n))
    got = _kernel_run(mod, cube, scale, offset, weights, 2.5, 3.0, 10, block=64)
    twin = _sigma_clip_mean_numpy(cube, np.float32(2.5), np.float32(3.0), 10, scale, offset, weights)
    np.testing.assert_array_equal(got[1], twin.count)
    np.testing.assert_array_equal(got[2], twin.rejected)
    # same float32 operations in the same order: bit-identical (NaN where no data)
    np.testing.assert_array_equal(got[0], twin.mean)


@needs_gxx
def test_emulated_kernel_order_independent(rng):
    n, h, w = 30, 12, 11
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    mod = emulated("combine.cu", max_frames_define(n))
    fwd = _kernel_run(mod, cube, scale, offset, weights, 2.0, 2.0, 5)
    rev = _kernel_run(mod, cube, scale, offset, weights, 2.0, 2.0, 5, block=32, reverse=True)
    for a, b in zip(fwd, rev):
        np.testing.assert_array_equal(a, b)
    assert fwd[2].sum() > 0


@needs_gxx
def test_emulated_kernel_refuses_too_many_frames(rng):
    cube = _cube(rng, 65, 2, 2)
    ones = np.ones(65, np.float32)
    mean, count, _ = _kernel_run(emulated("combine.cu", ("MAX_FRAMES=64",)), cube, ones, ones * 0, ones,
                                 3, 3, 10)
    assert (count == -1).all() and np.isnan(mean).all()


@needs_gxx
def test_operation_device_branch_in_emulator(monkeypatch, rng):
    n = 70  # picks the MAX_FRAMES=256 build
    cube = _cube(rng, n, 9, 8)
    scale, offset, weights = _per_frame(rng, n)
    expect = sigma_clip_mean(cube, kappa_low=2.0, kappa_high=3.0, scale=scale, offset=offset, weights=weights)
    use_emulator(monkeypatch, combine_mod)
    got = sigma_clip_mean(cube, kappa_low=2.0, kappa_high=3.0, scale=scale, offset=offset, weights=weights)
    assert got.rejected.dtype == np.int64
    for f in ("mean", "count", "rejected"):
        np.testing.assert_array_equal(getattr(got, f), getattr(expect, f))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("n, h, w", EMU_CASES + [(300, 33, 31)])
def test_gpu_kernel_equals_twin(rng, n, h, w):
    be = get_backend("gpu")
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    twin = sigma_clip_mean(cube, kappa_low=2.5, kappa_high=3.0, scale=scale, offset=offset, weights=weights)
    r = sigma_clip_mean(be.asarray(cube), kappa_low=2.5, kappa_high=3.0, scale=be.asarray(scale),
                        offset=be.asarray(offset), weights=be.asarray(weights))
    np.testing.assert_array_equal(to_host(r.count), twin.count)
    np.testing.assert_array_equal(to_host(r.rejected), twin.rejected)
    np.testing.assert_allclose(to_host(r.mean), twin.mean, rtol=1e-5, equal_nan=True)
