// combine.cu -- per-pixel rejection + (weighted) mean of an (N, H, W) tile, one kernel per
// rejection method (each documented exactly by its module in skystack.engine.rejection).
//
// Every kernel: one thread per pixel i (grid-stride). For frame f the value is
// v = cube[f*npix + i] * scale[f] + offset[f]; non-finite v (NaN = no data, or inf)
// is not data. The method picks the kept values; then
// mean_out = sum(w*v)/sum(w) over kept values (frame order; NaN when none),
// count_out = kept count, rejected[f] += 1 for each valid value of frame f dropped.
// A rejection round never leaves fewer than 3 kept values (2 for sigma and winsorized;
// such a round is not applied and rejection stops) and max_iter = 0 turns rejection off.
// All arithmetic is float32 with no fused multiply-add and every sum runs in a
// fixed order, so the NumPy twins (skystack.engine.rejection) give the same bits.
//
//   sigma_clip_mean       kappa-sigma clipping (median centre, MAD sigma), iterated
//   winsorized_clip_mean  winsorized sigma clipping (Huber sigma from a MAD start, 1.134 correction), iterated
//   linear_fit_clip_mean  line fitted to the sorted values vs rank, mean |residual|, iterated
//   gesd_clip_mean        generalized extreme Studentized deviate test (critical values from the host)
//   percentile_clip_mean  one pass: keep median*(1 - kappa_low) .. median*(1 + kappa_high)
//   minmax_clip_mean      drop the k_low lowest and k_high highest values
//   median_combine        median of the valid values (weights ignored, nothing rejected)
//
// sigma_clip_mean: kept = all valid values; repeat at most max_iter times:
//     centre = median(kept); sigma = combine_mad_sigma (1.4826 b_m MAD, robust: an
//     outlier cannot inflate it) in the first round, the std of the kept values
//     (ddof 0, rank order) after it; stop if sigma is 0;
//     kept = the valid values (all of them, so a value the noisy MAD dropped may
//     come back) within [centre - kappa_low*sigma, centre + kappa_high*sigma];
//     stop when nothing changes, or keep the previous set and stop when fewer
//     than 2 values would remain.
// The kept set is always the valid values inside a value interval, so the
// valid values are sorted once (counting ranks up to COMBINE_SMALL frames, else a
// heapsort; in a per-thread array of MAX_FRAMES) and the kept set is the index range
// [a, b) of the sorted array.
//
// The other kernels sort (value, frame) pairs -- ties in frame order, like a stable
// sort -- so a rank maps to one frame even where values repeat (minmax, linear fit);
// their sums run in rank order.
//
// Each kernel runs combine_pixel on its pixels: load and sort the valid values, take its
// method's kept rank range (the method's function just above the kernel) and write the
// result (combine_finish). Adding a method: its function, its kernel, a case in combine_pixel.

// The compile check also builds the smallest and largest sizes engine/combine.py picks:
// compile-check-defines: MAX_FRAMES=64
// compile-check-defines: MAX_FRAMES=4096

#ifndef MAX_FRAMES
#define MAX_FRAMES 256
#endif

__device__ void combine_sift_down(float* s, int root, int n)
{
    const float x = s[root];
    for (;;) {
        int child = 2 * root + 1;
        if (child >= n) break;
        if (child + 1 < n && s[child + 1] > s[child]) child += 1;
        if (!(s[child] > x)) break;
        s[root] = s[child];
        root = child;
    }
    s[root] = x;
}

__device__ void combine_heap_sort(float* s, int n)
{
    for (int start = n / 2 - 1; start >= 0; --start) combine_sift_down(s, start, n);
    for (int end = n - 1; end > 0; --end) {
        const float t = s[0];
        s[0] = s[end];
        s[end] = t;
        combine_sift_down(s, 0, end);
    }
}

// sigma and winsorized (robust centre and scale) may reject down to this many kept values,
// so one value out of 3 can go; the other methods stop at 3 (engine/combine.py ROBUST_MIN_KEPT).
#define COMBINE_ROBUST_MIN_KEPT 2

#ifndef WINSOR_MAX_ITER
#define WINSOR_MAX_ITER 50  // engine/combine.py WINSOR_MAX_ITER: most rounds of the Huber sigma loop
#endif

// Median of the sorted values s[a..b) (b > a): the mean of the two middle values.
__device__ float combine_median(const float* s, int a, int b)
{
    const int cnt = b - a;
    return (s[a + (cnt - 1) / 2] + s[a + cnt / 2]) * 0.5f;
}

// Small-sample consistency factor of the MAD (Croux & Rousseeuw 1992): b_m for m values.
__device__ float combine_mad_factor(int m)
{
    switch (m) {
    case 2: return 1.196f;
    case 3: return 1.495f;
    case 4: return 1.363f;
    case 5: return 1.206f;
    case 6: return 1.200f;
    case 7: return 1.140f;
    case 8: return 1.129f;
    case 9: return 1.107f;
    default: return (float)m / ((float)m - 0.8f);
    }
}

// Robust sigma of the sorted values s[a..b) (b - a >= 2) around their median c:
// 1.4826 * b_m * median(|s - c|). The deviations below and above c are each sorted
// already (outwards from c), so a merge walks them in ascending order.
__device__ float combine_mad_sigma(const float* s, int a, int b, float c)
{
    const int m = b - a;
    int lo = a + (m - 1) / 2, hi = lo + 1;  // s[lo] <= c <= s[hi]
    const int k1 = (m - 1) / 2, k2 = m / 2;
    float d1 = 0.0f, d = 0.0f;
    for (int k = 0; k <= k2; ++k) {
        const float dl = lo >= a ? fabsf(s[lo] - c) : __int_as_float(0x7f800000);
        const float dh = hi < b ? fabsf(s[hi] - c) : __int_as_float(0x7f800000);
        if (dl <= dh) {
            d = dl;
            --lo;
        } else {
            d = dh;
            ++hi;
        }
        if (k == k1) d1 = d;
    }
    const float mad = (d1 + d) * 0.5f;
    return 1.4826f * combine_mad_factor(m) * mad;
}

// (value, frame) pairs in ascending order: by value, ties by frame index.
__device__ bool combine_pair_greater(float va, unsigned short ia, float vb, unsigned short ib)
{
    return va > vb || (va == vb && ia > ib);
}

__device__ void combine_pair_sift_down(float* s, unsigned short* id, int root, int n)
{
    const float x = s[root];
    const unsigned short xi = id[root];
    for (;;) {
        int child = 2 * root + 1;
        if (child >= n) break;
        if (child + 1 < n && combine_pair_greater(s[child + 1], id[child + 1], s[child], id[child])) child += 1;
        if (!combine_pair_greater(s[child], id[child], x, xi)) break;
        s[root] = s[child];
        id[root] = id[child];
        root = child;
    }
    s[root] = x;
    id[root] = xi;
}

// Heapsort of n (value, frame) pairs; equal values end up in frame order (as a stable sort).
__device__ void combine_pair_sort(float* s, unsigned short* id, int n)
{
    for (int start = n / 2 - 1; start >= 0; --start) combine_pair_sift_down(s, id, start, n);
    for (int end = n - 1; end > 0; --end) {
        const float t = s[0];
        const unsigned short ti = id[0];
        s[0] = s[end];
        id[0] = id[end];
        s[end] = t;
        id[end] = ti;
        combine_pair_sift_down(s, id, 0, end);
    }
}

// Normalised value of frame f at pixel i (non-finite: no data).
__device__ float combine_value(const float* cube, long long npix, long long i, int f,
                               const float* scale, const float* offset)
{
    return cube[f * npix + i] * scale[f] + offset[f];
}

// Up to this many frames the values are sorted by counting ranks: O(n^2) compares, but without
// data-dependent branches (a heapsort or an insertion sort mispredicts about once a value).
// Native build, one core, GESD per value: 80 frames 17.8 ns against the heapsort's 51; 300
// frames 55 against 75; even at ~500. The buffers are sized by it (within MAX_FRAMES). Native
// builds sort up to COMBINE_NET_MAX frames with a sorting network instead (combine_block): the
// GPU keeps one thread a pixel, and a thread's network would not fit its registers.
#ifndef COMBINE_SMALL
#define COMBINE_SMALL (MAX_FRAMES < 384 ? MAX_FRAMES : 384)
#endif

// Rank sort of the t[0..n) (values loaded in frame order, tf their frames) into s and id:
// value t[k] goes to the number of values below it plus the equal ones of earlier frames,
// so equal values keep frame order (the pairs combine_pair_sort gives).
__device__ void combine_rank_sort(const float* t, const unsigned short* tf, int n, float* s,
                                  unsigned short* id)
{
    for (int k = 0; k < n; ++k) {
        const float x = t[k];
        int r = 0;
        for (int j = 0; j < k; ++j) r += t[j] <= x ? 1 : 0;
        for (int j = k + 1; j < n; ++j) r += t[j] < x ? 1 : 0;
        s[r] = x;
        id[r] = tf[k];
    }
}

// Loads the valid normalised values of pixel i and sorts them (ascending); returns how many there
// are. Their frames go to id (equal values in frame order) unless values_only (sigma, whose kept
// set is a value interval): then, above COMBINE_SMALL frames, a heapsort of the values alone sorts
// them and id is left unset.
__device__ int combine_load_sorted(const float* cube, long long npix, long long i, int nframes,
                                   const float* scale, const float* offset, float* s, unsigned short* id,
                                   bool values_only)
{
    if (nframes <= COMBINE_SMALL) {
        float t[COMBINE_SMALL];
        unsigned short tf[COMBINE_SMALL];
        int n = 0;
        for (int f = 0; f < nframes; ++f) {
            const float v = combine_value(cube, npix, i, f, scale, offset);
            t[n] = v;
            tf[n] = (unsigned short)f;
            n += isfinite(v) ? 1 : 0;
        }
        combine_rank_sort(t, tf, n, s, id);
        return n;
    }
    int n = 0;
    for (int f = 0; f < nframes; ++f) {
        const float v = combine_value(cube, npix, i, f, scale, offset);
        if (isfinite(v)) {
            s[n] = v;
            if (!values_only) id[n] = (unsigned short)f;
            ++n;
        }
    }
    if (values_only) {
        combine_heap_sort(s, n);
    } else {
        combine_pair_sort(s, id, n);
    }
    return n;
}

// Sample standard deviation of s[a..b) with divisor (b - a - ddof) (sums in rank order).
__device__ float combine_std(const float* s, int a, int b, int ddof)
{
    const float cntf = (float)(b - a);
    float sum = 0.0f;
    for (int r = a; r < b; ++r) sum += s[r];
    const float mean = sum / cntf;
    float ss = 0.0f;
    for (int r = a; r < b; ++r) {
        const float d = s[r] - mean;
        ss += d * d;
    }
    return sqrtf(ss / (float)(b - a - ddof));
}

// Shrinks the kept rank range [a, b) of the sorted s to the values in [lo, hi].
__device__ void combine_clip_range(const float* s, int a, int b, float lo, float hi, int* a2, int* b2)
{
    int na = a, nb = b;
    while (na < nb && s[na] < lo) ++na;
    while (nb > na && s[nb - 1] > hi) --nb;
    *a2 = na;
    *b2 = nb;
}

// Writes the pixel's result: the weighted mean (frame order) of the kept values, their count
// b - a, and a rejection for each valid value not kept. Kept: the frames id[a..b) (s is reused as
// a per-frame flag), or, by_value (sigma: its kept set is every valid value in an interval), the
// valid values in [s[a], s[b-1]].
__device__ void combine_finish(const float* cube, long long npix, long long i, int nframes,
                               const float* scale, const float* offset, const float* weights,
                               float* s, const unsigned short* id, int a, int b, bool by_value,
                               float* mean_out, int* count_out, unsigned long long* rejected)
{
    float lo_v = __int_as_float(0x7f800000), hi_v = -lo_v;  // by value, nothing kept: an empty interval
    if (by_value && b > a) {
        lo_v = s[a];
        hi_v = s[b - 1];
    } else if (!by_value) {
        for (int f = 0; f < nframes; ++f) s[f] = 0.0f;
        for (int r = a; r < b; ++r) s[id[r]] = 1.0f;
    }
    float acc = 0.0f, wsum = 0.0f;
    for (int f = 0; f < nframes; ++f) {
        const float v = combine_value(cube, npix, i, f, scale, offset);
        if (!isfinite(v)) continue;
        if (by_value ? v >= lo_v && v <= hi_v : s[f] != 0.0f) {
            acc += weights[f] * v;
            wsum += weights[f];
        } else {
            atomicAdd(&rejected[f], 1ULL);
        }
    }
    mean_out[i] = wsum > 0.0f ? acc / wsum : __int_as_float(0x7fc00000);
    count_out[i] = b - a;
}

// A tile with more frames than this build holds: mark the pixel (count -1, NaN).
__device__ bool combine_refuse(int nframes, long long i, float* mean_out, int* count_out)
{
    if (nframes <= MAX_FRAMES) return false;  // the caller picks MAX_FRAMES >= nframes
    mean_out[i] = __int_as_float(0x7fc00000);
    count_out[i] = -1;
    return true;
}

// ------------------------------------------------------------------------------------ the kernels
// Every combine kernel takes these parameters (GESD adds its critical values between the two
// lists) and runs combine_pixel<its method> (defined after the methods, at the end) on each
// of its pixels.
#define COMBINE_TILE_PARAMS \
    const float* __restrict__ cube, long long npix, int nframes, const float* __restrict__ scale, \
    const float* __restrict__ offset, const float* __restrict__ weights
#define COMBINE_CLIP_PARAMS \
    float kappa_low, float kappa_high, int max_iter, float* __restrict__ mean_out, int* __restrict__ count_out, \
    unsigned long long* __restrict__ rejected

#define COMBINE_SIGMA 0
#define COMBINE_WINSORIZED 1
#define COMBINE_LINEAR 2
#define COMBINE_GESD 3
#define COMBINE_PERCENTILE 4
#define COMBINE_MINMAX 5
#define COMBINE_MEDIAN 6

template <int METHOD>
__device__ __forceinline__ void combine_pixel(const float* cube, long long npix, long long i, int nframes,
                                              const float* scale, const float* offset, const float* weights,
                                              const float* lambda, float kappa_low, float kappa_high, int max_iter,
                                              float* mean_out, int* count_out, unsigned long long* rejected);

#ifdef SKYSTACK_NATIVE
template <int METHOD>
static void combine_block(const float* cube, long long npix, long long i0, int cnt, int nframes,
                          const float* scale, const float* offset, const float* weights, const float* lambda,
                          float kappa_low, float kappa_high, int max_iter, float* mean_out, int* count_out,
                          unsigned long long* rejected);
#ifdef __AVX2__  // a native build for AVX2 (kernels/native.py, host_isa): eight floats a vector
#define COMBINE_LANES 8
#else
#define COMBINE_LANES 4
#endif

// The loop body of a native build: the block from item i (to the end of the chunk), then i moves
// to the block's last item (the loop's ++i steps past it).
#define COMBINE_BODY(METHOD, LAMBDA)                                                                   \
    {                                                                                                  \
        const long long last = skystack_item_end < npix ? skystack_item_end : npix;                    \
        const int cnt = (int)(last - i < COMBINE_LANES ? last - i : COMBINE_LANES);                    \
        combine_block<METHOD>(cube, npix, i, cnt, nframes, scale, offset, weights, LAMBDA, kappa_low,  \
                              kappa_high, max_iter, mean_out, count_out, rejected);                    \
        i += cnt - 1;                                                                                  \
    }
#else
#define COMBINE_BODY(METHOD, LAMBDA)                                                                   \
    combine_pixel<METHOD>(cube, npix, i, nframes, scale, offset, weights, LAMBDA, kappa_low, kappa_high, \
                          max_iter, mean_out, count_out, rejected);
#endif

// Winsorized sigma (Huber, as Siril's) of the sorted kept values s[a..b) around their median
// centre, from the start sigma: repeat at most WINSOR_MAX_ITER times L = max(L, centre - 1.5 sigma),
// U = min(U, centre + 1.5 sigma) (L, U start at -inf, +inf), w = the values clamped to [L, U],
// sigma' = 1.134 * std(w), stop once |sigma' - sigma| <= 0.0005 sigma. The std here divides by
// (n - 1), as Siril's does.
__device__ __forceinline__ float combine_winsorized_sigma(const float* s, int a, int b, float centre, float sigma)
{
    const float inf = __int_as_float(0x7f800000);
    const float cntf = (float)(b - a);
    const float dof = (float)(b - a - 1);
    float lo_w = -inf, hi_w = inf;
    for (int j = 0; j < WINSOR_MAX_ITER; ++j) {
        lo_w = fmaxf(lo_w, centre - 1.5f * sigma);
        hi_w = fminf(hi_w, centre + 1.5f * sigma);
        float sum = 0.0f;
        for (int r = a; r < b; ++r) sum += fminf(hi_w, fmaxf(lo_w, s[r]));
        const float mean_w = sum / cntf;
        float ss = 0.0f;
        for (int r = a; r < b; ++r) {
            const float d = fminf(hi_w, fmaxf(lo_w, s[r])) - mean_w;
            ss += d * d;
        }
        const float sigma0 = sigma;
        sigma = 1.134f * sqrtf(ss / dof);
        if (!(fabsf(sigma - sigma0) > sigma0 * 0.0005f)) break;
    }
    return sigma;
}

// The rounds of sigma and winsorized clipping on the n sorted valid values s: the kept rank
// range [*pa, *pb). Per round (while b - a >= 3): centre = median(kept); sigma = the MAD-sigma
// of the kept values (stop if 0), then for sigma clipping after the first round the std of the
// kept values (ddof 0, rank order) instead, for winsorized the winsorized sigma from the MAD
// start; keep the values in [centre - kappa_low*sigma, centre + kappa_high*sigma], out of all
// the valid values for sigma clipping (a value the noisy MAD dropped may come back) and out of
// the kept ones for winsorized. Stop when nothing changes, or keep the previous set and stop
// when fewer than COMBINE_ROBUST_MIN_KEPT values would remain.
__device__ __forceinline__ void combine_robust_rounds(bool winsorized, const float* s, int n, float kappa_low,
                                                      float kappa_high, int max_iter, int* pa, int* pb)
{
    int a = 0, b = n;
    for (int it = 0; it < max_iter && b - a >= 3; ++it) {
        const float centre = combine_median(s, a, b);
        float sigma = it == 0 || winsorized ? combine_mad_sigma(s, a, b, centre) : combine_std(s, a, b, 0);
        if (!(sigma > 0.0f)) break;
        if (winsorized) sigma = combine_winsorized_sigma(s, a, b, centre, sigma);
        int a2, b2;
        combine_clip_range(s, winsorized ? a : 0, winsorized ? b : n, centre - kappa_low * sigma,
                           centre + kappa_high * sigma, &a2, &b2);
        if (b2 - a2 < COMBINE_ROBUST_MIN_KEPT || (a2 == a && b2 == b)) break;
        a = a2;
        b = b2;
    }
    *pa = a;
    *pb = b;
}

// Kappa-sigma clipping: combine_robust_rounds (median centre, MAD sigma first, then the std).
extern "C" __global__ void sigma_clip_mean(COMBINE_TILE_PARAMS, COMBINE_CLIP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < npix;
         i += (long long)blockDim.x * gridDim.x)
        COMBINE_BODY(COMBINE_SIGMA, nullptr)
}

// Winsorized sigma clipping (Siril's, from a robust start): combine_robust_rounds with the
// winsorized sigma. A round may leave 2 values.
extern "C" __global__ void winsorized_clip_mean(COMBINE_TILE_PARAMS, COMBINE_CLIP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < npix;
         i += (long long)blockDim.x * gridDim.x)
        COMBINE_BODY(COMBINE_WINSORIZED, nullptr)
}

// Linear fit clipping (Siril): per round, with the m kept values sorted (s[0..m), x = rank
// 0..m-1), fit s = ym + slope*(x - xm) by least squares (xm = (m-1)/2, ym = mean,
// slope = sum((x-xm)(s-ym)) / sum((x-xm)^2)), sigma = mean |s - fit|, and drop values
// with fit - s > kappa_low*sigma or s - fit > kappa_high*sigma. The kept values are
// compacted (still sorted, with their frames id) after each round; returns how many are kept.
__device__ __forceinline__ int combine_linear_fit_rounds(float* s, unsigned short* id, int m, float kappa_low,
                                                         float kappa_high, int max_iter)
{
    for (int it = 0; it < max_iter && m >= 3; ++it) {
        const float mf = (float)m;
        const float xm = (float)(m - 1) * 0.5f;
        float sum = 0.0f;
        for (int j = 0; j < m; ++j) sum += s[j];
        const float ym = sum / mf;
        const float sxx = mf * (mf * mf - 1.0f) / 12.0f;  // sum((j - xm)^2)
        float sxy = 0.0f;
        for (int j = 0; j < m; ++j) sxy += ((float)j - xm) * (s[j] - ym);
        const float slope = sxy / sxx;
        float sad = 0.0f;
        for (int j = 0; j < m; ++j) {
            const float fit = ym + slope * ((float)j - xm);
            sad += fabsf(s[j] - fit);
        }
        const float sigma = sad / mf;
        const float lo_k = kappa_low * sigma, hi_k = kappa_high * sigma;
        int kept = 0;
        for (int j = 0; j < m; ++j) {
            const float fit = ym + slope * ((float)j - xm);
            if (!(fit - s[j] > lo_k) && !(s[j] - fit > hi_k)) ++kept;
        }
        if (kept < 3 || kept == m) break;
        int k = 0;
        for (int j = 0; j < m; ++j) {
            const float fit = ym + slope * ((float)j - xm);
            if (!(fit - s[j] > lo_k) && !(s[j] - fit > hi_k)) {
                s[k] = s[j];
                id[k] = id[j];
                ++k;
            }
        }
        m = k;
    }
    return m;
}

extern "C" __global__ void linear_fit_clip_mean(COMBINE_TILE_PARAMS, COMBINE_CLIP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < npix;
         i += (long long)blockDim.x * gridDim.x)
        COMBINE_BODY(COMBINE_LINEAR, nullptr)
}

// Sums over the shifted sorted values d[a..b) in rank order: *s1 = sum(d), *s2 = sum(d*d).
__device__ void combine_shifted_sums(const float* d, int a, int b, float* s1, float* s2)
{
    float t1 = 0.0f, t2 = 0.0f;
    for (int r = a; r < b; ++r) {
        t1 += d[r];
        t2 += d[r] * d[r];
    }
    *s1 = t1;
    *s2 = t2;
}

// Generalized ESD (Rosner 1983), max_iter >= 1: with the n valid values sorted and the kept
// set a rank range [a, b), repeat r = (int)(kappa_low * n) times (kappa_low: the most outliers,
// as a fraction of n) while b - a >= 3: mean and std (ddof 1) of the kept values; the most
// extreme one (the high end where mean - s[a] <= s[b-1] - mean) has the deviation dev; step j
// is significant if dev > lambda[b - a] * std; drop that value. The outliers are the values
// dropped up to the last significant step (none if none is): the kept range is [*pa, *pb).
// lambda[m] is the host's critical value for m values (kappa_high, the significance, only sets it).
// The statistics run on d = s - k, k = s[(n-1)/2] (the sorted middle value), from running sums
// S1 = sum(d), S2 = sum(d^2) (rank order): mean = k + S1/m, std = sqrt(max(0, (S2 - S1*(S1/m))
// / (m-1))), so a step costs O(1). Dropping d subtracts d and d^2; where d^2 > S2/2 (a large
// outlier: the difference would lose bits) the sums are recomputed over the new range instead.
// s is left holding d (combine_finish needs only the frames).
__device__ __forceinline__ void combine_gesd(float* s, int n, const float* lambda, float kappa_low, int max_iter,
                                             int* pa, int* pb)
{
    const int r = max_iter > 0 ? (int)(kappa_low * (float)n) : 0;
    int a = 0, b = n, a_out = 0, b_out = n;
    if (r > 0 && n >= 3) {
        const float k = s[(n - 1) / 2];
        for (int q = 0; q < n; ++q) s[q] -= k;
        float s1, s2;
        combine_shifted_sums(s, 0, n, &s1, &s2);
        for (int j = 1; j <= r && b - a >= 3; ++j) {
            const float mf = (float)(b - a);
            const float md = s1 / mf;
            const float sd = sqrtf(fmaxf((s2 - s1 * md) / (mf - 1.0f), 0.0f));
            const float lo_d = md - s[a], hi_d = s[b - 1] - md;
            const bool high = hi_d >= lo_d;
            const bool hit = (high ? hi_d : lo_d) > lambda[b - a] * sd;
            const float x = high ? s[b - 1] : s[a];
            if (high) --b; else ++a;
            if (hit) {
                a_out = a;
                b_out = b;
            }
            const float x2 = x * x;
            if (x2 > s2 * 0.5f) {
                combine_shifted_sums(s, a, b, &s1, &s2);
            } else {
                s1 -= x;
                s2 -= x2;
            }
        }
    }
    *pa = a_out;
    *pb = b_out;
}

extern "C" __global__ void gesd_clip_mean(COMBINE_TILE_PARAMS, const float* __restrict__ lambda, COMBINE_CLIP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < npix;
         i += (long long)blockDim.x * gridDim.x)
        COMBINE_BODY(COMBINE_GESD, lambda)
}

// Percentile clipping (Siril), one pass (max_iter >= 1): c = median of the n valid values;
// unless c == 0, drop values below c - kappa_low*|c| or above c + kappa_high*|c|, where at
// least 3 remain: the kept range [*pa, *pb) (left as it is otherwise).
__device__ __forceinline__ void combine_percentile(const float* s, int n, float kappa_low, float kappa_high,
                                                   int max_iter, int* pa, int* pb)
{
    if (max_iter > 0 && n >= 3) {
        const float centre = combine_median(s, 0, n);
        if (centre != 0.0f) {
            const float ac = fabsf(centre);
            int a2, b2;
            combine_clip_range(s, 0, n, centre - kappa_low * ac, centre + kappa_high * ac, &a2, &b2);
            if (b2 - a2 >= 3) {
                *pa = a2;
                *pb = b2;
            }
        }
    }
}

extern "C" __global__ void percentile_clip_mean(COMBINE_TILE_PARAMS, COMBINE_CLIP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < npix;
         i += (long long)blockDim.x * gridDim.x)
        COMBINE_BODY(COMBINE_PERCENTILE, nullptr)
}

// Values min/max rejection drops on one side: (int)kappa for kappa >= 1 (at most MAX_FRAMES), else 1.
__device__ __forceinline__ int combine_minmax_count(float kappa)
{
    return kappa >= 1.0f ? (kappa < (float)MAX_FRAMES ? (int)kappa : MAX_FRAMES) : 1;
}

// Min/max rejection (max_iter >= 1): drop the k_low lowest and k_high highest valid values
// (combine_minmax_count; ties in frame order); no rejection unless at least 3 values remain.
extern "C" __global__ void minmax_clip_mean(COMBINE_TILE_PARAMS, COMBINE_CLIP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < npix;
         i += (long long)blockDim.x * gridDim.x)
        COMBINE_BODY(COMBINE_MINMAX, nullptr)
}

// Median combine: the median of the n sorted valid values (NaN if none), count n, nothing rejected
// (weights, kappas and max_iter unused).
__device__ __forceinline__ void combine_write_median(const float* s, int n, long long i, float* mean_out,
                                                     int* count_out)
{
    mean_out[i] = n > 0 ? combine_median(s, 0, n) : __int_as_float(0x7fc00000);
    count_out[i] = n;
}

extern "C" __global__ void median_combine(COMBINE_TILE_PARAMS, COMBINE_CLIP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < npix;
         i += (long long)blockDim.x * gridDim.x)
        COMBINE_BODY(COMBINE_MEDIAN, nullptr)
}

// Pixel i's result from its n valid values sorted in s (frames in id; s has room for nframes
// values: combine_finish reuses it as a per-frame flag): the method's kept rank range [a, b).
template <int METHOD>
__device__ __forceinline__ void combine_pixel_sorted(const float* cube, long long npix, long long i, int nframes,
                                                     const float* scale, const float* offset, const float* weights,
                                                     const float* lambda, float kappa_low, float kappa_high,
                                                     int max_iter, float* mean_out, int* count_out,
                                                     unsigned long long* rejected, float* s, unsigned short* id,
                                                     int n)
{
    int a = 0, b = n;
    switch (METHOD) {
    case COMBINE_SIGMA:
    case COMBINE_WINSORIZED:
        combine_robust_rounds(METHOD == COMBINE_WINSORIZED, s, n, kappa_low, kappa_high, max_iter, &a, &b);
        break;
    case COMBINE_LINEAR:
        b = combine_linear_fit_rounds(s, id, n, kappa_low, kappa_high, max_iter);
        break;
    case COMBINE_GESD:
        combine_gesd(s, n, lambda, kappa_low, max_iter, &a, &b);
        break;
    case COMBINE_PERCENTILE:
        combine_percentile(s, n, kappa_low, kappa_high, max_iter, &a, &b);
        break;
    case COMBINE_MINMAX: {
        const int k_low = combine_minmax_count(kappa_low), k_high = combine_minmax_count(kappa_high);
        if (max_iter > 0 && n - k_low - k_high >= 3) {
            a = k_low;
            b = n - k_high;
        }
        break;
    }
    default:  // COMBINE_MEDIAN
        combine_write_median(s, n, i, mean_out, count_out);
        return;
    }
    combine_finish(cube, npix, i, nframes, scale, offset, weights, s, id, a, b, METHOD == COMBINE_SIGMA,
                   mean_out, count_out, rejected);
}

// Pixel i of the kernel of METHOD (a template parameter, so each kernel gets its own code):
// refuse a tile too large for this build, load and sort the valid values, take the method's
// kept rank range [a, b) of them and write the result.
template <int METHOD>
__device__ __forceinline__ void combine_pixel(const float* cube, long long npix, long long i, int nframes,
                                              const float* scale, const float* offset, const float* weights,
                                              const float* lambda, float kappa_low, float kappa_high, int max_iter,
                                              float* mean_out, int* count_out, unsigned long long* rejected)
{
    if (combine_refuse(nframes, i, mean_out, count_out)) return;
    float s[MAX_FRAMES];
    unsigned short id[MAX_FRAMES];
    const int n = combine_load_sorted(cube, npix, i, nframes, scale, offset, s, id, METHOD == COMBINE_SIGMA);
    combine_pixel_sorted<METHOD>(cube, npix, i, nframes, scale, offset, weights, lambda, kappa_low, kappa_high,
                                 max_iter, mean_out, count_out, rejected, s, id, n);
}

#ifdef SKYSTACK_NATIVE
// Native builds sort the values of COMBINE_LANES neighbouring pixels at once, up to
// COMBINE_NET_MAX frames: Batcher's odd-even merge sorting network (of the next power of two;
// comparators reaching past the n frames dropped) on vectors of one frame's values of the
// pixels, each compare-exchange ordering (value, frame) pairs -- the order combine_rank_sort
// gives. A missing value (not finite) enters as (+inf, frame + nframes), after every valid one.
// Built for AVX2, eight pixels share a vector, else four. One core, AVX2, old
// and new builds in turn, ns a value at 20 / 40 / 80 frames (rank sort before): GESD 13.6 /
// 19.2 / 18.3 -> 12.6 / 11.3 / 9.6, sigma 12.2 / 15.4 / 17.3 -> 9.8 / 11.3 / 9.9, median 6.4 /
// 8.1 / 12.7 -> 3.0 / 4.4 / 4.7; at 150 / 300 frames (radix sort before): GESD 20.1 / 23.2 ->
// 14.0 / 13.1, median 16.6 / 13.7 -> 7.1 / 9.0.
#define COMBINE_NET_MAX COMBINE_SMALL  // at most 384 frames: networks of at most 512 inputs

struct CombineNet {
    int n = -1;
    int m = 0;
    unsigned short a[9728], b[9728];  // comparators of a network of <= 512 inputs (9727 for 512)
};

static void combine_net_build(CombineNet* net, int n)
{
    int p = 1;
    while (p < n) p <<= 1;
    net->m = 0;
    for (int pp = 1; pp < p; pp <<= 1)
        for (int k = pp; k >= 1; k >>= 1)
            for (int j = k % pp; j + k < p; j += 2 * k)
                for (int i = 0; i < k && i + j + k < p; ++i)
                    if ((i + j) / (2 * pp) == (i + j + k) / (2 * pp) && i + j + k < n) {
                        net->a[net->m] = (unsigned short)(i + j);
                        net->b[net->m] = (unsigned short)(i + j + k);
                        ++net->m;
                    }
    net->n = n;
}

typedef float combine_vf __attribute__((vector_size(4 * COMBINE_LANES)));  // a frame's values of the pixels
typedef int combine_vi __attribute__((vector_size(4 * COMBINE_LANES)));    // and their frames

// Loads and sorts the values of the pixels [i0, i0 + cnt) (cnt <= COMBINE_LANES): v[r] holds rank r's
// value of every pixel, f[r] its frame. True when every pixel is one (cnt == COMBINE_LANES) and every
// value of each is valid.
static bool combine_net_sort(const float* cube, long long npix, long long i0, int cnt, int nframes,
                             const float* scale, const float* offset, const CombineNet* net, combine_vf* v,
                             combine_vi* f)
{
    bool full = cnt == COMBINE_LANES;
    for (int q = 0; q < nframes; ++q) {
        combine_vf x;
        combine_vi fi;
        for (int l = 0; l < COMBINE_LANES; ++l) {
            const float val = l < cnt ? combine_value(cube, npix, i0 + l, q, scale, offset)
                                      : __int_as_float(0x7fc00000);
            const bool ok = isfinite(val);
            full = full && ok;
            x[l] = ok ? val : __int_as_float(0x7f800000);
            fi[l] = ok ? q : q + nframes;
        }
        v[q] = x;
        f[q] = fi;
    }
    for (int c = 0; c < net->m; ++c) {
        const int ia = net->a[c], ib = net->b[c];
        const combine_vf va = v[ia], vb = v[ib];
        const combine_vi fa = f[ia], fb = f[ib];
        const combine_vi sw = (va > vb) | ((va == vb) & (fa > fb));
        v[ia] = sw ? vb : va;
        v[ib] = sw ? va : vb;
        f[ia] = sw ? fb : fa;
        f[ib] = sw ? fa : fb;
    }
    return full;
}

// Hands the sorted pixels out: pixel l's nv[l] valid values in s[l], their frames in id[l].
static void combine_net_hand_out(const combine_vf* v, const combine_vi* f, int cnt, int nframes,
                                 float (*s)[COMBINE_NET_MAX + 1], unsigned short (*id)[COMBINE_NET_MAX + 1], int* nv)
{
    for (int l = 0; l < cnt; ++l) {
        int n = 0;
        for (int r = 0; r < nframes; ++r) {
            s[l][r] = v[r][l];
            id[l][r] = (unsigned short)f[r][l];
            n += f[r][l] < nframes ? 1 : 0;
        }
        nv[l] = n;
    }
}

// Sums over d[a[l]..b[l]) of pixel l in rank order, for the pixels of mask: combine_shifted_sums.
static void combine_lane_sums(const combine_vf* d, const combine_vi& a, const combine_vi& b, const combine_vi& mask,
                              combine_vf* s1, combine_vf* s2)
{
    for (int l = 0; l < COMBINE_LANES; ++l) {
        if (!mask[l]) continue;
        float t1 = 0.0f, t2 = 0.0f;
        for (int r = a[l]; r < b[l]; ++r) {
            t1 += d[r][l];
            t2 += d[r][l] * d[r][l];
        }
        (*s1)[l] = t1;
        (*s2)[l] = t2;
    }
}

// combine_gesd on every pixel of a full block at once, v[r] the pixels' sorted values of rank r (all
// n = nframes valid: each step drops one value of each pixel, so every pixel has b - a values and the
// same critical value; a pixel's operations are its own in combine_gesd's order, so its bits). v is
// left holding the shifted values; the kept rank ranges go to *pa, *pb.
static void combine_gesd_lanes(combine_vf* v, int n, const float* lambda, float kappa_low, int max_iter,
                               combine_vi* pa, combine_vi* pb)
{
    const int r = max_iter > 0 ? (int)(kappa_low * (float)n) : 0;
    combine_vi a = {}, b = a + n, a_out = a, b_out = b;
    if (r > 0 && n >= 3) {
        const combine_vf k = v[(n - 1) / 2];
        for (int q = 0; q < n; ++q) v[q] -= k;
        combine_vf s1 = {}, s2 = {};
        for (int q = 0; q < n; ++q) {  // combine_shifted_sums of every pixel over [0, n)
            s1 += v[q];
            s2 += v[q] * v[q];
        }
        for (int j = 1; j <= r && b[0] - a[0] >= 3; ++j) {
            const float mf = (float)(b[0] - a[0]);
            const combine_vf md = s1 / mf;
            const combine_vf q = (s2 - s1 * md) / (mf - 1.0f);
            combine_vf sd, lo, hi;
            for (int l = 0; l < COMBINE_LANES; ++l) {
                sd[l] = sqrtf(fmaxf(q[l], 0.0f));
                lo[l] = v[a[l]][l];
                hi[l] = v[b[l] - 1][l];
            }
            const combine_vf lo_d = md - lo, hi_d = hi - md;
            const combine_vi high = hi_d >= lo_d;
            const combine_vi hit = (high ? hi_d : lo_d) > lambda[b[0] - a[0]] * sd;
            const combine_vf x = high ? hi : lo;
            b += high;  // true is -1
            a -= ~high;
            a_out = hit ? a : a_out;
            b_out = hit ? b : b_out;
            const combine_vf x2 = x * x;
            const combine_vi redo = x2 > s2 * 0.5f;  // (s2 before the drop)
            s1 -= x;
            s2 -= x2;
            combine_lane_sums(v, a, b, redo, &s1, &s2);
        }
    }
    *pa = a_out;
    *pb = b_out;
}

// combine_finish for the pixels [i0, i0 + COMBINE_LANES) of a full block (every value valid), each
// keeping the frames of its ranks [a[l], b[l]) (f[r]: the frames of rank r): the same sums in frame
// order, and one atomic add per frame for its rejected values.
static void combine_finish_lanes(const float* cube, long long npix, long long i0, int nframes, const float* scale,
                                 const float* offset, const float* weights, const combine_vi* f,
                                 const combine_vi& a, const combine_vi& b, float* mean_out, int* count_out,
                                 unsigned long long* rejected)
{
    combine_vi keep[COMBINE_NET_MAX];
    for (int r = 0; r < nframes; ++r)
        for (int l = 0; l < COMBINE_LANES; ++l) keep[f[r][l]][l] = r >= a[l] && r < b[l] ? -1 : 0;
    combine_vf acc = {}, wsum = {};
    for (int q = 0; q < nframes; ++q) {
        combine_vf x;
        __builtin_memcpy(&x, cube + q * npix + i0, sizeof x);
        const combine_vf val = x * scale[q] + offset[q];
        acc = keep[q] ? acc + weights[q] * val : acc;
        wsum = keep[q] ? wsum + weights[q] : wsum;
        int kept = 0;
        for (int l = 0; l < COMBINE_LANES; ++l) kept -= keep[q][l];
        if (kept < COMBINE_LANES) atomicAdd(&rejected[q], (unsigned long long)(COMBINE_LANES - kept));
    }
    for (int l = 0; l < COMBINE_LANES; ++l) {
        mean_out[i0 + l] = wsum[l] > 0.0f ? acc[l] / wsum[l] : __int_as_float(0x7fc00000);
        count_out[i0 + l] = b[l] - a[l];
    }
}

// The pixels [i0, i0 + cnt) (cnt <= COMBINE_LANES) of the kernel of METHOD: combine_pixel's
// results, sorted by network (one pixel at a time beyond COMBINE_NET_MAX frames); GESD on a full
// block runs its steps on every pixel at once (combine_gesd_lanes).
template <int METHOD>
static void combine_block(const float* cube, long long npix, long long i0, int cnt, int nframes,
                          const float* scale, const float* offset, const float* weights, const float* lambda,
                          float kappa_low, float kappa_high, int max_iter, float* mean_out, int* count_out,
                          unsigned long long* rejected)
{
    if (nframes > COMBINE_NET_MAX) {  // (COMBINE_NET_MAX <= MAX_FRAMES: combine_pixel refuses the rest)
        for (int l = 0; l < cnt; ++l)
            combine_pixel<METHOD>(cube, npix, i0 + l, nframes, scale, offset, weights, lambda, kappa_low, kappa_high,
                                  max_iter, mean_out, count_out, rejected);
        return;
    }
    static thread_local CombineNet net;
    if (net.n != nframes) combine_net_build(&net, nframes);
    combine_vf v[COMBINE_NET_MAX];
    combine_vi f[COMBINE_NET_MAX];
    const bool full = combine_net_sort(cube, npix, i0, cnt, nframes, scale, offset, &net, v, f);
    if (METHOD == COMBINE_GESD && full) {
        combine_vi a, b;
        combine_gesd_lanes(v, nframes, lambda, kappa_low, max_iter, &a, &b);
        combine_finish_lanes(cube, npix, i0, nframes, scale, offset, weights, f, a, b, mean_out, count_out, rejected);
        return;
    }
    float s[COMBINE_LANES][COMBINE_NET_MAX + 1];
    unsigned short id[COMBINE_LANES][COMBINE_NET_MAX + 1];
    int nv[COMBINE_LANES];
    combine_net_hand_out(v, f, cnt, nframes, s, id, nv);
    for (int l = 0; l < cnt; ++l)
        combine_pixel_sorted<METHOD>(cube, npix, i0 + l, nframes, scale, offset, weights, lambda, kappa_low,
                                     kappa_high, max_iter, mean_out, count_out, rejected, s[l], id[l], nv[l]);
}

#endif  // SKYSTACK_NATIVE
