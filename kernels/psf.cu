// psf.cu -- PSF model fit of a sample of stars: an elliptical Moffat (or
// Gaussian) by Levenberg-Marquardt with variable projection, one thread per
// star. NumPy twin: _fit_psf_numpy in skystack/engine/psf.py (the
// reference: its docstring gives the model and the parametrisation; the
// tolerance between the two is in docs/architecture.md).
//
// The model of stamp pixel p of Bayer site s is a_s * G(p) + b_s with
// G = (1 + c(u) q)^(-1/u), c(u) = (2^u - 1) / (2 ln 2) (Moffat, beta = 1/u)
// or G = exp(-q / 2) (Gaussian), q = d^T Q d, d = p - mu. Parameters
// t = (mu_x, mu_y, Q11, Q12, Q22[, u]), stamp-relative; a_s and b_s are solved
// exactly at every step. The stamp is k x k pixels from the origin (ox, oy)
// (on a CFA mosaic on an even row and column, so the site of stamp pixel
// (r, c) is 2 * (r % 2) + c % 2), read from the frame at the star; pixels
// outside the frame or NaN are left out.
//
// Per-star working memory is scratch[i * 6kk, (i + 1) * 6kk) doubles: the
// stamp, its validity (1.0 / 0.0), and at the current parameters G, q,
// log1p(c q) and the weighted residual, each k*k in row-major stamp order.
// The Jacobian is never stored: a first pass sums what the per-site
// projection needs, a second one forms J^T J and J^T r.
//
// Output out (7, n) double: x, y (image pixels), cxx, cyy, cxy (covariance of
// the Gaussian with the same FWHM), pos_err, ok (1.0 or 0.0).

#define PSF_MAXP 6

struct PsfFit {
    const double* data;
    const double* valid;
    double* g;
    double* q;
    double* lq;
    double* res;
    int k;
    int sites;
    int npar;
    int moffat;
    double lo_p, hi_p, u_min, u_max;
    // per-site sums at the current parameters, and the solved amplitude and sky
    double sgg[4], sg[4], sn[4], a[4], b[4];
};

__device__ __forceinline__ int psf_site(const PsfFit& f, int r, int c) {
    return f.sites == 4 ? (((r & 1) << 1) | (c & 1)) : 0;
}

__device__ bool psf_admissible(const PsfFit& f, const double* t) {
    double det = t[2] * t[4] - t[3] * t[3];
    bool ok = t[2] > f.lo_p && t[4] > f.lo_p && t[2] < f.hi_p && t[4] < f.hi_p
              && det > f.lo_p * f.lo_p * 0.5 && t[0] > 0 && t[0] < f.k - 1 && t[1] > 0 && t[1] < f.k - 1;
    if (f.moffat) ok = ok && t[5] >= f.u_min && t[5] <= f.u_max;
    return ok;
}

__device__ double psf_c(double u) { return (exp2(u) - 1.0) / (2.0 * log(2.0)); }

// G, q and log1p(c q) at t, the per-site linear solve, the residuals; returns the cost.
__device__ double psf_evaluate(PsfFit& f, const double* t) {
    int k = f.k;
    double c = f.moffat ? psf_c(t[5]) : 0.0;
    double sgd[4], sd[4];
    for (int s = 0; s < 4; ++s) f.sgg[s] = f.sg[s] = f.sn[s] = sgd[s] = sd[s] = 0.0;
    for (int r = 0; r < k; ++r)
        for (int cc = 0; cc < k; ++cc) {
            int p = r * k + cc;
            double dx = cc - t[0], dy = r - t[1];
            double q = t[2] * dx * dx + 2 * t[3] * dx * dy + t[4] * dy * dy;
            double g;
            if (f.moffat) {
                double lq = log1p(c * (q > 0.0 ? q : 0.0));
                f.lq[p] = lq;
                g = exp(-lq / t[5]);
            } else {
                g = exp(-0.5 * (q < 200.0 ? q : 200.0));
            }
            f.q[p] = q;
            f.g[p] = g;
            int s = psf_site(f, r, cc);
            double gs = g * f.valid[p];
            f.sgg[s] += gs * gs;
            f.sg[s] += gs;
            f.sn[s] += f.valid[p];
            sgd[s] += gs * f.data[p];
            sd[s] += f.data[p];
        }
    for (int s = 0; s < f.sites; ++s) {
        double det = f.sgg[s] * f.sn[s] - f.sg[s] * f.sg[s];
        double m = f.sgg[s] * f.sn[s];
        bool ok = det > 1e-12 * (m > 1e-300 ? m : 1e-300);
        f.a[s] = ok ? (sgd[s] * f.sn[s] - f.sg[s] * sd[s]) / det : 0.0;
        f.b[s] = ok ? (f.sgg[s] * sd[s] - f.sg[s] * sgd[s]) / det : sd[s] / (f.sn[s] > 1 ? f.sn[s] : 1.0);
    }
    double cost = 0.0;
    for (int r = 0; r < k; ++r)
        for (int cc = 0; cc < k; ++cc) {
            int p = r * k + cc;
            int s = psf_site(f, r, cc);
            double res = (f.data[p] - (f.a[s] * f.g[p] + f.b[s])) * f.valid[p];
            f.res[p] = res;
            cost += res * res;
        }
    return cost;
}

// The unprojected Jacobian column values of pixel p (row r, column cc) at t;
// c = c(u) and dc = dc/du (Moffat).
__device__ void psf_columns(const PsfFit& f, const double* t, double c, double dc, int r, int cc, double* j) {
    int p = r * f.k + cc;
    double dx = cc - t[0], dy = r - t[1];
    double ag = f.a[psf_site(f, r, cc)] * f.valid[p];
    double g = f.g[p], q = f.q[p], dg;
    if (f.moffat) {
        double u = t[5];
        double one_cq = 1.0 + c * q;
        dg = -(c / u) * g / one_cq;
        j[5] = ag * (g * (f.lq[p] / (u * u) - q * dc / (u * one_cq)));
    } else {
        dg = -0.5 * g;
    }
    double adg = ag * dg;
    j[0] = -2.0 * adg * (t[2] * dx + t[3] * dy);
    j[1] = -2.0 * adg * (t[3] * dx + t[4] * dy);
    j[2] = adg * dx * dx;
    j[3] = 2.0 * adg * dx * dy;
    j[4] = adg * dy * dy;
}

// J^T J and J^T r of the projected Jacobian at t (after psf_evaluate(f, t)).
__device__ void psf_normal(const PsfFit& f, const double* t, double* jtj, double* jtr) {
    int k = f.k, np = f.npar;
    double jg[4][PSF_MAXP], j1[4][PSF_MAXP], al[4][PSF_MAXP], be[4][PSF_MAXP], j[PSF_MAXP];
    double c = f.moffat ? psf_c(t[5]) : 0.0, dc = f.moffat ? exp2(t[5]) / 2.0 : 0.0;
    for (int s = 0; s < 4; ++s)
        for (int a = 0; a < np; ++a) jg[s][a] = j1[s][a] = 0.0;
    for (int r = 0; r < k; ++r)
        for (int cc = 0; cc < k; ++cc) {
            int p = r * k + cc, s = psf_site(f, r, cc);
            psf_columns(f, t, c, dc, r, cc, j);
            double gs = f.g[p] * f.valid[p];
            for (int a = 0; a < np; ++a) {
                jg[s][a] += j[a] * gs;
                j1[s][a] += j[a];
            }
        }
    for (int s = 0; s < f.sites; ++s) {
        double det = f.sgg[s] * f.sn[s] - f.sg[s] * f.sg[s];
        double m = f.sgg[s] * f.sn[s];
        bool ok = det > 1e-12 * (m > 1e-300 ? m : 1e-300);
        for (int a = 0; a < np; ++a) {  // Kaufman's variable projection
            al[s][a] = ok ? (jg[s][a] * f.sn[s] - f.sg[s] * j1[s][a]) / det : 0.0;
            be[s][a] = ok ? (f.sgg[s] * j1[s][a] - f.sg[s] * jg[s][a]) / det : 0.0;
        }
    }
    for (int a = 0; a < np * np; ++a) jtj[a] = 0.0;
    for (int a = 0; a < np; ++a) jtr[a] = 0.0;
    for (int r = 0; r < k; ++r)
        for (int cc = 0; cc < k; ++cc) {
            int p = r * k + cc, s = psf_site(f, r, cc);
            psf_columns(f, t, c, dc, r, cc, j);
            for (int a = 0; a < np; ++a) j[a] -= (al[s][a] * f.g[p] + be[s][a]) * f.valid[p];
            for (int a = 0; a < np; ++a) {
                jtr[a] += j[a] * f.res[p];
                for (int b = 0; b < np; ++b) jtj[a * np + b] += j[a] * j[b];
            }
        }
}

// LU factorisation with partial pivoting of the n x n matrix m (in place);
// returns false on a zero pivot. sign: the permutation's sign.
__device__ bool psf_lu(double* m, int* piv, int n, double* sign) {
    *sign = 1.0;
    for (int c = 0; c < n; ++c) {
        int best = c;
        for (int r = c + 1; r < n; ++r)
            if (fabs(m[r * n + c]) > fabs(m[best * n + c])) best = r;
        piv[c] = best;
        if (m[best * n + c] == 0.0) return false;
        if (best != c) {
            *sign = -*sign;
            for (int a = 0; a < n; ++a) {
                double tmp = m[c * n + a];
                m[c * n + a] = m[best * n + a];
                m[best * n + a] = tmp;
            }
        }
        for (int r = c + 1; r < n; ++r) {
            double l = m[r * n + c] / m[c * n + c];
            m[r * n + c] = l;
            for (int a = c + 1; a < n; ++a) m[r * n + a] -= l * m[c * n + a];
        }
    }
    return true;
}

// Solve LU x = b for x (b is overwritten with x).
__device__ void psf_lu_solve(const double* m, const int* piv, int n, double* b) {
    for (int c = 0; c < n; ++c) {
        double tmp = b[c];
        b[c] = b[piv[c]];
        b[piv[c]] = tmp;
    }
    for (int r = 0; r < n; ++r)
        for (int a = 0; a < r; ++a) b[r] -= m[r * n + a] * b[a];
    for (int r = n - 1; r >= 0; --r) {
        for (int a = r + 1; a < n; ++a) b[r] -= m[r * n + a] * b[a];
        b[r] /= m[r * n + r];
    }
}

// +infinity (NVRTC has no INFINITY macro).
__device__ double psf_inf() { return -log(0.0); }

__device__ double psf_clip(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

// One Levenberg-Marquardt step of the star; returns true when it is done.
__device__ bool psf_step(PsfFit& f, double* t, double* cost, double* lam) {
    int np = f.npar;
    double jtj[PSF_MAXP * PSF_MAXP], jtr[PSF_MAXP], step[PSF_MAXP], cand[PSF_MAXP];
    int piv[PSF_MAXP];
    psf_evaluate(f, t);
    psf_normal(f, t, jtj, jtr);
    bool finite = true;
    for (int a = 0; a < np; ++a) {
        double d = jtj[a * np + a];
        jtj[a * np + a] += *lam * (d > 1e-12 ? d : 1e-12);
    }
    for (int a = 0; a < np * np; ++a) finite = finite && isfinite(jtj[a]);
    if (!finite)
        for (int a = 0; a < np * np; ++a) jtj[a] = (a % (np + 1) == 0) ? 1.0 : 0.0;
    for (int a = 0; a < np; ++a) step[a] = jtr[a];
    double sign;
    if (psf_lu(jtj, piv, np, &sign)) psf_lu_solve(jtj, piv, np, step);
    else for (int a = 0; a < np; ++a) step[a] = 0.0;
    for (int a = 0; a < np; ++a) {
        if (!isfinite(step[a])) step[a] = 0.0;
        cand[a] = t[a] + step[a];
    }
    cand[2] = psf_clip(cand[2], f.lo_p * 1.0001, f.hi_p * 0.9999);
    cand[4] = psf_clip(cand[4], f.lo_p * 1.0001, f.hi_p * 0.9999);
    if (f.moffat) cand[5] = psf_clip(cand[5], f.u_min, f.u_max);
    double qmax = t[2] > t[3] ? t[2] : t[3];
    qmax = qmax > t[4] ? qmax : t[4];
    double smax = 0.0, qstep = 0.0;
    for (int a = 0; a < 2; ++a) smax = fmax(smax, fabs(cand[a] - t[a]));
    for (int a = 2; a < 5; ++a) qstep = fmax(qstep, fabs((cand[a] - t[a]) / qmax));
    if (psf_admissible(f, cand)) {
        double c_cost = psf_evaluate(f, cand);
        if (c_cost < *cost) {
            for (int a = 0; a < np; ++a) t[a] = cand[a];
            *cost = c_cost;
            *lam /= 3.0;
        } else {
            *lam *= 4.0;
        }
    } else {
        *lam *= 4.0;
    }
    return (smax < 1e-4 && qstep < 1e-4) || *lam > 1e7;
}

// The centroid variance from the final Jacobian: (cov_xx + cov_yy) / 2 * cost / dof, or +inf.
__device__ double psf_variance(PsfFit& f, const double* t, double cost) {
    int np = f.npar;
    double jtj[PSF_MAXP * PSF_MAXP], jtr[PSF_MAXP], e0[PSF_MAXP], e1[PSF_MAXP], sign;
    int piv[PSF_MAXP];
    psf_evaluate(f, t);
    psf_normal(f, t, jtj, jtr);
    double nvalid = 0.0;
    for (int p = 0; p < f.k * f.k; ++p) nvalid += f.valid[p];
    double dof = nvalid - np - 2 * f.sites;
    dof = dof > 1.0 ? dof : 1.0;
    for (int a = 0; a < np * np; ++a)
        if (!isfinite(jtj[a])) return psf_inf();
    if (!psf_lu(jtj, piv, np, &sign)) return psf_inf();
    double det = sign;
    for (int a = 0; a < np; ++a) det *= jtj[a * np + a];
    if (!(det > 0)) return psf_inf();
    for (int a = 0; a < np; ++a) e0[a] = e1[a] = 0.0;
    e0[0] = 1.0;
    e1[1] = 1.0;
    psf_lu_solve(jtj, piv, np, e0);
    psf_lu_solve(jtj, piv, np, e1);
    double var = (e0[0] + e1[1]) / 2 * cost / dof;
    return (isfinite(var) && var >= 0) ? var : psf_inf();
}

extern "C" __global__ void psf_fit(double* out, double* scratch, const float* img, int H, int W, int sites,
                                   const double* xs, const double* ys, const double* s2s, long long n,
                                   int half, int k, int moffat, int n_iter, double u_min, double u_max) {
    long long stride = 6LL * k * k;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        double* data = scratch + i * stride;
        double* valid = data + (long long)k * k;
        long long ox = (long long)floor(xs[i]) - half;
        long long oy = (long long)floor(ys[i]) - half;
        if (sites == 4) {
            ox -= ox & 1;
            oy -= oy & 1;
        }
        for (int r = 0; r < k; ++r)
            for (int c = 0; c < k; ++c) {
                long long yy = oy + r, xx = ox + c;
                bool inside = yy >= 0 && yy < H && xx >= 0 && xx < W;
                double v = inside ? (double)img[yy * W + xx] : 0.0;
                bool ok = inside && isfinite(v);
                data[r * k + c] = ok ? v : 0.0;
                valid[r * k + c] = ok ? 1.0 : 0.0;
            }
        PsfFit f;
        f.data = data;
        f.valid = valid;
        f.g = valid + (long long)k * k;
        f.q = f.g + (long long)k * k;
        f.lq = f.q + (long long)k * k;
        f.res = f.lq + (long long)k * k;
        f.k = k;
        f.sites = sites;
        f.moffat = moffat;
        f.npar = moffat ? 6 : 5;
        f.lo_p = 1.0 / ((half / 1.2) * (half / 1.2));
        f.hi_p = 1.0 / 0.05;
        f.u_min = u_min;
        f.u_max = u_max;
        double s2 = psf_clip(s2s[i], 0.3, (half / 1.5) * (half / 1.5));
        double t[PSF_MAXP] = {xs[i] - ox, ys[i] - oy, 1.0 / s2, 0.0, 1.0 / s2, 1.0 / 3.0};
        double cost = psf_evaluate(f, t);
        double lam = 1e-3;
        bool done = !psf_admissible(f, t);
        for (int it = 0; it < n_iter && !done; ++it) done = psf_step(f, t, &cost, &lam);
        double var = psf_variance(f, t, cost);
        double amp = 0.0;
        for (int s = 0; s < sites; ++s) amp += f.a[s];
        double det = t[2] * t[4] - t[3] * t[3];
        double pos_err = sqrt(var);
        out[i] = t[0] + ox;
        out[n + i] = t[1] + oy;
        out[2 * n + i] = t[4] / det;
        out[3 * n + i] = t[2] / det;
        out[4 * n + i] = -t[3] / det;
        out[5 * n + i] = pos_err;
        out[6 * n + i] = (psf_admissible(f, t) && amp > 0 && isfinite(pos_err)) ? 1.0 : 0.0;
    }
}
