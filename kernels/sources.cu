// sources.cu -- star candidates of a detection (luminance) image: engine/sources.py. Each kernel gives
// its NumPy twin's bits there (float32 operations in the twin's order, double sums in the twin's
// order, selections).
//
// mesh_subtract -- a thread per pixel. sub = lum - the background mesh interpolated bilinearly: along
// the mesh rows first (t0 = m[iy0][ix0] * wx0 + m[iy0][ix1] * wx1, t1 likewise on row iy1), then
// between them (b = t0 * wy0 + t1 * wy1), all float32 with the host's index and weight tables; 0
// where lum is not finite (no data).
//
// bin2_mean -- a thread per output pixel: the mean of each 2x2 block of src (H x W float32; an odd
// last row or column left out), (((a + b) + c) + d) * 0.25 in float32 with a, b the block's upper
// pair and c, d its lower pair, left to right.
//
// box_rows -- a thread per output value: the image's box x box boxes (row-major) as rows of their
// every step-th row and column (row-major), src where mask is finite and NaN elsewhere and past the
// image's edges.
//
// match_filter -- a thread per pixel: f = sub convolved with SExtractor's 3x3 pyramid (1 2 1 / 2 4 2 /
// 1 2 1), the nine products added row by row from the top left (pixels off the image are left out),
// times 1/16, in float32.
//
// find_peaks -- a thread per pixel: a peak is a pixel with f > thr that no pixel of its 5x5
// neighbourhood beats (a larger f, or an equal one earlier in raster order), with at least min_area
// pixels of that neighbourhood (itself included) above thr. Its flat index is appended to idx (an
// atomic counter: the host sorts them), up to cap; count gets every peak.
//
// peak_moments -- a thread per peak: over the (2 R + 1)^2 window about the peak pixel (px, py), the
// pixels with f > thr to which f never rises by more than thr above the lowest value on the way
// from the peak (so a neighbouring star's hill is left out, noise on a wing is not), in raster
// order, with w = f (the moments of the filtered image, as sep's) and (dx, dy) from the peak pixel:
// n, S = sum w, sums of w dx, w dy, w dx dx, w dy dy, w dx dy, dx, dy, dx dx, dy dy, the flux
// F = sum sub and the largest sub; all in double. Out (11, n_peaks), with mx = Sx / S, my = Sy / S:
//   x = px + mx, y = py + my, flux = F, peak, x2 = Sxx / S - mx mx, y2 = Syy / S - my my,
//   xy = Sxy / S - mx my, ex = (Uxx - 2 mx Ux + n mx mx) / (S S) (the centroid's x variance per unit
//   pixel variance of f), ey likewise, n (0 when S <= 0: no source), and the prominence: f at the
//   peak less the largest, over the window's border pixels (on the image), of the lowest f on the
//   way there (+inf when no border pixel is on the image).
// The way from the peak to the offset (dx, dy), K = max(|dx|, |dy|) steps: step k (1..K) is at
// (floor((2 dx k + K) / 2K), floor((2 dy k + K) / 2K)).

#define SOURCES_R 5

// floor(a / b) for b > 0 (C's division truncates towards zero).
__device__ long long src_floordiv(long long a, long long b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Step k (1..K) of the way from a peak to the offset d along one axis: floor((2 d k + K) / 2K).
__device__ long long src_step(int d, int k, int K) { return src_floordiv(2LL * d * k + K, 2LL * K); }

// Whether f, on the way from the peak p to the offset (dx, dy) (W: the row length), never rises more
// than rise above the lowest value passed so far (another star's hill; noise on a wing does not).
__device__ bool src_downhill(const float* f, long long p, long long W, int dx, int dy, float rise) {
    const int K = max(abs(dx), abs(dy));
    float lowest = f[p];
    for (int k = 1; k <= K; ++k) {
        const float v = f[p + src_step(dy, k, K) * W + src_step(dx, k, K)];
        if (v > lowest + rise) return false;
        lowest = v < lowest ? v : lowest;
    }
    return true;
}

// The lowest f on the way from the peak p to the offset (dx, dy) (the steps of src_downhill).
__device__ float src_path_min(const float* f, long long p, long long W, int dx, int dy) {
    const int K = max(abs(dx), abs(dy));
    float lowest = f[p];
    for (int k = 1; k <= K; ++k) {
        const float v = f[p + src_step(dy, k, K) * W + src_step(dx, k, K)];
        lowest = v < lowest ? v : lowest;
    }
    return lowest;
}

extern "C" __global__ void mesh_subtract(const float* __restrict__ lum, const float* __restrict__ mesh,
                                         const int* __restrict__ ix0, const int* __restrict__ ix1,
                                         const float* __restrict__ wx0, const float* __restrict__ wx1,
                                         const int* __restrict__ iy0, const int* __restrict__ iy1,
                                         const float* __restrict__ wy0, const float* __restrict__ wy1,
                                         float* __restrict__ sub, long long H, long long W, long long nx)
{
    const long long n = H * W;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < n;
         p += (long long)blockDim.x * gridDim.x) {
        const long long y = p / W, x = p - y * W;
        const float v = lum[p];
        if (!isfinite(v)) {
            sub[p] = 0.0f;
            continue;
        }
        const float* r0 = mesh + iy0[y] * nx;
        const float* r1 = mesh + iy1[y] * nx;
        const float t0 = r0[ix0[x]] * wx0[x] + r0[ix1[x]] * wx1[x];
        const float t1 = r1[ix0[x]] * wx0[x] + r1[ix1[x]] * wx1[x];
        const float b = t0 * wy0[y] + t1 * wy1[y];
        sub[p] = v - b;
    }
}

extern "C" __global__ void bin2_mean(const float* __restrict__ src, float* __restrict__ out, long long H,
                                     long long W)
{
    const long long w2 = W / 2, n = (H / 2) * (W / 2);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const long long p = (i / w2) * 2 * W + (i % w2) * 2;
        out[i] = (((src[p] + src[p + 1]) + src[p + W]) + src[p + W + 1]) * 0.25f;
    }
}

extern "C" __global__ void box_rows(const float* __restrict__ src, const float* __restrict__ mask,
                                    float* __restrict__ out, long long H, long long W, long long box, long long step,
                                    long long nx, long long n_boxes)
{
    const long long side = (box + step - 1) / step, per = side * side;
    const long long n = n_boxes * per;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const long long b = i / per, j = i - b * per;
        const long long y = (b / nx) * box + (j / side) * step, x = (b % nx) * box + (j % side) * step;
        const long long p = y * W + x;
        out[i] = (y < H && x < W && isfinite(mask[p])) ? src[p] : nanf("");
    }
}

extern "C" __global__ void match_filter(const float* __restrict__ sub, float* __restrict__ f, long long H,
                                        long long W)
{
    const float k[3][3] = {{1.0f, 2.0f, 1.0f}, {2.0f, 4.0f, 2.0f}, {1.0f, 2.0f, 1.0f}};
    const long long n = H * W;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < n;
         p += (long long)blockDim.x * gridDim.x) {
        const long long y = p / W, x = p - y * W;
        float acc = 0.0f;
        for (int dy = -1; dy <= 1; ++dy) {
            if (y + dy < 0 || y + dy >= H) continue;
            for (int dx = -1; dx <= 1; ++dx) {
                if (x + dx < 0 || x + dx >= W) continue;
                acc = acc + k[dy + 1][dx + 1] * sub[p + dy * W + dx];
            }
        }
        f[p] = acc * 0.0625f;
    }
}

extern "C" __global__ void find_peaks(const float* __restrict__ f, long long* __restrict__ idx,
                                      unsigned long long* __restrict__ count, long long H, long long W, float thr,
                                      int min_area, long long cap)
{
    const long long n = H * W;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < n;
         p += (long long)blockDim.x * gridDim.x) {
        const float v = f[p];
        if (!(v > thr)) continue;
        const long long y = p / W, x = p - y * W;
        int above = 0;
        bool peak = true;
        for (int dy = -2; dy <= 2 && peak; ++dy) {
            if (y + dy < 0 || y + dy >= H) continue;
            for (int dx = -2; dx <= 2; ++dx) {
                if (x + dx < 0 || x + dx >= W) continue;
                const float u = f[p + dy * W + dx];
                above += u > thr ? 1 : 0;
                if (u > v || (u == v && (dy < 0 || (dy == 0 && dx < 0)))) {
                    peak = false;
                    break;
                }
            }
        }
        if (!peak || above < min_area) continue;
        const unsigned long long k = atomicAdd(count, 1ULL);
        if ((long long)k < cap) idx[k] = p;
    }
}

extern "C" __global__ void peak_moments(const float* __restrict__ sub, const float* __restrict__ f,
                                        const long long* __restrict__ idx, double* __restrict__ out, long long n_peaks, long long H, long long W,
                                        float thr)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_peaks;
         i += (long long)blockDim.x * gridDim.x) {
        const long long p = idx[i], py = p / W, px = p - py * W;
        double n = 0.0, s = 0.0, sx = 0.0, sy = 0.0, sxx = 0.0, syy = 0.0, sxy = 0.0;
        double ux = 0.0, uy = 0.0, uxx = 0.0, uyy = 0.0, flux = 0.0;
        float pk = -__int_as_float(0x7f800000), edge = -__int_as_float(0x7f800000);
        for (int dy = -SOURCES_R; dy <= SOURCES_R; ++dy) {
            if (py + dy < 0 || py + dy >= H) continue;
            for (int dx = -SOURCES_R; dx <= SOURCES_R; ++dx) {
                if (px + dx < 0 || px + dx >= W) continue;
                const long long q = p + dy * W + dx;
                if (!(f[q] > thr) || !src_downhill(f, p, W, dx, dy, thr)) continue;
                const float pix = sub[q];
                const double w = (double)f[q];
                n = n + 1.0;
                s = s + w;
                sx = sx + w * dx;
                sy = sy + w * dy;
                sxx = sxx + w * dx * dx;
                syy = syy + w * dy * dy;
                sxy = sxy + w * dx * dy;
                ux = ux + dx;
                uy = uy + dy;
                uxx = uxx + (double)(dx * dx);
                uyy = uyy + (double)(dy * dy);
                flux = flux + (double)pix;
                pk = pix > pk ? pix : pk;
            }
        }
        // the prominence: how far f falls on the way to the window's border, where it falls least
        for (int dy = -SOURCES_R; dy <= SOURCES_R; ++dy) {
            if (py + dy < 0 || py + dy >= H) continue;
            for (int dx = -SOURCES_R; dx <= SOURCES_R; ++dx) {
                if (px + dx < 0 || px + dx >= W) continue;
                if (dx != -SOURCES_R && dx != SOURCES_R && dy != -SOURCES_R && dy != SOURCES_R) continue;
                const float low = src_path_min(f, p, W, dx, dy);
                edge = low > edge ? low : edge;
            }
        }
        double* o = out + i;
        o[10 * n_peaks] = isinf(edge) ? (double)__int_as_float(0x7f800000) : (double)f[p] - (double)edge;
        if (!(s > 0.0)) {
            for (int c = 0; c < 10; ++c) o[c * n_peaks] = 0.0;
            continue;
        }
        const double mx = sx / s, my = sy / s;
        o[0 * n_peaks] = (double)px + mx;
        o[1 * n_peaks] = (double)py + my;
        o[2 * n_peaks] = flux;
        o[3 * n_peaks] = (double)pk;
        o[4 * n_peaks] = sxx / s - mx * mx;
        o[5 * n_peaks] = syy / s - my * my;
        o[6 * n_peaks] = sxy / s - mx * my;
        o[7 * n_peaks] = (uxx - 2.0 * mx * ux + n * mx * mx) / (s * s);
        o[8 * n_peaks] = (uyy - 2.0 * my * uy + n * my * my) / (s * s);
        o[9 * n_peaks] = n;
    }
}
