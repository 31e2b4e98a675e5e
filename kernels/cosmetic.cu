// cosmetic.cu -- replace defective (hot/cold) pixels by the median of their
// same-colour neighbours. NumPy twin: skystack/engine/cosmetic.py
// (_correct_defects_numpy).
//
// Neighbours (8 candidates, each used only when inside the frame, not itself
// a defect and finite):
//   * CFA green (pat >= 0, colour 1): the 4 diagonal pixels (+-1, +-1) and the
//     4 pixels at distance 2 along rows and columns (the nearest greens);
//   * CFA red/blue: the 8 pixels at (+-2, 0), (0, +-2), (+-2, +-2);
//   * mono / colour planes (pat < 0): the 8 adjacent pixels.
// The median of an even count is the mean of the two middle values; with no
// usable neighbour the pixel becomes NaN (no data).
// `pat` packs the CFA tile as in debayer.cu; data is (planes, H, W) and the
// (H, W) mask applies to every plane.

__device__ __forceinline__ int cos_colour(int pat, int y, int x) {
    return (pat >> (2 * (((y & 1) << 1) | (x & 1)))) & 3;
}

__device__ __forceinline__ bool cos_finite(float v) { return (v - v) == 0.0f; }

// Offsets of candidate k (0..7) for a pixel of kind `kind`
// (0: mono, 1: CFA green, 2: CFA red/blue).
__device__ __forceinline__ void cos_offset(int kind, int k, int* dy, int* dx) {
    // mono: row-major 3x3 without the centre
    const int my[8] = {-1, -1, -1, 0, 0, 1, 1, 1};
    const int mx[8] = {-1, 0, 1, -1, 1, -1, 0, 1};
    // green: diagonals, then distance-2 cardinals
    const int gy[8] = {-1, -1, 1, 1, -2, 0, 0, 2};
    const int gx[8] = {-1, 1, -1, 1, 0, -2, 2, 0};
    // red/blue: row-major 5x5 ring at distance 2 (step 2)
    const int ry[8] = {-2, -2, -2, 0, 0, 2, 2, 2};
    const int rx[8] = {-2, 0, 2, -2, 2, -2, 0, 2};
    if (kind == 0) { *dy = my[k]; *dx = mx[k]; }
    else if (kind == 1) { *dy = gy[k]; *dx = gx[k]; }
    else { *dy = ry[k]; *dx = rx[k]; }
}

__device__ float cos_median(float* v, int n) {
    if (n == 0) return nanf("");
    for (int a = 1; a < n; ++a) {  // insertion sort, ascending
        float t = v[a];
        int b = a - 1;
        while (b >= 0 && v[b] > t) { v[b + 1] = v[b]; --b; }
        v[b + 1] = t;
    }
    if (n & 1) return v[n / 2];
    return (v[n / 2 - 1] + v[n / 2]) * 0.5f;
}

// The usable neighbours of pixel (y, x) of the (H, W) plane img: the values of its candidates
// (above) that lie inside the frame, are not defects (mask != 0; mask may be null: none) and are
// finite, in candidate order, into v[0..7]; returns how many.
__device__ __forceinline__ int cos_neighbours(const float* img, const unsigned char* mask, int H, int W, int pat,
                                              int y, int x, float* v)
{
    int kind = (pat < 0) ? 0 : ((cos_colour(pat, y, x) == 1) ? 1 : 2);
    int m = 0;
    for (int k = 0; k < 8; ++k) {
        int dy, dx;
        cos_offset(kind, k, &dy, &dx);
        int yy = y + dy, xx = x + dx;
        if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
        long long jj = (long long)yy * W + xx;
        if (mask != nullptr && mask[jj] != 0) continue;
        float s = img[jj];
        if (!cos_finite(s)) continue;
        v[m] = s;
        m = m + 1;
    }
    return m;
}

// n_items = planes * H * W
extern "C" __global__ void cosmetic_kernel(float* out, const float* in, const unsigned char* mask,
                                           long long n, int H, int W, int pat) {
    long long hw = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        long long p = i / hw;
        long long j = i - p * hw;
        if (mask[j] == 0) {
            out[i] = in[i];
            continue;
        }
        int y = (int)(j / W);
        int x = (int)(j - (long long)y * W);
        float v[8];
        int m = cos_neighbours(in + p * hw, mask, H, W, pat, y, x, v);
        out[i] = cos_median(v, m);
    }
}

// Mean of the finite same-colour neighbours (the candidates above, inside the
// frame) of every pixel of an (H, W) image, NaN where there is none: the level a
// defect is measured against. NumPy twin: cosmetic.py (_neighbour_mean_numpy).
// The sum runs in candidate order in float32; the mean is the double quotient
// rounded to float (the twin divides its float32 sum by an int32 count, which
// NumPy does in float64). n_items = H * W.
extern "C" __global__ void neighbour_mean_kernel(float* out, const float* img, int H, int W, int pat) {
    long long n = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        int y = (int)(i / W);
        int x = (int)(i - (long long)y * W);
        float v[8];
        int cnt = cos_neighbours(img, nullptr, H, W, pat, y, x, v);
        float acc = 0.0f;
        for (int k = 0; k < cnt; ++k) acc += v[k];
        out[i] = (cnt > 0) ? (float)((double)acc / (double)cnt) : nanf("");
    }
}
