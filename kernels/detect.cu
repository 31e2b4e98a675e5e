// detect.cu -- star measurement: windowed centroids and second moments
// (SExtractor's XWIN), one thread per star. NumPy twin: _window_measure_numpy
// in skystack/engine/centroid.py (the reference; see its docstring for what is
// measured and for the tolerance between the two).
//
// The thread reads the frame at the star's stamp (k x k pixels from the
// origin (ox, oy); on a CFA mosaic the origin is on an even row and column,
// so the Bayer site of stamp pixel (r, c) is 2 * (r % 2) + c % 2) directly;
// no stamp array exists. Arithmetic is double precision. Per-star working
// memory is the slice scratch[i * stride, (i + 1) * stride) of a global
// buffer, stride = 2 * k * k + 2 * k doubles:
//   [0, k*k)          first the ring pixels of one site (sky median), then
//                     the sky-subtracted stamp (NaN = no data)
//   [k*k, k*k + k)    the window's x factors exp(-dx^2 / (2 sigma_w^2))
//   [k*k + k, +k)     its y factors (the circular Gaussian window is their product)
//   [k*k + 2k, +k*k)  the Gaussian model of the misfit at each pixel
//
// Output out (7, n) double: x, y (image pixels), cxx, cyy, cxy (window-
// corrected covariance), pos_err, ok (1.0 or 0.0).

__device__ __forceinline__ double wm_clamp(double v, double lo, double hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// The k-th smallest of a[0, n) (a is reordered: afterwards a[0, k) <= a[k]).
__device__ double wm_select(double* a, long long n, long long k) {
    long long lo = 0, hi = n - 1;
    while (lo < hi) {
        double pivot = a[k];
        long long i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) ++i;
            while (pivot < a[j]) --j;
            if (i <= j) {
                double t = a[i];
                a[i] = a[j];
                a[j] = t;
                ++i;
                --j;
            }
        }
        if (j < k) lo = i;
        if (k < i) hi = j;
    }
    return a[k];
}

// Median of a[0, n) as NumPy's (the mean of the two middle values when n is even).
__device__ double wm_median(double* a, long long n) {
    long long h = n / 2;
    double upper = wm_select(a, n, h);
    if (n % 2 == 1) return upper;
    double lower = a[0];
    for (long long i = 1; i < h; ++i) lower = a[i] > lower ? a[i] : lower;
    return (lower + upper) / 2.0;
}

// Per-site gain (site's share of the windowed flux, relative to the sites
// used) folded into the weights: norm[s] = 1 / g_s, gain[s] = wp_s / g_s,
// with the diagonal pairs (0, 3) and (1, 2) weighted alike.
__device__ void wm_gains(const double* share, double* norm, double* gain) {
    double ref = share[0];
    for (int s = 1; s < 4; ++s) ref = share[s] > ref ? share[s] : ref;
    double sum = 0.0;
    int cnt = 0;
    bool use[4];
    for (int s = 0; s < 4; ++s) {
        use[s] = share[s] > 0.1 * ref;
        if (use[s]) {
            sum += share[s];
            cnt += 1;
        }
    }
    double mean = sum / (double)(cnt > 1 ? cnt : 1);
    double g[4], ig2[4];  // a site left out has g = inf: 1 / g = 0 (no weight, no gain)
    for (int s = 0; s < 4; ++s) {
        g[s] = use[s] ? share[s] / (mean > 1e-300 ? mean : 1e-300) : 1.0;
        ig2[s] = use[s] ? 1.0 / (g[s] * g[s]) : 0.0;
    }
    double a = ig2[0] + ig2[3], b = ig2[1] + ig2[2];
    double wa = 1.0 / (a > 1e-300 ? a : 1e-300), wb = 1.0 / (b > 1e-300 ? b : 1e-300);
    for (int s = 0; s < 4; ++s) {
        norm[s] = use[s] ? 1.0 / g[s] : 0.0;
        gain[s] = use[s] ? ((s == 0 || s == 3) ? wa : wb) / g[s] : 0.0;
    }
}

// The window's factors at centre (cx, cy): ex[c] = exp(-(c - cx)^2 inv2), ey likewise.
__device__ void wm_window(double* ex, double* ey, int k, double cx, double cy, double inv2) {
    for (int c = 0; c < k; ++c) {
        double d = (double)c - cx;
        ex[c] = exp(-(d * d) * inv2);
        double e = (double)c - cy;
        ey[c] = exp(-(e * e) * inv2);
    }
}

// Site gains and the weighted flux s0 and first moments (sx, sy) at the current window,
// in one pass: per-site sums of w d, w d dx and w d dy, combined with the gains after.
// CFA site of stamp pixel (r, c): its place in the 2x2 tile with 4 sites, else 0.
__device__ __forceinline__ int wm_site(int r, int c, int sites) {
    return sites == 4 ? (((r & 1) << 1) | (c & 1)) : 0;
}

// Stamp pixel (r, c) for the Gaussian fit: its value *d and site *s; false where the value is
// NaN or its site has no usable normalisation.
__device__ __forceinline__ bool wm_fit_pixel(const double* data, const double* norm, int k, int sites, int r, int c,
                                             double* d, int* s) {
    *d = data[r * k + c];
    *s = wm_site(r, c, sites);
    return *d == *d && norm[*s] > 0.0;
}

__device__ void wm_first(const double* data, const double* ex, const double* ey, int k, int sites,
                         double cx, double cy, double* norm, double* gain, double* m) {
    double share[4] = {0.0, 0.0, 0.0, 0.0}, mx[4] = {0.0, 0.0, 0.0, 0.0}, my[4] = {0.0, 0.0, 0.0, 0.0};
    for (int r = 0; r < k; ++r) {
        double dy = (double)r - cy;
        for (int c = 0; c < k; ++c) {
            double d = data[r * k + c];
            if (!(d == d)) continue;
            int s = wm_site(r, c, sites);
            double wd = ex[c] * ey[r] * d;
            share[s] += wd;
            mx[s] += wd * ((double)c - cx);
            my[s] += wd * dy;
        }
    }
    if (sites == 4) {
        wm_gains(share, norm, gain);
    } else {
        norm[0] = 1.0;
        gain[0] = 1.0;
    }
    double s0 = 0.0, sx = 0.0, sy = 0.0;
    for (int s = 0; s < sites; ++s) {
        s0 += share[s] * gain[s];
        sx += mx[s] * gain[s];
        sy += my[s] * gain[s];
    }
    m[0] = s0;
    m[1] = sx;
    m[2] = sy;
}

extern "C" __global__ void window_measure(double* out, double* scratch, const float* img, int H, int W,
                                          int sites, const double* xs, const double* ys, long long n,
                                          double sigma_w, double noise_pix, int n_iter, int half, int k) {
    long long stride = 2LL * k * k + 2LL * k;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        double* data = scratch + i * stride;
        double* ex = data + (long long)k * k;
        double* ey = ex + k;
        double* model = ey + k;
        long long ox = (long long)floor(xs[i]) - half;
        long long oy = (long long)floor(ys[i]) - half;
        if (sites == 4) {
            ox -= ox & 1;
            oy -= oy & 1;
        }
        // sky: the median of each site's valid pixels beyond 3.5 sigma_w of the stamp centre
        double c0 = (k - 1) / 2.0;
        double rr = 3.5 * sigma_w;
        double ring2 = rr * rr;
        double sky[4] = {0.0, 0.0, 0.0, 0.0};
        for (int s = 0; s < sites; ++s) {
            long long cnt = 0;
            for (int r = 0; r < k; ++r)
                for (int c = 0; c < k; ++c) {
                    if (wm_site(r, c, sites) != s) continue;
                    double dr = r - c0, dc = c - c0;
                    if (!(dr * dr + dc * dc > ring2)) continue;
                    long long yy = oy + r, xx = ox + c;
                    if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
                    double v = (double)img[yy * W + xx];
                    if (isfinite(v)) data[cnt++] = v;
                }
            sky[s] = cnt > 0 ? wm_median(data, cnt) : 0.0;
        }
        for (int r = 0; r < k; ++r)
            for (int c = 0; c < k; ++c) {
                long long yy = oy + r, xx = ox + c;
                bool in = yy >= 0 && yy < H && xx >= 0 && xx < W;
                double v = in ? (double)img[yy * W + xx] : 0.0;
                data[r * k + c] = in && isfinite(v) ? v - sky[wm_site(r, c, sites)] : nan("");
            }
        double inv2 = 1.0 / (2.0 * sigma_w * sigma_w);
        double cx = xs[i] - (double)ox, cy = ys[i] - (double)oy;
        double norm[4], gain[4], m[3];
        bool ok = true;
        for (int it = 0; it < n_iter; ++it) {  // Newton steps to the windowed centre
            wm_window(ex, ey, k, cx, cy, inv2);
            wm_first(data, ex, ey, k, sites, cx, cy, norm, gain, m);
            double stx = 2.0 * m[1] / m[0], sty = 2.0 * m[2] / m[0];
            if (!(isfinite(stx) && isfinite(sty) && m[0] > 0.0)) {
                ok = false;
                break;
            }
            stx = wm_clamp(stx, -1.0, 1.0);
            sty = wm_clamp(sty, -1.0, 1.0);
            cx += stx;
            cy += sty;
            if (!(fmax(fabs(stx), fabs(sty)) > 1e-5)) break;
        }
        // second moments, the star's covariance and the centroid error at the final centre
        wm_window(ex, ey, k, cx, cy, inv2);
        wm_first(data, ex, ey, k, sites, cx, cy, norm, gain, m);
        double s0 = m[0];
        double mxx = 0.0, myy = 0.0, mxy = 0.0, vx = 0.0, vy = 0.0;
        for (int r = 0; r < k; ++r)
            for (int c = 0; c < k; ++c) {
                double d = data[r * k + c];
                if (!(d == d)) continue;
                int s = wm_site(r, c, sites);
                double w = ex[c] * ey[r];
                double wd = w * d * gain[s];
                double dx = (double)c - cx, dy = (double)r - cy;
                mxx += wd * dx * dx;
                myy += wd * dy * dy;
                mxy += wd * dx * dy;
                double vp = noise_pix * gain[s];
                vp = vp * vp;
                vx += (w * dx) * (w * dx) * vp;
                vy += (w * dy) * (w * dy) * vp;
            }
        mxx /= s0;
        myy /= s0;
        mxy /= s0;
        double det_m = mxx * myy - mxy * mxy;
        det_m = det_m > 1e-12 ? det_m : 1e-12;
        double pxx = myy / det_m - 2.0 * inv2, pyy = mxx / det_m - 2.0 * inv2, pxy = -mxy / det_m;
        double det_p = pxx * pyy - pxy * pxy;
        bool pos_def = det_p > 1e-8 && pxx > 0.0;
        if (!pos_def) det_p = 1.0;
        double dxn = s0 * (1.0 - mxx * 2.0 * inv2), dyn = s0 * (1.0 - myy * 2.0 * inv2);
        double varx = vx / (dxn * dxn), vary = vy / (dyn * dyn);
        // misfit: sqrt of the window-weighted reduced chi-square of the Gaussian of
        // precision P at the centre (amplitude by weighted least squares), at least 1
        double d;  // a stamp pixel of the fit and its site
        int s;
        double sdg = 0.0, sgg = 0.0;
        for (int r = 0; r < k; ++r)
            for (int c = 0; c < k; ++c) {
                if (!wm_fit_pixel(data, norm, k, sites, r, c, &d, &s)) continue;
                double dx = (double)c - cx, dy = (double)r - cy;
                double q = pxx * dx * dx + 2.0 * pxy * dx * dy + pyy * dy * dy;
                double g = exp(-0.5 * (q < 200.0 ? q : 200.0));
                model[r * k + c] = g;
                double w = ex[c] * ey[r];
                sdg += w * (d * norm[s]) * g;
                sgg += w * g * g;
            }
        double amp = sdg / (sgg > 1e-300 ? sgg : 1e-300);
        double chi_n = 0.0, chi_d = 0.0;
        for (int r = 0; r < k; ++r)
            for (int c = 0; c < k; ++c) {
                if (!wm_fit_pixel(data, norm, k, sites, r, c, &d, &s)) continue;
                double g = model[r * k + c];
                double w = ex[c] * ey[r];
                double res = d * norm[s] - amp * g;
                double vn = noise_pix * norm[s];
                chi_n += w * res * res;
                chi_d += w * (vn * vn);
            }
        double chi = chi_n / (chi_d > 1e-300 ? chi_d : 1e-300);
        if (!(pos_def && isfinite(chi))) chi = 1.0;
        double pos_err = sqrt((varx + vary) / 2.0) * sqrt(chi > 1.0 ? chi : 1.0);
        bool inside = cx > 1.0 && cx < k - 2 && cy > 1.0 && cy < k - 2;
        ok = ok && inside && isfinite(pos_err) && s0 > 0.0 && dxn > 0.0 && dyn > 0.0;
        out[i] = cx + (double)ox;
        out[n + i] = cy + (double)oy;
        out[2 * n + i] = pos_def ? pyy / det_p : 1e4;
        out[3 * n + i] = pos_def ? pxx / det_p : 1e4;
        out[4 * n + i] = pos_def ? -pxy / det_p : 0.0;
        out[5 * n + i] = pos_err;
        out[6 * n + i] = ok ? 1.0 : 0.0;
    }
}
