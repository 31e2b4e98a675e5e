// robuststats.cu -- the clipped MAD-sigma of rows (normalize.robust_stats' dispersion of a
// registered frame, one row a channel), one thread per row. NumPy twin:
// robust._clipped_mad_sigma_sorted of each row's sorted finite values, whose numbers these
// give: every step is a selection (order-free) or one float32 operation as NumPy makes it.
//
// For each row of v (rows x n float32): its finite values; their median m (the middle one, or
// float32 (a + b) / 2 of the middle two, as np.median); sigma = 1.4826 * median(|x - m|), the
// deviations in float32 and the product in double. Then at most two rounds: stop if sigma <= 0;
// keep the values with |x - m| <= float(3 sigma) (NumPy compares a float32 array with a Python
// float in float32); stop if fewer than 16 are kept; else m and sigma of those. out[row] = sigma
// (NaN without finite values). work: rows x 2n float32 of scratch (kept values, deviations).

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

extern "C" __global__ void clipped_mad_sigma_rows(const float* __restrict__ v, float* __restrict__ work,
                                                  double* __restrict__ out, long long rows, long long n)
{
    for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < rows;
         r += (long long)blockDim.x * gridDim.x) {
        const float* row = v + r * n;
        float* a = work + r * 2 * n;
        float* d = a + n;
        long long m = 0;
        for (long long i = 0; i < n; ++i) {
            if (isfinite(row[i])) a[m++] = row[i];
        }
        if (m == 0) {
            out[r] = nan("");
            continue;
        }
        float med = rs_median(a, m);
        double sig = rs_mad_sigma(a, d, m, med);
        for (int round = 0; round < 2; ++round) {
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
        out[r] = sig;
    }
}
