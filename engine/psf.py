"""The PSF model fit of a sample of stars: the ``psf_fit`` kernel and its twin.

An elliptical Moffat (or Gaussian) with a free amplitude and sky per Bayer site,
fitted by Levenberg-Marquardt with variable projection (:func:`fit_psf`). On a
device frame the kernel of ``kernels/psf.cu`` runs there and only seven numbers
per star come down; on the host its native build or the NumPy twin
:func:`_fit_psf_numpy`, whichever is faster (they agree to rounding: see
``docs/architecture.md``). :mod:`skystack.engine.detect` fits the sample of
bright, isolated stars that sets every star's FWHM scale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skystack.engine.backend import array_module, is_device_array, launch, run_cpu, to_host
from skystack.engine.centroid import NATIVE_MIN_STARS, STAR_BLOCK, cut_stamps, host_float32, stamp_side

#: Kernel source of the PSF fit.
_PSF_SRC = "psf.cu"

#: Range of the Moffat wing parameter u = 1/beta (beta from 50, almost Gaussian, to 1.25).
_U_MIN, _U_MAX = 0.02, 0.8


def _solve_linear(g: np.ndarray, data: np.ndarray, valid: np.ndarray, blocks: list[slice]):
    """Per-site amplitude and background minimising ``sum (data - a_s g - b_s)^2``.

    ``g``, ``data``, ``valid``: ``(N, P)`` with the pixels of each Bayer site in
    one contiguous block (``blocks``). Returns the model ``(N, P)`` and the
    amplitude of every pixel's site ``(N, P)``.
    """
    model = np.empty_like(g)
    amp = np.empty_like(g)
    for sl in blocks:
        gs, ds, vs = g[:, sl] * valid[:, sl], data[:, sl], valid[:, sl]
        sgg = np.einsum("np,np->n", gs, gs)
        sg = gs.sum(1)
        sn = vs.sum(1)
        sgd = np.einsum("np,np->n", gs, ds)
        sd = ds.sum(1)  # data is zero where invalid
        det = sgg * sn - sg * sg
        ok = det > 1e-12 * np.maximum(sgg * sn, 1e-300)
        det = np.where(ok, det, 1.0)
        a = np.where(ok, (sgd * sn - sg * sd) / det, 0.0)
        b = np.where(ok, (sgg * sd - sg * sgd) / det, sd / np.maximum(sn, 1))
        model[:, sl] = a[:, None] * g[:, sl] + b[:, None]
        amp[:, sl] = a[:, None]
    return model, amp


def fit_psf(img: Any, x: np.ndarray, y: np.ndarray, s2: np.ndarray,
             half: int, sites: int, *, moffat: bool = True, n_iter: int = 25):
    """Fit the PSF model to every star: the ``psf_fit`` kernel or its twin :func:`_fit_psf_numpy`.

    On a device frame the kernel runs there (``kernels/psf.cu``, a thread per
    star reading the frame at its stamp) and only the seven per-star outputs come
    down. On the host, :func:`skystack.engine.backend.run_cpu` runs the kernel
    built natively or the twin, whichever is faster; a frame whose dtype float32
    cannot hold exactly always takes the twin. The two agree within the
    tolerance documented in ``docs/architecture.md``.

    Returns ``x, y, cxx, cyy, cxy, pos_err, ok`` as :func:`_fit_psf_numpy`.
    """
    x, y, s2 = (np.ascontiguousarray(v, dtype=np.float64) for v in (x, y, s2))
    args = (half, sites, moffat, n_iter)
    if is_device_array(img):
        xp = array_module(img)
        return _psf_launch(lambda kn, n, a: launch(_PSF_SRC, kn, n, a, block=STAR_BLOCK), xp,
                           xp.ascontiguousarray(img, dtype=xp.float32), x, y, s2, *args)
    f32 = host_float32(img) if x.size else None
    if f32 is None:
        return _fit_psf_numpy(img, x, y, s2, half, sites, moffat=moffat, n_iter=n_iter)

    def native(mod):
        mod.set_threads(1)  # a launch is tens of stars; frames are detected in parallel already
        return _psf_launch(lambda kn, n, a: mod.launch(kn, n, a, block=STAR_BLOCK), np, f32, x, y, s2, *args)

    return run_cpu(_PSF_SRC, "psf_fit", x.size,
                   lambda: _fit_psf_numpy(img, x, y, s2, half, sites, moffat=moffat, n_iter=n_iter),
                   native, min_items=NATIVE_MIN_STARS, same_bits=False)


def _psf_launch(run, xp, img, x, y, s2, half: int, sites: int, moffat: bool, n_iter: int):
    """Launch ``psf_fit`` through ``run(kernel, n_items, args)`` on ``img`` (float32, of ``xp``);
    the star positions and sizes go up, the ``(7, N)`` outputs come down."""
    n = int(x.size)
    if n == 0:
        z = np.zeros(0)
        return z, z.copy(), z.copy(), z.copy(), z.copy(), z.copy(), np.zeros(0, dtype=bool)
    k = stamp_side(half, sites)
    h, w = img.shape
    out = xp.empty((7, n), dtype=xp.float64)
    scratch = xp.empty(n * 6 * k * k, dtype=xp.float64)
    run("psf_fit", n, (out, scratch, img, np.int32(h), np.int32(w), np.int32(sites), xp.asarray(x),
                       xp.asarray(y), xp.asarray(s2), np.int64(n), np.int32(half), np.int32(k),
                       np.int32(bool(moffat)), np.int32(n_iter), np.float64(_U_MIN), np.float64(_U_MAX)))
    o = to_host(out)
    return o[0], o[1], o[2], o[3], o[4], o[5], o[6] > 0.5


def _fit_psf_numpy(img: np.ndarray, x: np.ndarray, y: np.ndarray, s2: np.ndarray,
                   half: int, sites: int, *, moffat: bool = True, n_iter: int = 25):
    """Fit an elliptical Moffat (or Gaussian) PSF to every star (Levenberg-Marquardt, vectorised):
    the NumPy twin of the ``psf_fit`` kernel (``kernels/psf.cu``), and its reference.

    The model of a stamp pixel of Bayer site ``s`` is ``a_s * G(p) + b_s`` with
    ``G = (1 + c(u) q)^(-1/u)``, ``c(u) = (2^u - 1) / (2 ln 2)`` (a Moffat of
    ``beta = 1/u``, free) or ``G = exp(-q / 2)`` (Gaussian), where
    ``q = d^T Q d``, ``d = p - mu``. With this parametrisation ``Q`` alone sets
    the FWHM (as for a Gaussian of covariance ``Q^-1``) and ``u`` only the
    wings, so the two do not trade off; ``u -> 0`` is the Gaussian. The
    centre ``mu`` and shape ``Q`` are shared by all sites,
    a free amplitude and background per CFA site (so star colour and the
    per-channel sky level cannot bias the centroid); ``sites == 1`` for mono
    data. ``G`` is sampled at pixel centres of the full-resolution image.
    The amplitudes and backgrounds are solved exactly at every step (variable
    projection); stars leave the loop once their step is below 1e-4 px.

    Returns ``x, y, cxx, cyy, cxy, pos_err, ok`` where ``C`` is the covariance
    of the Gaussian with the same FWHM along each axis.
    """
    grid = _Grid(half, sites, moffat)
    st, valid, ox, oy = cut_stamps(img, x, y, half, sites)
    n = x.shape[0]
    data = st.reshape(n, -1)[:, grid.perm]
    vmask = valid.reshape(n, -1)[:, grid.perm].astype(np.float64)
    # parameters: mu_x, mu_y (stamp-relative), Q11, Q12, Q22 (shape), u = 1/beta (Moffat)
    th = np.empty((n, grid.npar))
    th[:, 0] = x - ox
    th[:, 1] = y - oy
    s2 = np.clip(s2, 0.3, (half / 1.5) ** 2)
    th[:, 2] = 1.0 / s2
    th[:, 3] = 0.0
    th[:, 4] = 1.0 / s2
    if moffat:
        th[:, 5] = 1.0 / 3.0
    cost = _levenberg_marquardt(grid, th, data, vmask, n_iter)
    pos_err, amp_sum = _centroid_errors(grid, th, cost, data, vmask)
    det = th[:, 2] * th[:, 4] - th[:, 3] ** 2
    cxx, cyy, cxy = th[:, 4] / det, th[:, 2] / det, -th[:, 3] / det
    ok = grid.admissible(th) & (amp_sum > 0) & np.isfinite(pos_err)
    return th[:, 0] + ox, th[:, 1] + oy, cxx, cyy, cxy, pos_err, ok


class _Grid:
    """A stamp's pixels for :func:`_fit_psf_numpy`, each Bayer site's contiguous (``perm`` of the
    row-major stamp; ``blocks``), the parameter bounds and the model (Moffat or Gaussian)."""

    def __init__(self, half: int, sites: int, moffat: bool) -> None:
        k = stamp_side(half, sites)
        r = np.arange(k, dtype=np.float64)
        px = np.tile(r, k)  # stamp-relative pixel coordinates, flattened row-major
        py = np.repeat(r, k)
        site = (py.astype(np.int64) % 2) * 2 + px.astype(np.int64) % 2 if sites == 4 \
            else np.zeros(k * k, dtype=np.int64)
        self.perm = np.argsort(site, kind="stable")  # each site's pixels contiguous
        self.px, self.py, site = px[self.perm], py[self.perm], site[self.perm]
        bounds = np.searchsorted(site, np.arange(sites + 1))
        self.blocks = [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(sites)]
        self.k, self.sites, self.moffat = k, sites, moffat
        self.npar = 6 if moffat else 5
        self.lo_p, self.hi_p = 1.0 / (half / 1.2) ** 2, 1.0 / 0.05

    def admissible(self, t: np.ndarray) -> np.ndarray:
        """Which parameter rows lie inside the bounds (shape, centre within the stamp, wings)."""
        lo_p, hi_p, k = self.lo_p, self.hi_p, self.k
        det = t[:, 2] * t[:, 4] - t[:, 3] ** 2
        ok_ = ((t[:, 2] > lo_p) & (t[:, 4] > lo_p) & (t[:, 2] < hi_p) & (t[:, 4] < hi_p)
               & (det > lo_p * lo_p * 0.5)
               & (t[:, 0] > 0) & (t[:, 0] < k - 1) & (t[:, 1] > 0) & (t[:, 1] < k - 1))
        if self.moffat:
            ok_ &= (t[:, 5] >= _U_MIN) & (t[:, 5] <= _U_MAX)
        return ok_

    def evaluate(self, t, data, vmask):
        """Cost, and the model's G, q, log1p(c q), offsets, per-pixel amplitude and residuals at ``t``."""
        dx = self.px[None, :] - t[:, 0:1]
        dy = self.py[None, :] - t[:, 1:2]
        q = t[:, 2:3] * dx * dx + 2 * t[:, 3:4] * dx * dy + t[:, 4:5] * dy * dy
        if self.moffat:
            u = t[:, 5:6]
            c = (np.exp2(u) - 1.0) / (2.0 * math.log(2.0))
            lq = np.log1p(c * np.maximum(q, 0.0))
            g = np.exp(-lq / u)
        else:
            lq = None
            g = np.exp(-0.5 * np.minimum(q, 200.0))
        model, amp = _solve_linear(g, data, vmask, self.blocks)
        res = (data - model) * vmask
        return np.einsum("np,np->n", res, res), g, q, lq, dx, dy, amp, res

    def jacobian(self, t, g, q, lq, dx, dy, amp, vmask):
        """The Jacobian ``(N, npar, P)`` of the residuals, projected (variable projection)."""
        ag = amp * vmask
        if self.moffat:
            u = t[:, 5:6]
            c = (np.exp2(u) - 1.0) / (2.0 * math.log(2.0))
            dc = np.exp2(u) / 2.0  # dc/du
            one_cq = 1.0 + c * q
            dg = -(c / u) * g / one_cq  # dG/dq
            dgu = g * (lq / (u * u) - q * dc / (u * one_cq))  # dG/du
        else:
            dg = -0.5 * g
        adg = ag * dg
        j = np.empty((t.shape[0], self.npar, g.shape[1]))
        j[:, 0] = -2.0 * adg * (t[:, 2:3] * dx + t[:, 3:4] * dy)
        j[:, 1] = -2.0 * adg * (t[:, 3:4] * dx + t[:, 4:5] * dy)
        j[:, 2] = adg * dx * dx
        j[:, 3] = 2.0 * adg * dx * dy
        j[:, 4] = adg * dy * dy
        if self.moffat:
            j[:, 5] = ag * dgu
        # Kaufman's variable projection: remove from each column its part that the
        # per-site amplitude and sky would absorb (superlinear convergence; without
        # it width and amplitude trade off and the shape converges only linearly)
        for sl in self.blocks:
            gs, vs = g[:, sl] * vmask[:, sl], vmask[:, sl]
            sgg = np.einsum("nk,nk->n", gs, gs)
            sg = gs.sum(1)
            sn = vs.sum(1)
            det = sgg * sn - sg * sg
            det = np.where(det > 1e-12 * np.maximum(sgg * sn, 1e-300), det, np.inf)
            js = j[:, :, sl]
            jg = np.einsum("npk,nk->np", js, gs)
            j1 = js.sum(2)
            al = (jg * sn[:, None] - sg[:, None] * j1) / det[:, None]
            be = (sgg[:, None] * j1 - sg[:, None] * jg) / det[:, None]
            j[:, :, sl] = js - (al[:, :, None] * g[:, None, sl] + be[:, :, None]) * vs[:, None, :]
        return j


def _lm_step(grid: _Grid, t_a, d_a, v_a, lam_a):
    """One damped Gauss-Newton step of the active stars: the candidate parameters, projected onto
    the bounds, and the step taken."""
    _, g, q, lq, dx, dy, amp, res = grid.evaluate(t_a, d_a, v_a)
    j = grid.jacobian(t_a, g, q, lq, dx, dy, amp, v_a)
    jtj = np.einsum("npk,nqk->npq", j, j)
    jtr = np.einsum("npk,nk->np", j, res)
    diag = np.einsum("npp->np", jtj)
    a_mat = jtj + (lam_a[:, None] * np.maximum(diag, 1e-12))[:, :, None] * np.eye(grid.npar)[None]
    a_mat[~np.isfinite(a_mat).all(axis=(1, 2))] = np.eye(grid.npar)
    try:
        step = np.linalg.solve(a_mat, jtr[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        step = np.zeros_like(t_a)
        for i in range(len(t_a)):
            try:
                step[i] = np.linalg.solve(a_mat[i], jtr[i])
            except np.linalg.LinAlgError:
                pass
    step = np.where(np.isfinite(step), step, 0.0)
    cand = t_a + step
    # project onto the bounds (a Gaussian star drives u to its lower bound)
    cand[:, 2] = np.clip(cand[:, 2], grid.lo_p * 1.0001, grid.hi_p * 0.9999)
    cand[:, 4] = np.clip(cand[:, 4], grid.lo_p * 1.0001, grid.hi_p * 0.9999)
    if grid.moffat:
        cand[:, 5] = np.clip(cand[:, 5], _U_MIN, _U_MAX)
    return cand, cand - t_a


def _levenberg_marquardt(grid: _Grid, th, data, vmask, n_iter: int) -> np.ndarray:
    """Fit every star's parameters ``th`` in place; returns their final costs. A star leaves the
    loop once its step is below 1e-4 (px, or relative for the shape) or its damping is past 1e7."""
    cost = grid.evaluate(th, data, vmask)[0]
    lam = np.full(len(th), 1e-3)
    done = ~grid.admissible(th)
    for _ in range(n_iter):
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        t_a, d_a, v_a = th[act], data[act], vmask[act]
        cand, step = _lm_step(grid, t_a, d_a, v_a, lam[act])
        adm = grid.admissible(cand)
        c_cost = grid.evaluate(np.where(adm[:, None], cand, t_a), d_a, v_a)[0]
        better = adm & (c_cost < cost[act])
        th[act[better]] = cand[better]
        cost[act[better]] = c_cost[better]
        lam[act] = np.where(better, lam[act] / 3.0, lam[act] * 4.0)
        small = (np.abs(step[:, :2]).max(1) < 1e-4) & (np.abs(step[:, 2:5] / t_a[:, 2:5].max(1, keepdims=True))
                                                       .max(1) < 1e-4)
        done[act] |= small | (lam[act] > 1e7)
    return cost


def _centroid_errors(grid: _Grid, th, cost, data, vmask):
    """Each star's centroid error (from the final Jacobian, scaled by its reduced cost; inf where
    it is singular) and the sum of its sites' amplitudes."""
    _, g, q, lq, dx, dy, amp, res = grid.evaluate(th, data, vmask)
    j = grid.jacobian(th, g, q, lq, dx, dy, amp, vmask)
    jtj = np.einsum("npk,nqk->npq", j, j)
    dof = np.maximum(vmask.sum(1) - grid.npar - 2 * grid.sites, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        good_j = np.isfinite(jtj).all(axis=(1, 2)) & (np.linalg.det(np.where(
            np.isfinite(jtj), jtj, 0.0)) > 0)
        jtj[~good_j] = np.eye(grid.npar)
        cov = np.linalg.inv(jtj)
        var = (cov[:, 0, 0] + cov[:, 1, 1]) / 2 * cost / dof
    var = np.where(good_j & np.isfinite(var) & (var >= 0), var, np.inf)
    amp_sum = np.array([amp[:, b].mean(1) for b in grid.blocks]).sum(0)
    return np.sqrt(var), amp_sum
