// combine.cu -- per-pixel iterative kappa-sigma clipped (weighted) mean of an (N, H, W) tile.
//
// One thread per pixel i (grid-stride). For frame f the value is
// v = cube[f*npix + i] * scale[f] + offset[f]; non-finite v (NaN = no data, or inf)
// is not data. Clipping (like Siril's sigma clipping):
//   kept = all valid values; repeat at most max_iter times:
//     centre = median(kept), mean = sum(kept)/n (sums in frame order),
//     sigma = sqrt(sum((kept - mean)^2)/n)  (ddof = 0),
//     drop v < centre - kappa_low*sigma and v > centre + kappa_high*sigma;
//     stop when nothing changes, or keep the previous set and stop when fewer
//     than 3 values would remain (a pixel never drops below 3 kept values).
// Then mean_out = sum(w*v)/sum(w) over kept values (frame order; NaN when none),
// count_out = kept count, rejected[f] += 1 for each valid value of frame f dropped.
// All arithmetic is float32 with no fused multiply-add, so the NumPy twin
// (skystack.engine.combine._sigma_clip_mean_numpy) gives the same bits.
//
// The kept set is always the valid values inside a value interval, so the
// valid values are sorted once (heapsort, in a per-thread array of MAX_FRAMES)
// and the kept set is the index range [a, b) of the sorted array.

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

extern "C" __global__ void sigma_clip_mean(
    const float* __restrict__ cube, long long npix, int nframes,
    const float* __restrict__ scale, const float* __restrict__ offset,
    const float* __restrict__ weights,
    float kappa_low, float kappa_high, int max_iter,
    float* __restrict__ mean_out, int* __restrict__ count_out,
    unsigned long long* __restrict__ rejected)
{
    float s[MAX_FRAMES];
    const float nan = __int_as_float(0x7fc00000);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < npix;
         i += (long long)blockDim.x * gridDim.x) {
        if (nframes > MAX_FRAMES) {  // the caller picks MAX_FRAMES >= nframes
            mean_out[i] = nan;
            count_out[i] = -1;
            continue;
        }
        int n = 0;
        for (int f = 0; f < nframes; ++f) {
            const float v = cube[f * npix + i] * scale[f] + offset[f];
            if (isfinite(v)) s[n++] = v;
        }
        combine_heap_sort(s, n);
        int a = 0, b = n;
        for (int it = 0; it < max_iter && b - a >= 3; ++it) {
            const int cnt = b - a;
            const float centre = (s[a + (cnt - 1) / 2] + s[a + cnt / 2]) * 0.5f;
            const float lo_v = s[a], hi_v = s[b - 1];
            float sum = 0.0f;
            for (int f = 0; f < nframes; ++f) {
                const float v = cube[f * npix + i] * scale[f] + offset[f];
                if (isfinite(v) && v >= lo_v && v <= hi_v) sum += v;
            }
            const float mean = sum / (float)cnt;
            float ss = 0.0f;
            for (int f = 0; f < nframes; ++f) {
                const float v = cube[f * npix + i] * scale[f] + offset[f];
                if (isfinite(v) && v >= lo_v && v <= hi_v) {
                    const float d = v - mean;
                    ss += d * d;
                }
            }
            const float sigma = sqrtf(ss / (float)cnt);
            const float lo = centre - kappa_low * sigma;
            const float hi = centre + kappa_high * sigma;
            int a2 = a, b2 = b;
            while (a2 < b2 && s[a2] < lo) ++a2;
            while (b2 > a2 && s[b2 - 1] > hi) --b2;
            if (b2 - a2 < 3 || (a2 == a && b2 == b)) break;
            a = a2;
            b = b2;
        }
        const int cnt = b - a;
        float acc = 0.0f, wsum = 0.0f;
        if (cnt > 0) {
            const float lo_v = s[a], hi_v = s[b - 1];
            for (int f = 0; f < nframes; ++f) {
                const float v = cube[f * npix + i] * scale[f] + offset[f];
                if (!isfinite(v)) continue;
                if (v >= lo_v && v <= hi_v) {
                    acc += weights[f] * v;
                    wsum += weights[f];
                } else {
                    atomicAdd(&rejected[f], 1ULL);
                }
            }
        }
        mean_out[i] = wsum > 0.0f ? acc / wsum : nan;
        count_out[i] = cnt;
    }
}
