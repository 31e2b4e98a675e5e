// warp.cu -- resample a frame into the reference grid (Lanczos-3 or bilinear).
//
// One thread per reference (output) pixel i = y * dst_w + x, all channels.
// The source position is q = Minv (x, y, 1), u = q0 / q2, v = q1 / q2, where
// Minv = inverse of the frame->reference transform (9 float scalars, row-major),
// evaluated as ((m0*x + m1*y) + m2) / ((m6*x + m7*y) + m8) in float32; with the
// session's radial lens model, undistorted before and distorted after (warp_source).
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
//   taps at columns floor(u) - 2 .. floor(u) + 3 (same for rows). The six
//   weights of an axis are computed in closed form (two sines of arguments in
//   [0, pi/3], by polynomial) and scaled by a common factor, which cancels in
//   sum(w s) / sum(w) (see warp_lanczos3_weights). The sums are separable: per tap row j,
//   h = sum_k wx[k] s and hw = sum_k wx[k] over its valid taps (k ascending),
//   then acc += wy[j] h and wsum += wy[j] hw (j ascending).
// * Bilinear: taps floor(u), floor(u) + 1 with weights 1 - f, f.

// sin(x) / x for x in [0, pi/3]: a polynomial in z = x^2 (least-squares fit on
// Chebyshev nodes, |error| < 6e-8 in float32), exact 1 at x = 0. A polynomial
// rather than sinf so that the NumPy twin (skystack.engine.warp._sinc_poly) and
// the GPU give the same float32 result bit for bit.
__device__ __forceinline__ float warp_sin_over_x(float x)
{
    const float z = x * x;
    float p = z * 2.7013241e-06f;
    p = (p + -0.00019837552f) * z;
    p = (p + 0.008333325f) * z;
    p = (p + -0.16666667f) * z;
    return p + 1.0f;
}

// Lanczos-3 weights of the six taps of one axis, whose offsets from the sample
// position are d_k = f + 2 - k (k = 0..5): f = u - floor(u) and g = (floor(u) + 1) - u
// (f + g = 1; g is computed from u, never 0, so d_3 = -g stays exact even when f
// rounds to 1). Since sin(pi d_k) = (-1)^k sin(pi f), w(d_k) = (-1)^k 3 sin(pi f)
// sin(pi d_k / 3) / (pi d_k)^2; all six are multiplied by the common factor
// pi f g / sin(pi f), which cancels in the normalised sum and removes the 0/0 at
// f = 0 and f = 1. With a = pi f / 3, b = pi g / 3 (a + b = pi / 3):
//   sin(pi d_k / 3) = sin b, sin(b + pi/3), sin a, -sin b, -sin(b + pi/3), -sin a,
// all from arguments in [0, pi/3] (no cancellation), and
//   w_0 = K sin b / (f+2)^2,  w_1 = -K sin(b + pi/3) / (f+1)^2,  w_2 = g sin(a) / a,
//   w_3 = f sin(b) / b,       w_4 = -K sin(b + pi/3) / (g+1)^2,  w_5 = K sin a / (g+2)^2,
// K = (3/pi) f g. The NumPy twin (skystack.engine.warp._lanczos3_weights) does the
// same float operations in the same order.
__device__ __forceinline__ void warp_lanczos3_weights(float f, float g, float* w)
{
    const float a = f * 1.04719755f;                        // pi / 3
    const float b = g * 1.04719755f;
    const float pa = warp_sin_over_x(a);
    const float pb = warp_sin_over_x(b);
    const float sa = a * pa;
    const float sb = b * pb;
    const float cb = sqrtf(1.0f - sb * sb);                 // cos b, b in [0, pi/3]
    const float nb1 = sb * -0.5f + cb * -0.866025404f;      // -sin(b + pi/3)
    const float kk = (f * 0.954929659f) * g;                // 3 / pi
    const float kn = kk * nb1;
    w[0] = (kk * sb) / ((f + 2.0f) * (f + 2.0f));
    w[1] = kn / ((f + 1.0f) * (f + 1.0f));
    w[2] = g * pa;
    w[3] = f * pb;
    w[4] = kn / ((g + 1.0f) * (g + 1.0f));
    w[5] = (kk * sa) / ((g + 2.0f) * (g + 2.0f));
}

// The mapping of every warp kernel: Minv (m0..m8, row-major) and the lens (output-side centre
// ocx, ocy; source-side centre scx, scy; 1 / r_norm^2; k1, k2), as parameters and as arguments.
#define WARP_MAP_PARAMS \
    float m0, float m1, float m2, float m3, float m4, float m5, float m6, float m7, float m8, \
    float ocx, float ocy, float scx, float scy, float linv_r2, float lk1, float lk2
#define WARP_MAP_ARGS m0, m1, m2, m3, m4, m5, m6, m7, m8, ocx, ocy, scx, scy, linv_r2, lk1, lk2

// Source position (u, v) of output pixel (x, y). Without a lens (k1 = k2 = 0):
// Minv (x, y, 1). With the session's radial lens (skystack.engine.lens), output
// and source are both in recorded (distorted) pixels: (x, y) is first undistorted
// about the output-side centre (ocx, ocy) -- the factor s solves
// s (1 + k1 q s^2 + k2 q^2 s^4) = 1, q = |p - oc|^2 / r_norm^2, by 6 Newton steps
// from s = 1 -- then mapped by Minv, then distorted about the source centre
// (scx, scy): c + d (1 + r2 (k1 + k2 r2)), r2 = |d|^2 / r_norm^2.
__device__ __forceinline__ void warp_source(float x, float y, WARP_MAP_PARAMS, float* pu, float* pv)
{
    const bool lens = lk1 != 0.0f || lk2 != 0.0f;
    if (lens) {
        const float ex = x - ocx;
        const float ey = y - ocy;
        const float q = (ex * ex + ey * ey) * linv_r2;
        const float kq = lk1 * q;
        const float k2q = lk2 * (q * q);
        float s = 1.0f;
        for (int it = 0; it < 6; ++it) {
            const float s2 = s * s;
            const float g = s * (1.0f + s2 * (kq + k2q * s2)) - 1.0f;
            const float gp = 1.0f + s2 * (3.0f * kq + 5.0f * k2q * s2);
            s = s - g / gp;
        }
        x = ocx + ex * s;
        y = ocy + ey * s;
    }
    const float den = (m6 * x + m7 * y) + m8;
    float u = ((m0 * x + m1 * y) + m2) / den;
    float v = ((m3 * x + m4 * y) + m5) / den;
    if (lens) {
        const float dx = u - scx;
        const float dy = v - scy;
        const float r2 = (dx * dx + dy * dy) * linv_r2;
        const float fac = 1.0f + r2 * (lk1 + lk2 * r2);
        u = scx + dx * fac;
        v = scy + dy * fac;
    }
    *pu = u;
    *pv = v;
}

// Lanczos-3 value of channel plane s at the source position whose taps start at (iu - 2, iv - 2),
// with the axis weights wx, wy; all_inside: all 36 taps lie inside the frame, hw_all = sum(wx).
__device__ __forceinline__ float warp_lanczos3_sample(const float* s, int src_h, int src_w, int iu, int iv,
                                                      const float* wx, const float* wy, bool all_inside,
                                                      float hw_all)
{
    if (all_inside) {  // the same sums without the per-tap tests
        float acc = 0.0f, wsum = 0.0f;
        const float* row = s + (long long)(iv - 2) * src_w + (iu - 2);
        for (int j = 0; j < 6; ++j, row += src_w) {
            float h = 0.0f;
            for (int k = 0; k < 6; ++k) h += wx[k] * row[k];
            acc += wy[j] * h;
            wsum += wy[j] * hw_all;
        }
        if (!isnan(acc)) return acc / wsum;  // a NaN tap: the careful loop below leaves it out
    }
    float acc = 0.0f, wsum = 0.0f;
    for (int j = 0; j < 6; ++j) {
        const int yy = iv - 2 + j;
        if (yy < 0 || yy >= src_h) continue;
        float h = 0.0f, hw = 0.0f;
        for (int k = 0; k < 6; ++k) {
            const int xx = iu - 2 + k;
            if (xx < 0 || xx >= src_w) continue;
            const float val = s[(long long)yy * src_w + xx];
            if (isnan(val)) continue;
            h += wx[k] * val;
            hw += wx[k];
        }
        acc += wy[j] * h;
        wsum += wy[j] * hw;
    }
    return acc / wsum;
}

// Bilinear value of channel plane s from the taps (iu, iv) .. (iu + 1, iv + 1), axis weights wx, wy.
__device__ __forceinline__ float warp_bilinear_sample(const float* s, int src_h, int src_w, int iu, int iv,
                                                      const float* wx, const float* wy)
{
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
    return acc / wsum;
}

// Output pixel i of every channel from its taps at (iu - 2, iv - 2) (Lanczos-3, else (iu, iv)) with the
// axis weights wx, wy: NaN where the nearest source pixel (flat index centre in a plane) is NaN.
template <bool LANCZOS3>
__device__ __forceinline__ void warp_channels(const float* src, float* dst, long long i, long long n, int channels,
                                              int src_h, int src_w, int iu, int iv, long long centre,
                                              const float* wx, const float* wy, bool all_inside, float hw_all)
{
    const long long plane = (long long)src_h * src_w;
    for (int c = 0; c < channels; ++c) {
        const float* s = src + c * plane;
        if (isnan(s[centre])) {
            dst[c * n + i] = nanf("");
            continue;
        }
        dst[c * n + i] = LANCZOS3 ? warp_lanczos3_sample(s, src_h, src_w, iu, iv, wx, wy, all_inside, hw_all)
                                  : warp_bilinear_sample(s, src_h, src_w, iu, iv, wx, wy);
    }
}

// Output pixel i of every channel (LANCZOS3, else bilinear; a template parameter, so each kernel
// gets its own code): NaN where the nearest source pixel lies outside the frame or is NaN, else
// the channel's sample.
template <bool LANCZOS3>
__device__ __forceinline__ void warp_pixel(const float* src, float* dst, long long i, long long n, int channels,
                                           int src_h, int src_w, int dst_w, WARP_MAP_PARAMS)
{
    const float x = (float)(i % dst_w);
    const float y = (float)(i / dst_w);
    float u, v;
    warp_source(x, y, WARP_MAP_ARGS, &u, &v);
    const float nu = floorf(u + 0.5f);
    const float nv = floorf(v + 0.5f);
    if (!(nu >= 0.0f && nu < (float)src_w && nv >= 0.0f && nv < (float)src_h)) {
        for (int c = 0; c < channels; ++c) dst[c * n + i] = nanf("");
        return;
    }
    const float fu0 = floorf(u);
    const float fv0 = floorf(v);
    const int iu = (int)fu0;
    const int iv = (int)fv0;
    const int cu = (int)nu;
    const int cv = (int)nv;
    float wx[6], wy[6];
    bool all_inside = false;
    float hw_all = 0.0f;
    if (LANCZOS3) {
        warp_lanczos3_weights(u - fu0, (fu0 + 1.0f) - u, wx);
        warp_lanczos3_weights(v - fv0, (fv0 + 1.0f) - v, wy);
        all_inside = iu >= 2 && iu + 3 < src_w && iv >= 2 && iv + 3 < src_h;
        for (int k = 0; k < 6; ++k) hw_all += wx[k];
    } else {
        const float fu = u - fu0;
        const float fv = v - fv0;
        wx[0] = 1.0f - fu;
        wx[1] = fu;
        wy[0] = 1.0f - fv;
        wy[1] = fv;
    }
    warp_channels<LANCZOS3>(src, dst, i, n, channels, src_h, src_w, iu, iv, (long long)cv * src_w + cu, wx, wy,
                            all_inside, hw_all);
}

#ifdef SKYSTACK_NATIVE
// Native builds (kernels/native.py, the host's CPU) run each kernel's loop over a contiguous chunk
// of items. There the warp takes WARP_BLOCK pixels at a time: their source positions, floors and
// axis weights in loops over the block that the compiler vectorises, then the taps of runs of
// pixels side by side (warp_lanczos3_run), the rest one pixel at a time (warp_block_pixel). The
// same float operations in the same order as warp_pixel: the same bits.
#define WARP_BLOCK 32
#define WARP_LANES 8  // pixels side by side in warp_lanczos3_run

// floorf(x) for |x| < 2e9 (x itself when x is integral, so -0 stays -0), in a form that vectorises.
__device__ __forceinline__ float warp_floor(float x)
{
    const float t = (float)(int)x;
    return t > x ? t - 1.0f : (t == x ? x : t);
}

// One pixel of warp_block (lane l of its arrays): warp_pixel's work from the block's position,
// floors (iu, iv), nearest source pixel (centre; -1 outside the frame) and weights.
template <bool LANCZOS3>
__device__ __forceinline__ void warp_block_pixel(const float* __restrict__ src, float* __restrict__ dst,
                                                 long long i, long long n, int channels, int src_h, int src_w,
                                                 float u, float v, float fu0, float fv0, int iu, int iv,
                                                 long long centre, const float (*WX)[WARP_BLOCK + WARP_LANES],
                                                 const float (*WY)[WARP_BLOCK + WARP_LANES], float hw_all, int l)
{
    if (centre < 0) {
        for (int c = 0; c < channels; ++c) dst[c * n + i] = nanf("");
        return;
    }
    float wx[6], wy[6];
    if (LANCZOS3) {
        for (int k = 0; k < 6; ++k) {
            wx[k] = WX[k][l];
            wy[k] = WY[k][l];
        }
    } else {
        wx[0] = 1.0f - (u - fu0);
        wx[1] = u - fu0;
        wy[0] = 1.0f - (v - fv0);
        wy[1] = v - fv0;
    }
    const bool all_inside = LANCZOS3 && iu >= 2 && iu + 3 < src_w && iv >= 2 && iv + 3 < src_h;
    warp_channels<LANCZOS3>(src, dst, i, n, channels, src_h, src_w, iu, iv, centre, wx, wy, all_inside, hw_all);
}

// Eight floats in one vector register (GCC's vector extension; two SSE registers in a baseline
// build): lane-wise IEEE mul and add, never contracted (-ffp-contract=off), so each lane's value is
// the scalar code's. Loads and stores go through memcpy: any alignment.
typedef float warp_v8 __attribute__((vector_size(32)));  // WARP_LANES floats

__device__ __forceinline__ warp_v8 warp_load8(const float* p)
{
    warp_v8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

// Lanczos-3 of m (<= WARP_BLOCK) consecutive pixels of warp_block whose taps all lie inside the frame,
// on the same six rows from (iu - 2, iv - 2), one column further each: their taps are contiguous
// loads, so WARP_LANES pixels go side by side in vector registers, each pixel's sums in warp_pixel's
// order. The lanes of a last group past the run are computed and dropped, when their taps stay in
// the row (else that group goes lane by lane). Lane q is the block's lane l + q: nearest source pixel
// centre[q], weights WX[.][l + q], WY[.][l + q] (the block's arrays have WARP_LANES lanes past its
// end), hw[q]; dst points at the first pixel's output.
__device__ __forceinline__ void warp_lanczos3_run(const float* __restrict__ src, float* __restrict__ dst,
                                                  long long n, int channels, int src_h, int src_w, int iu, int iv,
                                                  int m, const long long* centre,
                                                  const float (*WX)[WARP_BLOCK + WARP_LANES],
                                                  const float (*WY)[WARP_BLOCK + WARP_LANES],
                                                  const float* hw, int l)
{
    const long long plane = (long long)src_h * src_w;
    const warp_v8 zero = {};
    // groups of WARP_LANES: whole ones, and a last one when its taps (to column iu - 2 + g + 12) stay in the row
    int groups = m / WARP_LANES;
    if (m % WARP_LANES && (iu - 2) + groups * WARP_LANES + WARP_LANES + 5 <= src_w) ++groups;
    const int vec_end = groups * WARP_LANES < m ? groups * WARP_LANES : m;
    for (int c = 0; c < channels; ++c) {
        const float* s = src + c * plane;
        float acc[WARP_BLOCK + WARP_LANES], wsum[WARP_BLOCK + WARP_LANES];
        // the six rows a little past the run, for the next run: loads the streams of 3 x 6 rows would miss
        for (int j = 0; j < 6; ++j) __builtin_prefetch(s + (long long)(iv - 2 + j) * src_w + (iu - 2) + m + 32);
        for (int g = 0; g < groups * WARP_LANES; g += WARP_LANES) {
            warp_v8 va = zero, vw = zero;
            const warp_v8 hw8 = warp_load8(hw + g);
            for (int j = 0; j < 6; ++j) {
                const float* row = s + (long long)(iv - 2 + j) * src_w + (iu - 2) + g;
                warp_v8 h = zero + warp_load8(WX[0] + l + g) * warp_load8(row);
                for (int k = 1; k < 6; ++k) h = h + warp_load8(WX[k] + l + g) * warp_load8(row + k);
                const warp_v8 wy = warp_load8(WY[j] + l + g);
                va = va + wy * h;  // j = 0 starts the sums as warp_pixel's 0.0f + ... does
                vw = vw + wy * hw8;
            }
            __builtin_memcpy(acc + g, &va, sizeof va);
            __builtin_memcpy(wsum + g, &vw, sizeof vw);
        }
        for (int q = vec_end; q < m; ++q) {  // a last group whose taps would leave the row
            const float* row = s + (long long)(iv - 2) * src_w + (iu - 2) + q;
            float a = 0.0f, w = 0.0f;
            for (int j = 0; j < 6; ++j, row += src_w) {
                float h = 0.0f + WX[0][l + q] * row[0];
                for (int k = 1; k < 6; ++k) h += WX[k][l + q] * row[k];
                a += WY[j][l + q] * h;
                w += WY[j][l + q] * hw[q];
            }
            acc[q] = a;
            wsum[q] = w;
        }
        float* d = dst + c * n;
        for (int q = 0; q < m; ++q) d[q] = acc[q] / wsum[q];
        for (int q = 0; q < m; ++q) {  // a NaN sum (the nearest source pixel is one of the taps)
            if (!isnan(acc[q])) continue;
            if (isnan(s[centre[q]])) {
                d[q] = nanf("");
            } else {  // a NaN tap elsewhere: the careful sum leaves it out
                float wx[6], wy[6];
                for (int k = 0; k < 6; ++k) {
                    wx[k] = WX[k][l + q];
                    wy[k] = WY[k][l + q];
                }
                d[q] = warp_lanczos3_sample(s, src_h, src_w, iu + q, iv, wx, wy, false, hw[q]);
            }
        }
    }
}

template <bool LANCZOS3>
static void warp_block(const float* __restrict__ src, float* __restrict__ dst, long long i0, int cnt,
                       long long n, int channels, int src_h, int src_w, int dst_w, WARP_MAP_PARAMS)
{
    float U[WARP_BLOCK], V[WARP_BLOCK], FU[WARP_BLOCK], FV[WARP_BLOCK], HW[WARP_BLOCK + WARP_LANES];
    float WX[6][WARP_BLOCK + WARP_LANES], WY[6][WARP_BLOCK + WARP_LANES];  // lanes past cnt: 0, read and dropped
    const long long row = i0 / dst_w;
    const long long col = i0 - row * dst_w;
    if (lk1 == 0.0f && lk2 == 0.0f && col + cnt <= dst_w) {  // warp_source without a lens, one row
        const float y = (float)row;
        for (int l = 0; l < cnt; ++l) {
            const float x = (float)(col + l);
            const float den = (m6 * x + m7 * y) + m8;
            U[l] = ((m0 * x + m1 * y) + m2) / den;
            V[l] = ((m3 * x + m4 * y) + m5) / den;
        }
    } else {
        for (int l = 0; l < cnt; ++l)
            warp_source((float)((i0 + l) % dst_w), (float)((i0 + l) / dst_w), WARP_MAP_ARGS, &U[l], &V[l]);
    }
    for (int l = 0; l < cnt; ++l) {  // a position beyond +-2e9 (or NaN) lies outside the frame: unused
        const bool near = U[l] > -2e9f && U[l] < 2e9f && V[l] > -2e9f && V[l] < 2e9f;
        FU[l] = warp_floor(near ? U[l] : 0.0f);
        FV[l] = warp_floor(near ? V[l] : 0.0f);
    }
    if (LANCZOS3) {
        for (int l = 0; l < cnt; ++l) {
            float w[6];
            warp_lanczos3_weights(U[l] - FU[l], (FU[l] + 1.0f) - U[l], w);
            float hw = 0.0f;
            for (int k = 0; k < 6; ++k) {
                WX[k][l] = w[k];
                hw += w[k];
            }
            HW[l] = hw;
            warp_lanczos3_weights(V[l] - FV[l], (FV[l] + 1.0f) - V[l], w);
            for (int k = 0; k < 6; ++k) WY[k][l] = w[k];
        }
    }
    for (int l = cnt; l < cnt + WARP_LANES; ++l) {
        HW[l] = 0.0f;
        for (int k = 0; k < 6; ++k) WX[k][l] = WY[k][l] = 0.0f;
    }
    // Runs of 4 or more pixels for warp_lanczos3_run (a small rotation gives runs of ~1 / |angle|
    // pixels, cut at the block's end); every other pixel alone.
    int IU[WARP_BLOCK], IV[WARP_BLOCK];
    long long CENTRE[WARP_BLOCK];  // the nearest source pixel's flat index, -1 outside the frame
    bool RUN[WARP_BLOCK];
    for (int l = 0; l < cnt; ++l) {
        IU[l] = (int)FU[l];
        IV[l] = (int)FV[l];
        const float nu = floorf(U[l] + 0.5f);
        const float nv = floorf(V[l] + 0.5f);
        const bool inside = nu >= 0.0f && nu < (float)src_w && nv >= 0.0f && nv < (float)src_h;
        CENTRE[l] = inside ? (long long)(int)nv * src_w + (int)nu : -1;
        RUN[l] = LANCZOS3 && inside && IU[l] >= 2 && IU[l] + 3 < src_w && IV[l] >= 2 && IV[l] + 3 < src_h;
    }
    int l = 0;
    while (l < cnt) {
        int e = l + 1;
        if (RUN[l]) {
            while (e < cnt && RUN[e] && IV[e] == IV[l] && IU[e] == IU[l] + (e - l)) ++e;
        }
        if (LANCZOS3 && RUN[l] && e - l >= 4) {
            warp_lanczos3_run(src, dst + i0 + l, n, channels, src_h, src_w, IU[l], IV[l], e - l, CENTRE + l,
                              WX, WY, HW + l, l);
            l = e;
            continue;
        }
        for (; l < e; ++l)
            warp_block_pixel<LANCZOS3>(src, dst, i0 + l, n, channels, src_h, src_w, U[l], V[l], FU[l], FV[l], IU[l],
                                       IV[l], CENTRE[l], WX, WY, HW[l], l);
    }
}

// The loop body of a native build: the block from item i (to the end of the chunk), then i moves
// to the block's last item (the loop's ++i steps past it).
#define WARP_BODY(LANCZOS3)                                                                       \
    {                                                                                             \
        const long long last = skystack_item_end < n ? skystack_item_end : n;                     \
        const int cnt = (int)(last - i < WARP_BLOCK ? last - i : WARP_BLOCK);                     \
        warp_block<LANCZOS3>(src, dst, i, cnt, n, channels, src_h, src_w, dst_w, WARP_MAP_ARGS);  \
        i += cnt - 1;                                                                             \
    }
#else
#define WARP_BODY(LANCZOS3) warp_pixel<LANCZOS3>(src, dst, i, n, channels, src_h, src_w, dst_w, WARP_MAP_ARGS);
#endif

extern "C" __global__ void warp_lanczos3(const float* __restrict__ src, float* __restrict__ dst, long long n,
                                         int channels, int src_h, int src_w, int dst_w, WARP_MAP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        WARP_BODY(true)
}

extern "C" __global__ void warp_bilinear(const float* __restrict__ src, float* __restrict__ dst, long long n,
                                         int channels, int src_h, int src_w, int dst_w, WARP_MAP_PARAMS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        WARP_BODY(false)
}
