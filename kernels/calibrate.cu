// calibrate.cu -- calibration of a light on the raw CFA mosaic, and the fused
// calibration + cosmetic correction. NumPy twins: skystack/engine/calibrate.py
// (_calibrate_numpy) and, for the fused kernel, _calibrate_numpy followed by
// skystack/engine/cosmetic.py _correct_defects_numpy.
//
// All data are float32 in normalised units (adu - black) / (white - black):
//   v = light
//   v = v - bias               (when has_bias)
//   v = v - dark_scale * dark  (when has_dark; dark is the thermal master)
//   v = v / flat               (when has_flat; flat <= 0 or NaN gives NaN)
// Absent masters are passed as any float32 array of the right size (the light
// itself) with their has_ flag 0; they are not read.

__device__ __forceinline__ float cal_pixel(const float* light, const float* bias, const float* dark,
                                           const float* flat, long long i, int has_bias, int has_dark,
                                           int has_flat, float dark_scale) {
    float v = light[i];
    if (has_bias) v = v - bias[i];
    if (has_dark) v = v - dark_scale * dark[i];
    if (has_flat) {
        float f = flat[i];
        v = (f > 0.0f) ? v / f : nanf("");
    }
    return v;
}

extern "C" __global__ void calibrate_kernel(float* out, const float* light, const float* bias, const float* dark,
                                            const float* flat, long long n, int has_bias, int has_dark,
                                            int has_flat, float dark_scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        out[i] = cal_pixel(light, bias, dark, flat, i, has_bias, has_dark, has_flat, dark_scale);
    }
}

// ------------------------------------------------------------ fused with cosmetic
// Same neighbour rule as cosmetic.cu: a defect pixel (mask != 0) becomes the
// median of the *calibrated* values of its usable same-colour neighbours.

__device__ __forceinline__ int calc_colour(int pat, int y, int x) {
    return (pat >> (2 * (((y & 1) << 1) | (x & 1)))) & 3;
}

__device__ __forceinline__ bool calc_finite(float v) { return (v - v) == 0.0f; }

__device__ __forceinline__ void calc_offset(int kind, int k, int* dy, int* dx) {
    const int my[8] = {-1, -1, -1, 0, 0, 1, 1, 1};
    const int mx[8] = {-1, 0, 1, -1, 1, -1, 0, 1};
    const int gy[8] = {-1, -1, 1, 1, -2, 0, 0, 2};
    const int gx[8] = {-1, 1, -1, 1, 0, -2, 2, 0};
    const int ry[8] = {-2, -2, -2, 0, 0, 2, 2, 2};
    const int rx[8] = {-2, 0, 2, -2, 2, -2, 0, 2};
    if (kind == 0) { *dy = my[k]; *dx = mx[k]; }
    else if (kind == 1) { *dy = gy[k]; *dx = gx[k]; }
    else { *dy = ry[k]; *dx = rx[k]; }
}

__device__ float calc_median(float* v, int n) {
    if (n == 0) return nanf("");
    for (int a = 1; a < n; ++a) {
        float t = v[a];
        int b = a - 1;
        while (b >= 0 && v[b] > t) { v[b + 1] = v[b]; --b; }
        v[b + 1] = t;
    }
    if (n & 1) return v[n / 2];
    return (v[n / 2 - 1] + v[n / 2]) * 0.5f;
}

// n_items = planes * H * W; all arrays but mask are (planes, H, W), mask is (H, W).
// Item i (plane p, pixel j of the plane) of calibrate_cosmetic_kernel.
__device__ __forceinline__ void cal_cosmetic_item(float* out, const float* light, const float* bias,
                                                  const float* dark, const float* flat,
                                                  const unsigned char* mask, long long i, long long p,
                                                  long long j, long long hw, int H, int W, int pat,
                                                  int has_bias, int has_dark, int has_flat, float dark_scale) {
    if (mask[j] == 0) {
        out[i] = cal_pixel(light, bias, dark, flat, i, has_bias, has_dark, has_flat, dark_scale);
        return;
    }
    int y = (int)(j / W);
    int x = (int)(j - (long long)y * W);
    int kind = (pat < 0) ? 0 : ((calc_colour(pat, y, x) == 1) ? 1 : 2);
    float v[8];
    int m = 0;
    for (int k = 0; k < 8; ++k) {
        int dy, dx;
        calc_offset(kind, k, &dy, &dx);
        int yy = y + dy, xx = x + dx;
        if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
        long long jj = (long long)yy * W + xx;
        if (mask[jj] != 0) continue;
        float s = cal_pixel(light, bias, dark, flat, p * hw + jj, has_bias, has_dark, has_flat, dark_scale);
        if (!calc_finite(s)) continue;
        v[m] = s;
        m = m + 1;
    }
    out[i] = calc_median(v, m);
}

#ifdef SKYSTACK_NATIVE
// Native builds (kernels/native.py) run the loop over a contiguous chunk of items: the plane and
// pixel counted along it (no 64-bit division per item: 3.1 -> 2.8 ms a 1 MP frame), then i moves
// to the chunk's last item (the loop's ++i ends it). The same operations: the same bits.
#define CAL_COSMETIC_BODY                                                                          \
    {                                                                                              \
        const long long last = skystack_item_end < n ? skystack_item_end : n;                     \
        long long p = i / hw;                                                                      \
        for (long long j = i - p * hw; i < last; ++i) {                                            \
            cal_cosmetic_item(out, light, bias, dark, flat, mask, i, p, j, hw, H, W, pat, has_bias, \
                              has_dark, has_flat, dark_scale);                                     \
            if (++j == hw) {                                                                       \
                j = 0;                                                                             \
                ++p;                                                                               \
            }                                                                                      \
        }                                                                                          \
        i = last - 1;                                                                              \
    }
#else
#define CAL_COSMETIC_BODY                                                                          \
    {                                                                                              \
        const long long p = i / hw;                                                                \
        cal_cosmetic_item(out, light, bias, dark, flat, mask, i, p, i - p * hw, hw, H, W, pat,     \
                          has_bias, has_dark, has_flat, dark_scale);                               \
    }
#endif

extern "C" __global__ void calibrate_cosmetic_kernel(float* out, const float* light, const float* bias,
                                                     const float* dark, const float* flat,
                                                     const unsigned char* mask, long long n, int H, int W,
                                                     int pat, int has_bias, int has_dark, int has_flat,
                                                     float dark_scale) {
    long long hw = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        CAL_COSMETIC_BODY
}
