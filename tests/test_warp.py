"""Warping into the reference grid: accuracy, flux, no-data rules, and the CUDA kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from skystack.engine import warp as warp_mod
from skystack.engine.warp import _lanczos3_weights, _warp_exact, _warp_numpy, inverse_coeffs, warp

H, W = 96, 128


def similarity_about(theta_deg, scale, shift, src_shape, dst_shape):
    """Rotate/scale about the source centre, put it at the destination centre, then shift."""
    hs, ws = src_shape
    hd, wd = dst_shape
    c, s = math.cos(math.radians(theta_deg)) * scale, math.sin(math.radians(theta_deg)) * scale
    a = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    t_in = np.array([[1, 0, -(ws - 1) / 2], [0, 1, -(hs - 1) / 2], [0, 0, 1.0]])
    t_out = np.array([[1, 0, (wd - 1) / 2 + shift[0]], [0, 1, (hd - 1) / 2 + shift[1]], [0, 0, 1.0]])
    return t_out @ a @ t_in


def band_limited(rng, shape=(H, W), n=40, sigma=(2.0, 4.0), pedestal=1.0, margin=0):
    """Sum of Gaussian blobs (sigma >= 2 px: well sampled) on a pedestal, float64."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.full(shape, pedestal)
    for _ in range(n):
        x0, y0 = rng.uniform(margin, w - 1 - margin), rng.uniform(margin, h - 1 - margin)
        s, a = rng.uniform(*sigma), rng.uniform(0.5, 2.0)
        img += a * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))
    return img


def _host(backend, a):
    return backend.to_host(a)


def _reference_warp(src, t, out_shape, method):
    """Straightforward float64 per-pixel implementation of the documented rules."""
    c_n, hs, ws = src.shape
    ho, wo = out_shape
    inv = np.linalg.inv(t)
    out = np.full((c_n, ho, wo), np.nan)

    def lanczos(x):
        if x == 0:
            return 1.0
        if abs(x) >= 3:
            return 0.0
        return 3 * math.sin(math.pi * x) * math.sin(math.pi * x / 3) / (math.pi * x) ** 2

    for y in range(ho):
        for x in range(wo):
            q = inv @ np.array([x, y, 1.0])
            u, v = q[0] / q[2], q[1] / q[2]
            nu, nv = math.floor(u + 0.5), math.floor(v + 0.5)
            if not (0 <= nu < ws and 0 <= nv < hs):
                continue
            iu, iv = math.floor(u), math.floor(v)
            if method == "lanczos3":
                taps = range(-2, 4)
                wx = [lanczos(u - (iu + k)) for k in taps]
                wy = [lanczos(v - (iv + k)) for k in taps]
            else:
                taps = range(0, 2)
                wx = [1 - (u - iu), u - iu]
                wy = [1 - (v - iv), v - iv]
            for c in range(c_n):
                if np.isnan(src[c, nv, nu]):
                    continue
                acc = wsum = 0.0
                for j, dy in enumerate(taps):
                    for k, dx in enumerate(taps):
                        yy, xx = iv + dy, iu + dx
                        if 0 <= yy < hs and 0 <= xx < ws and not np.isnan(src[c, yy, xx]):
                            acc += wy[j] * wx[k] * src[c, yy, xx]
                            wsum += wy[j] * wx[k]
                out[c, y, x] = acc / wsum
    return out


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("theta,shift", [(23.7, (0.31, -0.42)), (69.4, (2.5, 1.25)), (180.0, (0.5, 0.5)),
                                         (-45.0, (-1.7, 0.9))])
def test_lanczos_round_trip_under_one_percent(backend, rng, theta, shift):
    img = band_limited(rng).astype(np.float32)
    t = similarity_about(theta, 1.0, shift, (H, W), (H, W))
    fwd = warp(backend.asarray(img), t, (H, W))
    back = _host(backend, warp(fwd, np.linalg.inv(t), (H, W)))
    core = np.zeros((H, W), bool)
    core[16:-16, 16:-16] = True
    m = core & np.isfinite(back)
    assert m.sum() > 0.3 * core.sum()
    rms = np.sqrt(np.mean((back[m] - img[m]) ** 2)) / np.sqrt(np.mean(img[m] ** 2))
    assert rms < 0.01, rms
    # relative to the image's structure (not the pedestal) it is still small
    assert np.sqrt(np.mean((back[m] - img[m]) ** 2)) / np.std(img[m]) < 0.02
    # Lanczos-3 is the better interpolator: bilinear loses more on the same trip
    fb = warp(backend.asarray(img), t, (H, W), method="bilinear")
    bb = _host(backend, warp(fb, np.linalg.inv(t), (H, W), method="bilinear"))
    mb = m & np.isfinite(bb)
    assert np.sqrt(np.mean((bb[mb] - img[mb]) ** 2)) > 2 * np.sqrt(np.mean((back[mb] - img[mb]) ** 2))


@pytest.mark.parametrize("method", ["lanczos3", "bilinear"])
@pytest.mark.parametrize("theta", [17.0, 69.4, 180.0])
def test_total_flux_preserved(backend, rng, method, theta):
    src = (band_limited(rng, n=25, pedestal=0.0, margin=15)).astype(np.float32)
    out_shape = (H + 60, W + 60)  # every source pixel lands inside the output
    t = similarity_about(theta, 1.0, (0.37, -0.21), (H, W), out_shape)
    out = _host(backend, warp(backend.asarray(src), t, out_shape, method=method))
    ratio = np.nansum(out, dtype=np.float64) / src.sum(dtype=np.float64)
    assert abs(ratio - 1) < 0.005, ratio


def test_twin_matches_float64_reference(rng):
    src = rng.normal(size=(2, 17, 23)).astype(np.float32)
    src[0, 4, 5] = np.nan
    src[1, 10, 0] = np.nan
    t = similarity_about(31.0, 1.07, (0.3, -0.6), (17, 23), (19, 21))
    t = t @ np.array([[1, 0, 0], [0, 1, 0], [3e-4, -2e-4, 1.0]])  # a little perspective
    for method in ("lanczos3", "bilinear"):
        got = warp(src, t, (19, 21), method=method)
        ref = _reference_warp(src.astype(np.float64), t, (19, 21), method)
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=1e-4, atol=1e-4)


def test_identity_and_integer_shift(backend, rng):
    img = rng.normal(size=(H, W)).astype(np.float32)
    same = _host(backend, warp(backend.asarray(img), np.eye(3), (H, W)))
    np.testing.assert_allclose(same, img, rtol=1e-5, atol=1e-5)
    t = np.array([[1, 0, 5.0], [0, 1, -3.0], [0, 0, 1.0]])
    for method in ("lanczos3", "bilinear"):
        out = _host(backend, warp(backend.asarray(img), t, (H, W), method=method))
        np.testing.assert_allclose(out[0:H - 3, 5:], img[3:, :W - 5], rtol=1e-5, atol=1e-5)
        assert np.all(np.isnan(out[:, :5])) and np.all(np.isnan(out[H - 3:, :]))


def test_flat_field_stays_flat_to_the_edges(backend):
    img = np.full((H, W), 0.7, np.float32)
    t = similarity_about(33.0, 1.0, (3.3, -2.1), (H, W), (H, W))
    for method in ("lanczos3", "bilinear"):
        out = _host(backend, warp(backend.asarray(img), t, (H, W), method=method))
        fin = np.isfinite(out)
        assert 0.4 < fin.mean() < 0.95
        np.testing.assert_allclose(out[fin], 0.7, rtol=2e-6)


# --------------------------------------------------------------------------- no-data rules


def test_outside_the_frame_is_nan_never_zero(backend, rng):
    img = (rng.uniform(0.5, 1.0, (H, W))).astype(np.float32)
    t = similarity_about(40.0, 1.0, (20.0, 10.0), (H, W), (H, W))
    out = _host(backend, warp(backend.asarray(img), t, (H, W)))
    yy, xx = np.mgrid[0:H, 0:W]
    inv = np.linalg.inv(t)
    u = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    v = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    footprint = (u >= -0.5) & (u < W - 0.5) & (v >= -0.5) & (v < H - 0.5)
    # pixels clearly inside / outside the footprint (float32 rounding decides the rim)
    well_in = (u >= -0.49) & (u < W - 0.51) & (v >= -0.49) & (v < H - 0.51)
    well_out = ~((u >= -0.51) & (u < W - 0.49) & (v >= -0.51) & (v < H - 0.49))
    assert np.all(np.isfinite(out[well_in]))
    assert np.all(np.isnan(out[well_out]))
    assert well_out.sum() > 1000 and footprint.sum() > 1000
    assert not np.any(out[np.isfinite(out)] == 0.0)


def test_nan_pixels_do_not_spread(backend, rng):
    img = rng.uniform(0.5, 1.0, (H, W)).astype(np.float32)
    img[40, 60] = np.nan
    t = np.array([[1, 0, 0.25], [0, 1, 0.25], [0, 0, 1.0]])  # quarter-pixel shift
    out = _host(backend, warp(backend.asarray(img), t, (H, W)))
    # nearest source pixel of output (x, y) is (x, y) here: only (60, 40) is no-data
    assert np.argwhere(np.isnan(out)).tolist() == [[40, 60]]
    # neighbours renormalise over their remaining taps: still close to the smooth truth
    assert np.isfinite(out[40, 61]) and np.isfinite(out[41, 60])


def test_colour_planes_and_out_argument(backend, rng):
    img = np.stack([band_limited(rng) * k for k in (0.5, 1.0, 2.0)]).astype(np.float32)
    t = similarity_about(12.0, 1.02, (1.3, 0.4), (H, W), (80, 100))
    out = backend.xp.full((3, 80, 100), -1.0, dtype=backend.xp.float32)
    ret = warp(backend.asarray(img), t, (80, 100), out=out)
    assert ret is out
    got = _host(backend, out)
    for c in range(3):
        one = _host(backend, warp(backend.asarray(img[c]), t, (80, 100)))
        np.testing.assert_array_equal(np.isnan(got[c]), np.isnan(one))
        np.testing.assert_allclose(got[c][np.isfinite(one)], one[np.isfinite(one)], rtol=1e-6)
    with pytest.raises(ValueError):
        warp(backend.asarray(img), t, (80, 100), out=backend.xp.zeros((3, 80, 99), dtype=backend.xp.float32))
    with pytest.raises(ValueError, match="unknown interpolation"):
        warp(backend.asarray(img), t, (80, 100), method="cubic")


def test_bad_transform_is_rejected():
    with pytest.raises(ValueError):
        warp(np.zeros((4, 4), np.float32), np.full((3, 3), np.nan), (4, 4))


# --------------------------------------------------------------------------- the twin's two paths


def _lanczos_ref(t):
    t = np.asarray(t, dtype=np.float64)
    pt = np.pi * t
    with np.errstate(invalid="ignore", divide="ignore"):
        w = 3 * np.sin(pt) * np.sin(pt / 3) / (pt * pt)
    return np.where(t == 0, 1.0, np.where(np.abs(t) >= 3, 0.0, w))


def test_lanczos3_weights_are_scaled_lanczos3():
    """The closed form equals Lanczos-3 up to a factor common to the six taps (it cancels)."""
    # positions u with fractional parts 0, tiny, generic, and just below 1 (where f = u - floor(u)
    # rounds to 1 for u = -1e-9 and -2**-30; g = (floor(u) + 1) - u stays exact)
    u = np.concatenate([[0.0, 1e-7, 2.0 ** -20, 0.25, 0.5, 0.75, 1 - 2.0 ** -20, 1 - 2.0 ** -24,
                         -1e-9, -2.0 ** -30, -3.0 - 2.0 ** -22, 1234.0 - 2.0 ** -13],
                        np.linspace(0, 1, 1001)[1:-1], np.linspace(-700, 900, 997)]).astype(np.float32)
    fl = np.floor(u)
    f, g = u - fl, (fl + np.float32(1)) - u
    w = np.empty((6, f.size), np.float32)
    _lanczos3_weights(f, g, list(w))
    assert np.all(np.isfinite(w))
    t = u.astype(np.float64)[None, :] - (fl.astype(np.float64)[None, :] - 2 + np.arange(6)[:, None])
    ref = _lanczos_ref(t)
    got = w.astype(np.float64)
    # normalised weights (what the warp uses): float32 accuracy, measured max 7e-8
    np.testing.assert_allclose(got / got.sum(0), ref / ref.sum(0), rtol=0, atol=1e-6)
    # at f = 0 exactly one tap: weight 1 on the sample itself, 0 elsewhere
    np.testing.assert_array_equal(w[:, 0], [0, 0, 1, 0, 0, 0])


@pytest.mark.parametrize("method", ["lanczos3", "bilinear"])
@pytest.mark.parametrize("nan", [False, True])
def test_fast_path_equals_per_tap_rules(rng, monkeypatch, method, nan):
    """The twin's fast path (CSR products) gives bit for bit the straightforward per-tap rules."""
    c, hs, ws, ho, wo = 3, 57, 75, 61, 70
    src = rng.normal(size=(c, hs, ws)).astype(np.float32)
    if nan:
        src.reshape(-1)[rng.choice(src.size, 40, replace=False)] = np.nan
        src[1, 30, 30] = np.inf
    for theta, scale in ((3.0, 1.0), (69.4, 1.1), (-140.0, 0.9)):
        t = similarity_about(theta, scale, (1.3, -0.7), (hs, ws), (ho, wo))
        m = inverse_coeffs(t)
        ref = _warp_exact(src.reshape(c, -1), hs, ws, tuple(np.float32(v) for v in m), method,
                          np.tile(np.arange(wo, dtype=np.float32), ho),
                          np.repeat(np.arange(ho, dtype=np.float32), wo), range(c)).reshape(c, ho, wo)
        assert np.isfinite(ref).mean() > 0.4
        for chunk, tile_w in ((1 << 15, 256), (150, 256), (150, 16)):  # one band; bands; tiles
            monkeypatch.setattr(warp_mod, "_TILE_W", tile_w)
            got = np.empty_like(ref)
            _warp_numpy(src, m, got, method, chunk_pixels=chunk)
            np.testing.assert_array_equal(got, ref)
        monkeypatch.setattr(warp_mod, "_csr_matvec", None)  # SciPy's public sparse product
        got = np.empty_like(ref)
        _warp_numpy(src, m, got, method)
        np.testing.assert_array_equal(got, ref)
        monkeypatch.undo()


# --------------------------------------------------------------------------- kernels


def _kernel_args(src, dst, m, lens=None):
    c, hs, ws = src.shape
    n = dst.shape[1] * dst.shape[2]
    return n, (src, dst, np.int64(n), np.int32(c), np.int32(hs), np.int32(ws), np.int32(dst.shape[2]),
               *[np.float32(v) for v in m], *(lens or (np.float32(0.0),) * 7))


def _emulated_warp(mod, kernel, src, m, out_hw, lens=None):
    """The emulated ``kernel``'s ``(C, *out_hw)`` output, every pixel of it written."""
    dst = np.full((src.shape[0],) + tuple(out_hw), -7.0, np.float32)
    n, args = _kernel_args(src, dst, m, lens)
    if kernel == "warp_lanczos3":  # by name: tests/test_kernels_emulate.py looks for each kernel's launch
        mod.launch("warp_lanczos3", n, args)
    else:
        mod.launch("warp_bilinear", n, args)
    assert not np.any(dst == -7.0)
    return dst


def _twin_warp(monkeypatch, src, m, method, out_hw, chunk, tile_w, lens=None):
    """The twin's ``(C, *out_hw)`` output in bands of ``chunk`` pixels and tiles ``tile_w`` wide
    (pixels it does not write keep -7)."""
    monkeypatch.setattr(warp_mod, "_TILE_W", tile_w)
    twin = np.full((src.shape[0],) + tuple(out_hw), -7.0, np.float32)
    _warp_numpy(src, m, twin, method, chunk_pixels=chunk, lens=lens)
    return twin


def _random_case(rng, c, hs, ws, ho, wo):
    src = rng.normal(size=(c, hs, ws)).astype(np.float32)
    if hs * ws > 4:
        flat = src.reshape(-1)
        flat[rng.choice(flat.size, max(1, flat.size // 20), replace=False)] = np.nan
        flat[rng.choice(flat.size, 1)] = np.inf
    t = similarity_about(rng.uniform(-180, 180), rng.uniform(0.8, 1.25), rng.uniform(-3, 3, 2),
                         (hs, ws), (ho, wo))
    if rng.uniform() < 0.5:
        t = t @ np.array([[1, 0, 0], [0, 1, 0], [rng.normal(0, 1e-3), rng.normal(0, 1e-3), 1.0]])
    return src, t


CASES = [(1, 33, 47, 29, 51), (3, 20, 20, 25, 18), (1, 1, 9, 3, 12), (2, 7, 1, 9, 3), (1, 1, 1, 4, 4),
         (1, 64, 80, 64, 80), (3, 71, 93, 66, 87)]


@pytest.mark.parametrize("kernel,method", [("warp_lanczos3", "lanczos3"), ("warp_bilinear", "bilinear")])
def test_emulated_kernels_match_twin(rng, monkeypatch, kernel, method):
    from skystack.kernels.emulate import emulated, emulator_available

    if not emulator_available():
        pytest.skip("g++ is not on PATH")
    mod = emulated("warp.cu")
    for i, (c, hs, ws, ho, wo) in enumerate(CASES):
        src, t = _random_case(rng, c, hs, ws, ho, wo)
        if i % 2:  # a frame without NaN takes the twin's other branch
            src = np.where(np.isnan(src), np.float32(0.25), src)
        m = inverse_coeffs(t)
        dst = _emulated_warp(mod, kernel, src, m, (ho, wo))
        fin = np.isfinite(dst)
        for chunk, tile_w in ((1 << 15, 256), (7, 256), (40, 8)):  # one band; rows; tiles (if rotated)
            twin = _twin_warp(monkeypatch, src, m, method, (ho, wo), chunk, tile_w)
            assert not np.any(twin == -7.0)
            np.testing.assert_array_equal(np.isnan(dst), np.isnan(twin))
            np.testing.assert_array_equal(np.isfinite(twin), fin)  # inf / NaN in the same places
            # the same float32 operations in the same order, no transcendental function: bit for bit
            np.testing.assert_array_equal(dst[fin], twin[fin])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lanczos3", "bilinear"])
def test_gpu_kernels_match_twin(rng, method):
    import cupy as cp

    for c, hs, ws, ho, wo in CASES:
        src, t = _random_case(rng, c, hs, ws, ho, wo)
        img = src if c > 1 else src[0]
        twin = warp(img, t, (ho, wo), method=method)
        gpu = warp(cp.asarray(img), t, (ho, wo), method=method).get()
        np.testing.assert_array_equal(np.isnan(gpu), np.isnan(twin))
        fin = np.isfinite(twin)
        np.testing.assert_array_equal(np.isfinite(gpu), fin)
        # the same operations (no sinf, no FMA with --fmad=false); the GPU flushes subnormals to zero
        np.testing.assert_allclose(gpu[fin], twin[fin], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- radial lens


LENS_CASES = [(-0.06, 0.01, (0.0, 0.0)), (0.03, 0.0, (7.0, -3.0)), (-0.02, -0.01, (-11.0, 5.0))]


@pytest.mark.parametrize("kernel,method", [("warp_lanczos3", "lanczos3"), ("warp_bilinear", "bilinear")])
def test_emulated_lens_kernels_match_twin(rng, monkeypatch, kernel, method):
    """With a lens (undistort the output pixel, homography, distort) kernel and twin agree bit for bit."""
    from skystack.engine.lens import RadialLens
    from skystack.kernels.emulate import emulated, emulator_available

    if not emulator_available():
        pytest.skip("g++ is not on PATH")
    mod = emulated("warp.cu")
    for i, (c, hs, ws, ho, wo) in enumerate(CASES):
        k1, k2, off = LENS_CASES[i % len(LENS_CASES)]
        src, t = _random_case(rng, c, hs, ws, ho, wo)
        lp = RadialLens.for_shape((hs, ws), k1=k1, k2=k2).kernel_params(off)
        m = inverse_coeffs(t)
        dst = _emulated_warp(mod, kernel, src, m, (ho, wo), lp)
        fin = np.isfinite(dst)
        for chunk, tile_w in ((1 << 15, 256), (40, 8)):
            twin = _twin_warp(monkeypatch, src, m, method, (ho, wo), chunk, tile_w, lp)
            np.testing.assert_array_equal(np.isfinite(twin), fin)
            np.testing.assert_array_equal(dst[fin], twin[fin])


def test_lens_warp_follows_the_exact_mapping():
    """A frame rendered through a distorted homography comes back onto the reference's recorded grid.

    The reference truth is a smooth (band-limited) scene sampled in float64 at
    ``distort(H undistort(p))``; the warp must reproduce the reference's own
    recorded image to well within 1 % RMS (and where it has data).
    """
    from skystack.engine.lens import RadialLens

    h, w = 120, 160
    lens = RadialLens.for_shape((h, w), k1=-0.08, k2=0.01)
    ang = np.radians(4.0)
    hmat = np.array([[np.cos(ang), -np.sin(ang), 6.0], [np.sin(ang), np.cos(ang), -4.0], [2e-5, -1e-5, 1.0]])

    def scene(xy):  # ideal reference coordinates -> brightness (smooth)
        x, y = xy[:, 0], xy[:, 1]
        return 1.0 + 0.3 * np.sin(x / 9.0) * np.cos(y / 11.0) + 0.2 * np.exp(-((x - 70) ** 2 + (y - 50) ** 2) / 200.0)

    yy, xx = np.mgrid[0:h, 0:w]
    grid = np.column_stack([xx.ravel(), yy.ravel()]).astype(np.float64)
    # the frame: its recorded pixel p shows the ideal reference point H undistort(p)
    from skystack.engine.match import transform_points

    frame = scene(transform_points(hmat, lens.undistort(grid))).reshape(h, w).astype(np.float32)
    ref = scene(lens.undistort(grid)).reshape(h, w)
    out = warp(frame, hmat, (h, w), lens=lens)
    ok = np.isfinite(out)
    inner = np.zeros_like(ok)
    inner[8:-8, 8:-8] = True
    sel = ok & inner
    assert sel.mean() > 0.6
    rms = np.sqrt(np.mean((out[sel] - ref[sel]) ** 2)) / np.mean(ref[sel])
    assert rms < 0.01, rms
    # without the lens the same warp is clearly wrong (the test can fail)
    bad = warp(frame, hmat, (h, w))
    okb = np.isfinite(bad) & inner
    assert np.sqrt(np.mean((bad[okb] - ref[okb]) ** 2)) / np.mean(ref[okb]) > 3 * rms
