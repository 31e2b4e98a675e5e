// warp.cu -- resample a frame into the reference grid (Lanczos-3 or bilinear).
//
// One thread per reference (output) pixel i = y * dst_w + x, all channels.
// The source position is q = Minv (x, y, 1), u = q0 / q2, v = q1 / q2, where
// Minv = inverse of the frame->reference transform (9 float scalars, row-major),
// evaluated as ((m0*x + m1*y) + m2) / ((m6*x + m7*y) + m8) in float32.
//
// Rules (shared with the NumPy twin skystack.engine.warp._warp_numpy):
// * The output is NaN (no data) when the nearest source pixel
//   (floor(u + 0.5), floor(v + 0.5)) lies outside the frame or is NaN.
//   So every reference pixel whose centre falls on a frame pixel gets data,
//   and nothing outside the frame is ever written as zero.
// * Otherwise out = sum(w * s) / sum(w) over the taps (6x6 Lanczos-3 or 2x2
//   bilinear) that lie inside the frame and are not NaN: taps beyond the edge
//   or on NaN pixels are dropped and the weights renormalised, so a flat field
//   stays flat up to the edge.
// * Lanczos-3: w(t) = 3 sin(pi t) sin(pi t / 3) / (pi t)^2, w(0) = 1, 0 for |t| >= 3;
//   taps at columns floor(u) - 2 .. floor(u) + 3 (same for rows);
//   weight = wy[j] * wx[k]; the sums run j-major, k-minor.
// * Bilinear: taps floor(u), floor(u) + 1 with weights 1 - f, f.

__device__ __forceinline__ float warp_lanczos3_w(float t)
{
    if (t == 0.0f) return 1.0f;
    if (fabsf(t) >= 3.0f) return 0.0f;
    const float pt = 3.14159265358979f * t;
    return (3.0f * sinf(pt) * sinf(pt / 3.0f)) / (pt * pt);
}

extern "C" __global__ void warp_lanczos3(
    const float* __restrict__ src, float* __restrict__ dst,
    long long n, int channels, int src_h, int src_w, int dst_w,
    float m0, float m1, float m2, float m3, float m4, float m5, float m6, float m7, float m8)
{
    const long long plane = (long long)src_h * src_w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float x = (float)(i % dst_w);
        const float y = (float)(i / dst_w);
        const float den = (m6 * x + m7 * y) + m8;
        const float u = ((m0 * x + m1 * y) + m2) / den;
        const float v = ((m3 * x + m4 * y) + m5) / den;
        const float nu = floorf(u + 0.5f);
        const float nv = floorf(v + 0.5f);
        if (!(nu >= 0.0f && nu < (float)src_w && nv >= 0.0f && nv < (float)src_h)) {
            for (int c = 0; c < channels; ++c) dst[c * n + i] = nanf("");
            continue;
        }
        const int iu = (int)floorf(u);
        const int iv = (int)floorf(v);
        const int cu = (int)nu;
        const int cv = (int)nv;
        float wx[6], wy[6];
        for (int k = 0; k < 6; ++k) {
            wx[k] = warp_lanczos3_w(u - (float)(iu - 2 + k));
            wy[k] = warp_lanczos3_w(v - (float)(iv - 2 + k));
        }
        for (int c = 0; c < channels; ++c) {
            const float* s = src + c * plane;
            if (isnan(s[(long long)cv * src_w + cu])) {
                dst[c * n + i] = nanf("");
                continue;
            }
            float acc = 0.0f, wsum = 0.0f;
            for (int j = 0; j < 6; ++j) {
                const int yy = iv - 2 + j;
                if (yy < 0 || yy >= src_h) continue;
                for (int k = 0; k < 6; ++k) {
                    const int xx = iu - 2 + k;
                    if (xx < 0 || xx >= src_w) continue;
                    const float val = s[(long long)yy * src_w + xx];
                    if (isnan(val)) continue;
                    const float w = wy[j] * wx[k];
                    acc += w * val;
                    wsum += w;
                }
            }
            dst[c * n + i] = acc / wsum;
        }
    }
}

extern "C" __global__ void warp_bilinear(
    const float* __restrict__ src, float* __restrict__ dst,
    long long n, int channels, int src_h, int src_w, int dst_w,
    float m0, float m1, float m2, float m3, float m4, float m5, float m6, float m7, float m8)
{
    const long long plane = (long long)src_h * src_w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float x = (float)(i % dst_w);
        const float y = (float)(i / dst_w);
        const float den = (m6 * x + m7 * y) + m8;
        const float u = ((m0 * x + m1 * y) + m2) / den;
        const float v = ((m3 * x + m4 * y) + m5) / den;
        const float nu = floorf(u + 0.5f);
        const float nv = floorf(v + 0.5f);
        if (!(nu >= 0.0f && nu < (float)src_w && nv >= 0.0f && nv < (float)src_h)) {
            for (int c = 0; c < channels; ++c) dst[c * n + i] = nanf("");
            continue;
        }
        const float fu0 = floorf(u);
        const float fv0 = floorf(v);
        const int iu = (int)fu0;
        const int iv = (int)fv0;
        const int cu = (int)nu;
        const int cv = (int)nv;
        const float fu = u - fu0;
        const float fv = v - fv0;
        float wx[2], wy[2];
        wx[0] = 1.0f - fu;
        wx[1] = fu;
        wy[0] = 1.0f - fv;
        wy[1] = fv;
        for (int c = 0; c < channels; ++c) {
            const float* s = src + c * plane;
            if (isnan(s[(long long)cv * src_w + cu])) {
                dst[c * n + i] = nanf("");
                continue;
            }
            float acc = 0.0f, wsum = 0.0f;
            for (int j = 0; j < 2; ++j) {
                const int yy = iv + j;
                if (yy < 0 || yy >= src_h) continue;
                for (int k = 0; k < 2; ++k) {
                    const int xx = iu + k;
                    if (xx < 0 || xx >= src_w) continue;
                    const float val = s[(long long)yy * src_w + xx];
                    if (isnan(val)) continue;
                    const float w = wy[j] * wx[k];
                    acc += w * val;
                    wsum += w;
                }
            }
            dst[c * n + i] = acc / wsum;
        }
    }
}
