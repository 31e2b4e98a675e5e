// framestats.cu -- a frame's normalisation statistics on a device (normalize.frame_stats,
// normalize.signal_ratios and normalize.highpass_noise): each kernel gives its NumPy twin's numbers,
// every step being a selection (order-free) or a float32 operation in the twin's order.
//
// clipped_mad_sigma_rows -- one thread per row (a frame's channel, a background box). Twin:
// robust.clipped_median_mad_sigma of each row's finite values. For each row of v (rows x n float32): its finite values; their
// median m (the middle one, or float32 (a + b) / 2 of the middle two, as np.median); sigma = 1.4826
// * median(|x - m|), the deviations in float32 and the product in double. Then at most `rounds`
// rounds: stop if sigma <= 0; keep the values with |x - m| <= float(3 sigma) (NumPy compares a
// float32 array with a Python float in float32); stop if fewer than 16 are kept; else m and sigma of
// those. med_out[row] = m, out[row] = sigma (both NaN with fewer than min_n >= 1 finite values).
// work: rows x 2n float32 of scratch.
//
// aperture_measure -- one thread per reference star aperture of a group. Twin:
// normalize._aperture_measure_numpy. A group's tables are (rows, k): index (flat pixel index into
// one plane), valid (a box pixel, not padding), inside (the aperture) and ring (its background).
// Per aperture, over its k pixels:
//   box      = plane 0 + plane 1 + ... (float32, in channel order: the channel sum);
//   bg       = median of the ring pixels' box values, NaN left out (as the median above; NaN
//              when none);
//   dev[j]   = inside ? double(box - bg) : 0 (the difference in float32);
//   flux     = dev[0] + dev[1] + ... + dev[k - 1], added in that order in float64 (NumPy's cumsum),
//              NaN unless every valid pixel's box value is finite;
//   peak[c]  = largest non-NaN valid value of channel c (-inf when none), as a double, out as
//              (channels, rows).
// work: rows x k float32 of scratch (the ring values).

// The k-th smallest of a[0, n) (a is reordered: afterwards a[0, k) <= a[k]).
__device__ float rs_select(float* a, long long n, long long k) {
    long long lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = a[k];
        long long i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) ++i;
            while (pivot < a[j]) --j;
            if (i <= j) {
                float t = a[i];
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

// Median of a[0, n), n >= 1, as np.median of float32 (the two middle values' float32 mean).
__device__ float rs_median(float* a, long long n) {
    long long h = n / 2;
    float upper = rs_select(a, n, h);
    if (n % 2 == 1) return upper;
    float lower = a[0];
    for (long long i = 1; i < h; ++i) lower = a[i] > lower ? a[i] : lower;
    return (lower + upper) / 2.0f;
}

// 1.4826 * median(|a - med|) over a[0, n), the deviations written to d.
__device__ double rs_mad_sigma(const float* a, float* d, long long n, float med) {
    for (long long i = 0; i < n; ++i) d[i] = fabsf(a[i] - med);
    return 1.4826 * (double)rs_median(d, n);
}

// One row's clipped median and MAD-sigma (the rounds described above), its finite values first
// copied to a, with d as the deviations' scratch (both n long).
__device__ void rs_clipped_row(const float* row, float* a, float* d, long long n, int rounds, long long min_n,
                               double* med_out, double* sig_out)
{
    long long m = 0;
    for (long long i = 0; i < n; ++i) {
        if (isfinite(row[i])) a[m++] = row[i];
    }
    if (m == 0 || m < min_n) {
        *med_out = nan("");
        *sig_out = nan("");
        return;
    }
    float med = rs_median(a, m);
    double sig = rs_mad_sigma(a, d, m, med);
    for (int round = 0; round < rounds; ++round) {
        if (sig <= 0.0) break;
        const float thr = (float)(3.0 * sig);
        long long kept = 0;
        for (long long i = 0; i < m; ++i) kept += fabsf(a[i] - med) <= thr ? 1 : 0;
        if (kept < 16) break;
        long long j = 0;
        for (long long i = 0; i < m; ++i) {
            if (fabsf(a[i] - med) <= thr) a[j++] = a[i];
        }
        m = kept;
        med = rs_median(a, m);
        sig = rs_mad_sigma(a, d, m, med);
    }
    *med_out = med;
    *sig_out = sig;
}

extern "C" __global__ void clipped_mad_sigma_rows(const float* __restrict__ v, float* __restrict__ work,
                                                  double* __restrict__ med_out, double* __restrict__ out,
                                                  long long rows, long long n, int rounds, long long min_n)
{
    for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < rows;
         r += (long long)blockDim.x * gridDim.x)
        rs_clipped_row(v + r * n, work + r * 2 * n, work + r * 2 * n + n, n, rounds, min_n, med_out + r, out + r);
}

__device__ float ap_box(const float* planes, long long p, int channels, long long plane) {
    float box = planes[p];
    for (int c = 1; c < channels; ++c) box = box + planes[c * plane + p];
    return box;
}

extern "C" __global__ void aperture_measure(const float* __restrict__ planes, const long long* __restrict__ index,
                                            const bool* __restrict__ valid, const bool* __restrict__ inside,
                                            const bool* __restrict__ ring, double* __restrict__ flux,
                                            double* __restrict__ peak, float* __restrict__ work, long long rows,
                                            long long k, int channels, long long plane)
{
    for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < rows;
         r += (long long)blockDim.x * gridDim.x) {
        const long long o = r * k;
        float* ringv = work + o;
        long long n_ring = 0;
        bool all = true;
        for (int c = 0; c < channels; ++c) peak[c * rows + r] = -(double)__int_as_float(0x7f800000);
        for (long long j = 0; j < k; ++j) {
            const long long p = index[o + j];
            const float box = ap_box(planes, p, channels, plane);
            if (valid[o + j] && !isfinite(box)) all = false;
            if (ring[o + j] && !isnan(box)) ringv[n_ring++] = box;
            if (!valid[o + j]) continue;
            for (int c = 0; c < channels; ++c) {
                const float v = planes[c * plane + p];
                if (!isnan(v) && (double)v > peak[c * rows + r]) peak[c * rows + r] = (double)v;
            }
        }
        const float bg = n_ring > 0 ? rs_median(ringv, n_ring) : nanf("");
        double sum = 0.0;
        for (long long j = 0; j < k; ++j) {
            const double d = inside[o + j] ? (double)(ap_box(planes, index[o + j], channels, plane) - bg) : 0.0;
            sum = j == 0 ? d : sum + d;
        }
        flux[r] = all ? sum : nan("");
    }
}

// highpass_residuals -- one thread per output value. Twin: normalize._residuals_twin. Sub-grid g =
// py * k + px (k = 1, or 2 for a Bayer mosaic's colours) of x (h x w float32) is x[py::k, px::k],
// hg x wg pixels; its rows 1, 1 + rstep, ... below hg - 1 (rstep = max(1, hg * wg / sample)) and
// columns 1 .. wg - 2 give r = c - 0.25f * (((up + down) + left) + right), each in float32 in that
// order (the neighbours are the sub-grid's). out: (k * k) x n, row g holding grid g's residuals in
// row-major order, NaN after them.
__device__ void hp_grid(long long h, long long w, int k, int g, long long sample, long long* hg, long long* wg,
                        long long* rstep, long long* count)
{
    const int py = g / k, px = g % k;
    *hg = (h - py + k - 1) / k;
    *wg = (w - px + k - 1) / k;
    const long long size = *hg * *wg;
    *rstep = size / sample > 1 ? size / sample : 1;
    const long long rows = *hg >= 3 ? (*hg - 2 + *rstep - 1) / *rstep : 0;
    *count = *wg >= 3 ? rows * (*wg - 2) : 0;
}

extern "C" __global__ void highpass_residuals(const float* __restrict__ x, float* __restrict__ out, long long h,
                                              long long w, int k, long long sample, long long n)
{
    const long long total = (long long)k * k * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const int g = (int)(i / n);
        const long long j = i % n;
        long long hg, wg, rstep, count;
        hp_grid(h, w, k, g, sample, &hg, &wg, &rstep, &count);
        if (j >= count) {
            out[i] = nanf("");
            continue;
        }
        const long long row = 1 + (j / (wg - 2)) * rstep, col = 1 + j % (wg - 2);
        const long long y = g / k + k * row, xx = g % k + k * col;
        const float c = x[y * w + xx];
        const float up = x[(y - k) * w + xx], down = x[(y + k) * w + xx];
        const float left = x[y * w + xx - k], right = x[y * w + xx + k];
        out[i] = c - 0.25f * (((up + down) + left) + right);
    }
}
