"""Rejection methods of combine(): hand-worked cases, float64 references, statistics, kernels vs twins."""

from __future__ import annotations

import re

import numpy as np
import pytest

from skystack.engine import combine as combine_mod
from skystack.engine.backend import get_backend, to_host
from skystack.engine.combine import (DEFAULT_KAPPAS, METHODS, WINSOR_MAX_ITER, combine, gesd_critical_values,
                                     max_frames_define)
from skystack.engine.rejection.gesd import _gesd_clip_mean_numpy
from skystack.engine.rejection.linear import _linear_fit_clip_mean_numpy
from skystack.engine.rejection.median import _median_combine_numpy
from skystack.engine.rejection.minmax import _minmax_clip_mean_numpy
from skystack.engine.rejection.percentile import _percentile_clip_mean_numpy
from skystack.engine.rejection.sigma import _sigma_clip_mean_numpy
from skystack.engine.rejection.winsorized import _winsorized_clip_mean_numpy
from skystack.engine.errors import SkystackError
from skystack.kernels import read_source
from skystack.kernels.emulate import emulated, emulator_available, use_emulator

from refcombine import clip_round, reference_combine

needs_gxx = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")

NEW_METHODS = ("winsorized", "linear", "gesd", "percentile", "minmax", "median")
#: kappas each method is exercised with (percentile: fractions of the median; minmax: counts)
# (linear: a residual alone on its side of the line is exactly m/2 sigma for m values, so
# kappas of 1.5, 2, 2.5 ... sit on a rounding edge for 3, 4, 5 ... values; avoid them in comparisons)
KAPPAS = {"sigma": (2.5, 3.0), "winsorized": (2.0, 2.5), "linear": (2.1, 2.6), "gesd": (0.3, 0.05),
          "percentile": (0.04, 0.05),
          "minmax": (1.0, 2.0), "median": (3.0, 3.0), "mean": (3.0, 3.0)}


def _on(backend, cube, method, **kw):
    kw = {k: (backend.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    r = combine(backend.asarray(cube), method=method, **kw)
    return to_host(r.mean), to_host(r.count), to_host(r.rejected)


def _col(values) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(-1, 1, 1)


# ----------------------------------------------------------------------------- float64 references
# Straight from the definitions (each method's module docstring in engine/rejection/, the shared
# rules in engine/combine.py's), pixel by pixel, in float64,
# with NumPy's own median / std / clip / stable argsort (nothing shared with the twins).


#: Croux and Rousseeuw's small-sample MAD factors b_m, m = 2..9 (then m / (m - 0.8)).
_MAD_B = {2: 1.196, 3: 1.495, 4: 1.363, 5: 1.206, 6: 1.200, 7: 1.140, 8: 1.129, 9: 1.107}


def _mad_sigma(x):
    c = np.median(x)
    return 1.4826 * _MAD_B.get(x.size, x.size / (x.size - 0.8)) * np.median(np.abs(x - c))


def _ref_winsorized(v, kl, kh, max_iter):
    keep = np.ones(v.size, bool)
    for _ in range(max_iter):
        if keep.sum() < 3:
            break
        x = v[keep]
        c = np.median(x)
        sig = _mad_sigma(x)
        if not sig > 0:
            break
        lo, hi = -np.inf, np.inf
        for _ in range(WINSOR_MAX_ITER):
            lo, hi = max(lo, c - 1.5 * sig), min(hi, c + 1.5 * sig)
            new_sig = 1.134 * np.clip(x, lo, hi).std(ddof=1)
            done = not abs(new_sig - sig) > 0.0005 * sig
            sig = new_sig
            if done:
                break
        new = clip_round(v, keep, keep, c, sig, kl, kh)
        if new is None:
            break
        keep = new
    return keep


def _ref_gesd(v, kl, kh, max_iter):
    """Rosner's generalized ESD test with scipy's t quantiles, in float64."""
    from scipy import stats

    keep = np.ones(v.size, bool)
    if max_iter < 1:
        return keep
    order = np.argsort(v, kind="stable")  # ties: lower frame first, as the kernel ranks them
    kept = list(order)
    removed, n_out = [], 0
    for j in range(1, int(np.float32(kl) * np.float32(v.size)) + 1):
        if len(kept) < 3:
            break
        x = v[kept]
        m = x.size
        mean, sd = x.mean(), x.std(ddof=1)
        t = stats.t.ppf(1 - kh / (2 * m), m - 2)
        lam = (m - 1) * t / np.sqrt((m - 2 + t * t) * m)
        lo_d, hi_d = mean - x[0], x[-1] - mean
        if max(lo_d, hi_d) > lam * sd:
            n_out = j
        removed.append(kept.pop(-1 if hi_d >= lo_d else 0))
    keep[removed[:n_out]] = False
    return keep


def _ref_linear(v, kl, kh, max_iter):
    keep = np.ones(v.size, bool)
    for _ in range(max_iter):
        if keep.sum() < 3:
            break
        frames = np.flatnonzero(keep)
        frames = frames[np.argsort(v[frames], kind="stable")]
        s = v[frames]
        x = np.arange(s.size, dtype=np.float64)
        dx = x - x.mean()  # least squares, centred (exact on integer data, unlike np.polyfit)
        fit = s.mean() + dx * (np.dot(dx, s - s.mean()) / np.dot(dx, dx))
        sigma = np.mean(np.abs(s - fit))
        bad = (fit - s > kl * sigma) | (s - fit > kh * sigma)
        if (~bad).sum() < 3 or not bad.any():
            break
        keep[frames[bad]] = False
    return keep


def _ref_percentile(v, kl, kh, max_iter):
    keep = np.ones(v.size, bool)
    c = np.median(v) if v.size else 0.0
    if max_iter >= 1 and v.size >= 3 and c != 0:
        new = (v >= c - kl * abs(c)) & (v <= c + kh * abs(c))
        if new.sum() >= 3:
            keep = new
    return keep


def _ref_minmax(v, kl, kh, max_iter):
    k_low = int(kl) if kl >= 1 else 1
    k_high = int(kh) if kh >= 1 else 1
    keep = np.ones(v.size, bool)
    if max_iter >= 1 and v.size - k_low - k_high >= 3:
        ranked = np.argsort(v, kind="stable")  # ties: lower frame first
        keep[ranked[:k_low]] = False
        keep[ranked[v.size - k_high:]] = False
    return keep


_REF_KEEP = {"winsorized": _ref_winsorized, "linear": _ref_linear, "gesd": _ref_gesd, "percentile": _ref_percentile,
             "minmax": _ref_minmax}


def _reference(method, cube, kl, kh, max_iter, scale=None, offset=None, weights=None):
    def keep_of(v, valid):
        keep = np.zeros(v.size, bool)
        keep[valid] = _REF_KEEP[method](v[valid], kl, kh, max_iter)
        return keep

    return reference_combine(cube, keep_of, scale=scale, offset=offset, weights=weights, median=method == "median")


def _cube(rng, n, h, w, *, nan=0.05, inf=0.01, outliers=0.04, ties=0.05):
    c = rng.normal(0.2, 0.01, size=(n, h, w)).astype(np.float32)
    c[rng.random(c.shape) < outliers] += np.float32(0.5)
    c[rng.random(c.shape) < outliers / 2] -= np.float32(0.3)
    c[rng.random(c.shape) < ties] = np.float32(0.2)  # repeated raw values
    c[rng.random(c.shape) < nan] = np.nan
    c[rng.random(c.shape) < inf] = np.inf
    c[rng.random(c.shape) < inf] = -np.inf
    if h * w > 1:
        c[:, 0, -1] = np.nan  # an all-NaN pixel
    return c


def _per_frame(rng, n):
    return (rng.uniform(0.8, 1.2, n).astype(np.float32), rng.uniform(-0.02, 0.02, n).astype(np.float32),
            rng.uniform(0.2, 3.0, n).astype(np.float32))


# ----------------------------------------------------------------------------- hand-worked cases


def test_minmax_drops_lowest_and_highest(backend):
    # [5, 1, 3, 3, 9, 7], one per side: 1 (frame 1) and 9 (frame 4) go; mean of 5, 3, 3, 7 = 4.5
    mean, count, rej = _on(backend, _col([5, 1, 3, 3, 9, 7]), "minmax", kappa_low=1, kappa_high=1)
    assert (mean[0, 0], count[0, 0], list(rej)) == (4.5, 4, [0, 1, 0, 0, 1, 0])
    # kappa 1 low / 2.9 high -> 1 low and int(2.9) = 2 high: 1, 9, 7 go; mean of 5, 3, 3
    mean, count, rej = _on(backend, _col([5, 1, 3, 3, 9, 7]), "minmax", kappa_low=1, kappa_high=2.9)
    assert (count[0, 0], list(rej)) == (3, [0, 1, 0, 0, 1, 1]) and mean[0, 0] == pytest.approx(11 / 3, rel=1e-6)
    # kappa below 1 still drops one per side
    _, count, rej = _on(backend, _col([5, 1, 3, 3, 9, 7]), "minmax", kappa_low=0, kappa_high=0.5)
    assert count[0, 0] == 4 and list(rej) == [0, 1, 0, 0, 1, 0]


def test_minmax_ties_go_in_frame_order_and_weights_follow(backend):
    # five equal values: the lowest rank is frame 0 and the highest frame 4 (stable order);
    # weights 1..5 show which frames stayed: (2+3+4)*2/(2+3+4) = 2
    w = np.array([1, 2, 3, 4, 5], np.float32)
    mean, count, rej = _on(backend, _col([2, 2, 2, 2, 2]), "minmax", kappa_low=1, kappa_high=1, weights=w)
    assert (mean[0, 0], count[0, 0], list(rej)) == (2.0, 3, [1, 0, 0, 0, 1])
    # a tie at the low end: [4, 1, 1, 6, 5] -> frame 1 (first 1) and frame 3 (6) go
    _, count, rej = _on(backend, _col([4, 1, 1, 6, 5]), "minmax", kappa_low=1, kappa_high=1)
    assert count[0, 0] == 3 and list(rej) == [0, 1, 0, 1, 0]


def test_minmax_needs_three_left(backend):
    # 4 values, one per side would leave 2 -> nothing dropped; 5 values leave 3 -> dropped
    _, count, rej = _on(backend, _col([1, 2, 3, 4]), "minmax", kappa_low=1, kappa_high=1)
    assert count[0, 0] == 4 and rej.sum() == 0
    _, count, rej = _on(backend, _col([1, 2, 3, 4, 5]), "minmax", kappa_low=1, kappa_high=1)
    assert count[0, 0] == 3 and list(rej) == [1, 0, 0, 0, 1]


def test_median_ignores_weights_and_rejects_nothing(backend):
    cube = np.array([[[1.0, 4.0]], [[5.0, np.nan]], [[2.0, 6.0]], [[8.0, np.inf]]], np.float32)
    mean, count, rej = _on(backend, cube, "median", weights=np.array([100, 1, 1, 1], np.float32))
    assert mean[0, 0] == 3.5 and count[0, 0] == 4  # (2 + 5) / 2
    assert mean[0, 1] == 5.0 and count[0, 1] == 2  # (4 + 6) / 2 of the two valid values
    assert rej.sum() == 0


def test_percentile_bounds_are_fractions_of_the_median(backend):
    # sorted 7.5 9 10 10 11 14: median 10; kappa 0.2 / 0.3 -> keep [8, 13]: 7.5 and 14 go
    mean, count, rej = _on(backend, _col([10, 11, 9, 14, 7.5, 10]), "percentile", kappa_low=0.2,
                           kappa_high=0.3)
    assert (mean[0, 0], count[0, 0], list(rej)) == (10.0, 4, [0, 0, 0, 1, 1, 0])
    # kappa 0.3 / 0.5 -> keep [7, 15]: nothing goes
    _, count, _ = _on(backend, _col([10, 11, 9, 14, 7.5, 10]), "percentile", kappa_low=0.3, kappa_high=0.5)
    assert count[0, 0] == 6
    # a zero median rejects nothing (as in Siril); a negative one uses |median|:
    # [-10, -11, -9, -14] median -10.5, 0.2 -> keep [-12.6, -8.4]: -14 goes
    _, count, _ = _on(backend, _col([0, 0, 5, -5, 0]), "percentile", kappa_low=0.1, kappa_high=0.1)
    assert count[0, 0] == 5
    _, count, rej = _on(backend, _col([-10, -11, -9, -14]), "percentile", kappa_low=0.2, kappa_high=0.2)
    assert count[0, 0] == 3 and list(rej) == [0, 0, 0, 1]


def test_linear_fit_drops_the_outlier_then_stops(backend):
    # s = 0..8 and 30 against rank 0..9: ym = 6.6, slope = 177 / 82.5 = 2.145;
    # residuals 3.055 - 1.145 j (j <= 8) and 30 - 16.25 = 13.75 at j = 9: sigma = 38.95 / 10 = 3.89,
    # 13.75 > 3 * 3.89 -> 30 goes (no low residual exceeds 11.7). Then 0..8 lie on a line:
    # sigma = 0 and nothing more goes.
    values = [5, 30, 0, 8, 1, 7, 2, 6, 3, 4]
    mean, count, rej = _on(backend, _col(values), "linear", kappa_low=3, kappa_high=3)
    assert (mean[0, 0], count[0, 0]) == (4.0, 9)
    assert list(rej) == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]


def test_winsorized_sigma_carries_the_1134_factor(backend):
    # [-1.2, -1, 0, 1, 1.2]: median 0, std (n-1) = sqrt(4.88 / 4) = 1.1045; no value lies beyond
    # 1.5 sigma, so winsorizing changes nothing and sigma_w = 1.134 * 1.1045 = 1.2525.
    # kappa 0.97: bound 1.215 keeps +-1.2 (winsorized) ...
    values = _col([-1.2, -1, 0, 1, 1.2])
    _, count, _ = _on(backend, values, "winsorized", kappa_low=0.97, kappa_high=0.97)
    assert count[0, 0] == 5
    # ... while 1.2 > 0.97 * 1.1045 = 1.071 would drop them without the factor
    _, count, rej = _on(backend, values, "winsorized", kappa_low=0.9, kappa_high=0.9)  # bound 1.127
    assert count[0, 0] == 3 and list(rej) == [1, 0, 0, 0, 1]


def test_winsorized_rejects_an_outlier(backend):
    # [1, 2, 3, 4, 100], kappa 1.5: median 3; winsorizing pulls 100 down to 3 + 1.5 sigma_w
    # and converges near sigma_w = 2.1 (4.6 for the fixed point u = 3 + 1.5 s, s = 1.134 * std1(1..4, u)),
    # so 100 goes; then [1..4]: median 2.5, sigma_w = 1.134 * 1.291 = 1.464, bound 2.5 +- 2.2 keeps all.
    mean, count, rej = _on(backend, _col([1, 2, 3, 4, 100]), "winsorized", kappa_low=1.5, kappa_high=1.5)
    assert (mean[0, 0], count[0, 0], list(rej)) == (2.5, 4, [0, 0, 0, 0, 1])


@pytest.mark.parametrize("method", METHODS)
def test_max_iter_zero_is_the_plain_weighted_mean(rng, method):
    cube = _cube(rng, 9, 5, 4)
    _s, _o, weights = _per_frame(rng, 9)
    kl, kh = KAPPAS[method]
    r = combine(cube, method=method, kappa_low=kl, kappa_high=kh, max_iter=0, weights=weights)
    if method == "median":
        rmean, rcount, _ = _reference("median", cube, kl, kh, 0)
    else:
        rmean, rcount, _ = _reference("percentile", cube, kl, kh, 0, weights=weights)  # keeps every value
    np.testing.assert_allclose(r.mean, rmean, rtol=1e-5)
    np.testing.assert_array_equal(r.count, rcount)
    assert r.rejected.sum() == 0


@pytest.mark.parametrize("method", NEW_METHODS)
def test_normalisation_applies_before_rejection(backend, method):
    # frame f holds (3 + d_f - 0.5 f) / 2 with scale 2 and offset 0.5 f: normalised 3 + d_f
    d = np.array([0.0, 0.1, -0.1, 0.05, -0.05, 0.02, 9.0], np.float32)  # frame 6 an outlier
    n = d.size
    cube = np.stack([np.full((1, 2), (3.0 + d[f] - 0.5 * f) / 2) for f in range(n)]).astype(np.float32)
    kl, kh = {"percentile": (0.5, 0.5), "minmax": (1, 1), "gesd": (0.3, 0.05)}.get(method, (2.0, 2.0))
    mean, count, rej = _on(backend, cube, method, kappa_low=kl, kappa_high=kh,
                           scale=np.full(n, 2, np.float32), offset=np.arange(n, dtype=np.float32) * 0.5)
    assert np.abs(mean - 3.0).max() < 0.05
    if method != "median":
        assert rej[6] == 2  # the outlier went at both pixels


# ----------------------------------------------------------------------------- vs float64 reference


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("n, h, w", [(1, 3, 3), (2, 2, 3), (3, 4, 3), (4, 1, 5), (9, 7, 6), (25, 6, 5)])
def test_agrees_with_float64_reference(backend, rng, method, n, h, w):
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    kl, kh = KAPPAS[method]
    mean, count, rej = _on(backend, cube, method, kappa_low=kl, kappa_high=kh, max_iter=10,
                           scale=scale, offset=offset, weights=weights)
    rmean, rcount, rrej = _reference(method, cube, kl, kh, 10, scale, offset, weights)
    np.testing.assert_array_equal(count, rcount)
    np.testing.assert_array_equal(rej, rrej)
    np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-7)
    if h * w > 1:
        assert np.isnan(mean[0, -1]) and count[0, -1] == 0


def test_reference_cases_do_reject(rng):
    # the comparison above is only meaningful if the methods reject something there
    cube = _cube(rng, 25, 6, 5)
    for method in ("winsorized", "linear", "gesd", "percentile", "minmax"):
        kl, kh = KAPPAS[method]
        assert combine(cube, method=method, kappa_low=kl, kappa_high=kh).rejected.sum() >= 10, method


@pytest.mark.parametrize("method", NEW_METHODS)
def test_ties_without_normalisation_match_reference(rng, method):
    # integer-valued frames: many exact ties, ranked in frame order
    cube = rng.integers(0, 6, size=(12, 5, 6)).astype(np.float32)
    cube[rng.random(cube.shape) < 0.05] = 40.0
    kl, kh = {"percentile": (0.3, 0.3), "minmax": (2, 1), "gesd": (0.3, 0.05)}.get(method, (1.37, 1.37))
    weights = rng.uniform(0.5, 2.0, 12).astype(np.float32)
    r = combine(cube, method=method, kappa_low=kl, kappa_high=kh, weights=weights)
    rmean, rcount, rrej = _reference(method, cube, kl, kh, 10, weights=weights)
    np.testing.assert_array_equal(r.count, rcount)
    np.testing.assert_array_equal(r.rejected, rrej)
    np.testing.assert_allclose(r.mean, rmean, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_result_types_and_input_untouched(rng, method):
    cube = _cube(rng, 5, 4, 3)
    before = cube.copy()
    r = combine(cube, method=method)
    assert (r.mean.dtype, r.count.dtype, r.rejected.dtype) == (np.float32, np.int32, np.int64)
    assert r.mean.shape == (4, 3) and r.count.shape == (4, 3) and r.rejected.shape == (5,)
    np.testing.assert_array_equal(cube, before)


def test_large_tile_is_processed_in_blocks_with_the_same_result(rng, monkeypatch):
    cube = _cube(rng, 7, 13, 11)
    whole = {m: combine(cube, method=m, kappa_low=KAPPAS[m][0], kappa_high=KAPPAS[m][1]) for m in METHODS}
    monkeypatch.setattr(combine_mod, "_CHUNK_VALUES", 7 * 10)  # blocks of 10 pixels, the last one short
    for m in METHODS:
        got = combine(cube, method=m, kappa_low=KAPPAS[m][0], kappa_high=KAPPAS[m][1])
        for f in ("mean", "count", "rejected"):
            np.testing.assert_array_equal(getattr(got, f), getattr(whole[m], f))


def test_bad_input():
    cube = np.zeros((4, 2, 2), np.float32)
    with pytest.raises(SkystackError, match="unknown rejection method 'gesdt'"):
        combine(cube, method="gesdt")
    with pytest.raises(SkystackError, match="kappa"):
        combine(cube, method="percentile", kappa_low=-0.1)
    with pytest.raises(SkystackError, match="kappa"):
        combine(cube, method="minmax", kappa_high=np.inf)
    with pytest.raises(SkystackError, match="max_iter"):
        combine(cube, method="winsorized", max_iter=-1)
    # kappas do not matter to median and mean
    assert combine(cube, method="median", kappa_low=-1).count.sum() == 16
    assert combine(cube, method="mean", kappa_low=-1).count.sum() == 16


def test_winsor_cap_matches_the_kernel_define():
    m = re.search(r"#define\s+WINSOR_MAX_ITER\s+(\d+)", read_source("combine.cu"))
    assert m and int(m.group(1)) == WINSOR_MAX_ITER


def test_registry_is_one_module_per_method():
    # engine/rejection: each module in MODULES declares METHOD, whose kernel exists in combine.cu
    # with the combine signature (plus the host tables the method declares before the kappas)
    from importlib import import_module

    from skystack.engine.rejection import MODULES, REGISTRY
    from skystack.kernels import kernel_params

    assert tuple(REGISTRY) == METHODS
    declared = [import_module(f"skystack.engine.rejection.{m}").METHOD for m in MODULES]
    assert [m.name for m in declared] == list(METHODS)
    common = ["cube", "npix", "nframes", "scale", "offset", "weights"]
    tail = ["kappa_low", "kappa_high", "max_iter", "mean_out", "count_out", "rejected"]
    for m in declared:
        assert REGISTRY[m.name] is m and callable(m.twin)
        names = [p.name for p in kernel_params("combine.cu", m.kernel)]
        n_tables = len(m.tables(5, m.kappas[1])) if m.tables is not None else 0
        assert names[:6] == common and names[6 + n_tables:] == tail, (m.name, names)


# ----------------------------------------------------------------------------- statistics


REJECTING = {"sigma": (3.0, 3.0), "winsorized": (3.0, 3.0), "linear": (3.0, 3.0), "gesd": (0.3, 0.05),
             "percentile": (0.3, 0.3), "minmax": (1.0, 1.0), "median": (3.0, 3.0)}


def test_satellite_trail_is_removed_by_every_rejecting_method(backend):
    rng = np.random.default_rng(2024)
    n, size, level = 30, 32, 10.0  # percentile 0.3 of the median 10 is +-3 sigma
    cube = rng.normal(level, 1.0, size=(n, size, size)).astype(np.float32)
    ys = np.arange(size)
    xs = (ys * 3 // 4 + 4) % size
    cube[7, ys, xs] += np.float32(50.0)  # a +50 sigma trail across frame 7
    tol = 4.0 / np.sqrt(n)
    for method, (kl, kh) in REJECTING.items():
        mean, count, rej = _on(backend, cube, method, kappa_low=kl, kappa_high=kh)
        err = np.abs(mean[ys, xs] - level)
        assert err.max() < tol, (method, err.max())
        if method != "median":
            assert rej[7] >= size and (count[ys, xs] <= n - 1).all(), method
    mean, count, rej = _on(backend, cube, "mean")
    # kept, the trail lifts the mean by 50 / 30 = 1.67
    assert np.abs(mean[ys, xs] - level).min() > 1.0 and rej.sum() == 0


NOISE_GAIN_FLOOR = {"mean": 0.95, "sigma": 0.9, "winsorized": 0.9}


@pytest.fixture(scope="module")
def gaussian_stack():
    rng = np.random.default_rng(77)
    return rng.normal(10.0, 1.0, size=(20, 200, 200)).astype(np.float32)


@pytest.mark.parametrize("method", ["mean", "sigma", "winsorized", "median"])
def test_noise_gain_on_gaussian_noise(gaussian_stack, method):
    n = gaussian_stack.shape[0]
    r = combine(gaussian_stack, method=method, kappa_low=3.0, kappa_high=3.0)
    gain = float(gaussian_stack[0].std() / r.mean.std()) / np.sqrt(n)
    if method == "median":
        # the median of 20 Gaussian values has ~1.45x the variance of their mean (2/pi -> 0.69 efficiency):
        # gain ~ 0.83 sqrt(N); a mean would give 1.0, a single frame 0.22
        assert 0.75 < gain < 0.9, gain
    else:
        assert gain >= NOISE_GAIN_FLOOR[method], gain


@pytest.mark.parametrize("method, floor", [("linear", 0.93), ("minmax", 0.95), ("gesd", 0.95)])
def test_default_kappas_keep_the_noise_gain(gaussian_stack, method, floor):
    # minmax drops 2 of 20 values (the mean of the central 18 is nearly efficient);
    # linear fit at its default kappa 4 rejects ~1.4% of pure noise, gain ~0.95 (at kappa 3:
    # ~4.5%, gain 0.90; at kappa 5 it cannot reject a lone outlier among 13 frames, see test_stack)
    assert set(DEFAULT_KAPPAS) == set(METHODS)
    n = gaussian_stack.shape[0]
    kl, kh = DEFAULT_KAPPAS[method]
    r = combine(gaussian_stack, method=method, kappa_low=kl, kappa_high=kh)
    gain = float(gaussian_stack[0].std() / r.mean.std()) / np.sqrt(n)
    assert gain >= floor, gain
    assert r.rejected.sum() / gaussian_stack.size < (0.11 if method == "minmax" else 0.02)


# ----------------------------------------------------------------------------- kernels vs twins


def _launch(mod, method, n_items, args, **kw):
    # every kernel name spelled out, so the coverage rule sees an emulation test for each
    if method == "winsorized":
        mod.launch("winsorized_clip_mean", n_items, args, **kw)
    elif method == "linear":
        mod.launch("linear_fit_clip_mean", n_items, args, **kw)
    elif method == "percentile":
        mod.launch("percentile_clip_mean", n_items, args, **kw)
    elif method == "minmax":
        mod.launch("minmax_clip_mean", n_items, args, **kw)
    elif method == "median":
        mod.launch("median_combine", n_items, args, **kw)
    elif method == "gesd":  # the critical values follow the weights
        lam = gesd_critical_values(int(args[2]), float(args[7]))
        mod.launch("gesd_clip_mean", n_items, (*args[:6], lam, *args[6:]), **kw)
    else:
        raise ValueError(method)


_TWIN = {"winsorized": _winsorized_clip_mean_numpy, "linear": _linear_fit_clip_mean_numpy,
         "percentile": _percentile_clip_mean_numpy, "minmax": _minmax_clip_mean_numpy,
         "median": _median_combine_numpy, "gesd": _gesd_clip_mean_numpy}


def _kernel_run(mod, method, cube, scale, offset, weights, kl, kh, max_iter, *, block=64, reverse=False):
    n, h, w = cube.shape
    mean = np.full((h, w), -7.0, np.float32)
    count = np.full((h, w), -7, np.int32)
    rejected = np.zeros(n, np.uint64)
    _launch(mod, method, h * w,
            (cube, np.int64(h * w), np.int32(n), scale, offset, weights, np.float32(kl), np.float32(kh),
             np.int32(max_iter), mean, count, rejected), block=block, reverse=reverse)
    return mean, count, rejected.astype(np.int64)


EMU_CASES = [(1, 1, 1), (1, 4, 5), (2, 3, 3), (3, 1, 9), (4, 9, 1), (5, 13, 17), (20, 16, 15),
             (64, 6, 7), (65, 5, 3)]


@needs_gxx
@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("n, h, w", EMU_CASES)
def test_emulated_kernel_equals_twin(rng, method, n, h, w):
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    kl, kh = KAPPAS[method]
    mod = emulated("combine.cu", max_frames_define(n))
    got = _kernel_run(mod, method, cube, scale, offset, weights, kl, kh, 10)
    twin = _TWIN[method](cube, np.float32(kl), np.float32(kh), 10, scale, offset, weights)
    np.testing.assert_array_equal(got[1], twin.count)
    np.testing.assert_array_equal(got[2], twin.rejected)
    # same float32 operations in the same order: bit-identical (NaN where no data)
    np.testing.assert_array_equal(got[0], twin.mean)


@needs_gxx
@pytest.mark.parametrize("method", NEW_METHODS)
def test_emulated_kernel_equals_twin_on_300_frames(rng, method):
    """Late rounds leave one or two active pixels: the twin's (N, 1) and F-ordered sums must run in frame order.

    (NumPy sums such arrays pairwise; the linear fit then kept one value more than the kernel.)
    """
    n, h, w = 300, 33, 31
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    kl, kh = KAPPAS[method]
    got = _kernel_run(emulated("combine.cu", max_frames_define(n)), method, cube, scale, offset, weights,
                      kl, kh, 10)
    twin = _TWIN[method](cube, np.float32(kl), np.float32(kh), 10, scale, offset, weights)
    for a, b in zip(got, (twin.mean, twin.count, twin.rejected)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cols, order", [(1, "C"), (1, "F"), (2, "F"), (7, "F"), (5, "C")])
def test_twin_sums_run_in_row_order(rng, cols, order):
    """``_seqsum`` adds row after row from +0 on every layout, like the kernels' loops."""
    from skystack.engine.rejection.base import _seqsum

    x = np.array(rng.normal(size=(300, cols)) * 10.0 ** rng.uniform(-3, 3, size=(300, 1)), np.float32,
                 order=order)
    expect = np.zeros(cols, np.float32)
    for row in x:
        expect = expect + row
    np.testing.assert_array_equal(_seqsum(x), expect)


@needs_gxx
@pytest.mark.parametrize("method", NEW_METHODS)
def test_emulated_kernel_equals_twin_on_ties(rng, method):
    cube = rng.integers(0, 5, size=(15, 8, 9)).astype(np.float32)
    cube[rng.random(cube.shape) < 0.05] = np.nan
    ones = np.ones(15, np.float32)
    weights = rng.uniform(0.5, 2.0, 15).astype(np.float32)
    kl, kh = {"percentile": (0.3, 0.3), "minmax": (2, 3), "gesd": (0.3, 0.05)}.get(method, (1.5, 1.5))
    got = _kernel_run(emulated("combine.cu", max_frames_define(15)), method, cube, ones, ones * 0, weights,
                      kl, kh, 10)
    twin = _TWIN[method](cube, np.float32(kl), np.float32(kh), 10, ones, ones * 0, weights)
    for a, b in zip(got, (twin.mean, twin.count, twin.rejected)):
        np.testing.assert_array_equal(a, b)
    if method != "median":
        assert twin.rejected.sum() > 0


@needs_gxx
@pytest.mark.parametrize("method", NEW_METHODS)
def test_emulated_kernel_order_independent(rng, method):
    n, h, w = 30, 12, 11
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    kl, kh = KAPPAS[method]
    mod = emulated("combine.cu", max_frames_define(n))
    fwd = _kernel_run(mod, method, cube, scale, offset, weights, kl, kh, 5, block=256)
    rev = _kernel_run(mod, method, cube, scale, offset, weights, kl, kh, 5, block=32, reverse=True)
    for a, b in zip(fwd, rev):
        np.testing.assert_array_equal(a, b)


@needs_gxx
@pytest.mark.parametrize("method", NEW_METHODS)
def test_emulated_kernel_refuses_too_many_frames(rng, method):
    cube = _cube(rng, 65, 2, 2)
    ones = np.ones(65, np.float32)
    mean, count, _ = _kernel_run(emulated("combine.cu", ("MAX_FRAMES=64",)), method, cube, ones, ones * 0,
                                 ones, *KAPPAS[method], 10)
    assert (count == -1).all() and np.isnan(mean).all()


@needs_gxx
@pytest.mark.parametrize("method", METHODS)
def test_operation_device_branch_in_emulator(monkeypatch, rng, method):
    n = 70  # picks the MAX_FRAMES=256 build
    cube = _cube(rng, n, 9, 8)
    scale, offset, weights = _per_frame(rng, n)
    kl, kh = KAPPAS[method]
    kw = dict(method=method, kappa_low=kl, kappa_high=kh, scale=scale, offset=offset, weights=weights)
    expect = combine(cube, **kw)
    use_emulator(monkeypatch, combine_mod)
    got = combine(cube, **kw)
    assert got.rejected.dtype == np.int64
    for f in ("mean", "count", "rejected"):
        np.testing.assert_array_equal(getattr(got, f), getattr(expect, f))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("n, h, w", EMU_CASES + [(300, 33, 31)])
def test_gpu_kernel_equals_twin(rng, method, n, h, w):
    be = get_backend("gpu")
    cube = _cube(rng, n, h, w)
    scale, offset, weights = _per_frame(rng, n)
    kl, kh = KAPPAS[method]
    kw = dict(method=method, kappa_low=kl, kappa_high=kh)
    twin = combine(cube, scale=scale, offset=offset, weights=weights, **kw)
    r = combine(be.asarray(cube), scale=be.asarray(scale), offset=be.asarray(offset),
                weights=be.asarray(weights), **kw)
    np.testing.assert_array_equal(to_host(r.count), twin.count)
    np.testing.assert_array_equal(to_host(r.rejected), twin.rejected)
    np.testing.assert_allclose(to_host(r.mean), twin.mean, rtol=1e-5, equal_nan=True)


@needs_gxx
@pytest.mark.parametrize("method", ["minmax", "linear", "gesd", "sigma"])
@pytest.mark.parametrize("n", [30, 48, 49])
def test_emulated_kernel_ranks_signed_zeros_and_ties_in_frame_order(rng, method, n):
    """Up to 48 frames the kernels rank by counting (above: a heapsort); +0 and -0 tie, and equal
    values keep frame order on both paths, as the twin's stable key sort: the frames that lose
    a tied value (per-frame rejections) and the results are the twin's."""
    cube = rng.choice(np.array([-0.0, 0.0, 1.0, -1.0, 2.0], np.float32), size=(n, 7, 9))
    cube[rng.random(cube.shape) < 0.05] = np.nan
    cube[:, 0, :3] = np.float32(7.0)  # all equal
    ones = np.ones(n, np.float32)
    weights = rng.uniform(0.5, 2.0, n).astype(np.float32)
    kl, kh = {"minmax": (2, 3), "gesd": (0.3, 0.05)}.get(method, (1.5, 1.5))
    mod = emulated("combine.cu", max_frames_define(n))
    if method == "sigma":
        mean = np.empty((7, 9), np.float32)
        count = np.empty((7, 9), np.int32)
        rej = np.zeros(n, np.uint64)
        mod.launch("sigma_clip_mean", 63, (cube, np.int64(63), np.int32(n), ones, ones * 0, weights,
                                           np.float32(kl), np.float32(kh), np.int32(10), mean, count, rej))
        got = (mean, count, rej.astype(np.int64))
        twin = _sigma_clip_mean_numpy(cube, np.float32(kl), np.float32(kh), 10, ones, ones * 0, weights)
    else:
        got = _kernel_run(mod, method, cube, ones, ones * 0, weights, kl, kh, 10)
        twin = _TWIN[method](cube, np.float32(kl), np.float32(kh), 10, ones, ones * 0, weights)
    for a, b in zip(got, (twin.mean, twin.count, twin.rejected)):
        np.testing.assert_array_equal(a, b)
    if method in ("minmax", "linear"):
        assert twin.rejected.sum() > 0


def test_gesd_critical_values_are_student_t_without_importing_scipy_stats():
    """Student's t quantiles from scipy.special (scipy.stats costs ~0.9 s to import, in the combine's time)."""
    import io
    import subprocess
    import sys

    from scipy import stats

    code = ("import sys, numpy as np\n"
            "from skystack.engine.combine import gesd_critical_values\n"
            "lam = gesd_critical_values(300, 0.01)\n"
            "assert 'scipy.stats' not in sys.modules\n"
            "np.save(sys.stdout.buffer, lam)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    lam = np.load(io.BytesIO(out))
    m = np.arange(3, 301, dtype=np.float64)
    t = stats.t.ppf(1.0 - 0.01 / (2.0 * m), m - 2.0)
    np.testing.assert_array_equal(lam[3:], ((m - 1.0) * t / np.sqrt((m - 2.0 + t * t) * m)).astype(np.float32))
    assert np.isinf(lam[:3]).all()
