// debayer.cu -- Bayer demosaicing: white-balance pre-scale, bilinear,
// super-pixel and RCD (ratio corrected demosaicing, L. Sanz Rodriguez, v2.3
// structure). NumPy twins: skystack/engine/debayer.py.
//
// Conventions shared with the twins:
//   * `pat` packs the 2x2 CFA tile: colour (0=R, 1=G, 2=B) of the pixel at
//     (y, x) is (pat >> (2 * (((y & 1) << 1) | (x & 1)))) & 3.
//   * Colour output is channel-first float32 (3, H, W).
//   * NaN (and inf) mean "no data": bilinear averages only finite
//     neighbours; an RCD estimate that is not finite falls back to the
//     bilinear value of that pixel and channel.
//   * RCD reads neighbours through mirror reflection about the edge pixel
//     (index -k -> k, n-1+k -> n-1-k), which keeps the CFA phase; it needs
//     H, W >= 5 (the caller falls back to bilinear below that).

#define DB_EPS 1e-5f
#define DB_EPSSQ 1e-10f

// fmaxf(DB_EPSSQ, v) (DB_EPSSQ when v is NaN), as a comparison the host's compiler need not call for.
__device__ __forceinline__ float db_at_least_epssq(float v) { return v > DB_EPSSQ ? v : DB_EPSSQ; }

__device__ __forceinline__ int db_colour(int pat, int y, int x) {
    return (pat >> (2 * (((y & 1) << 1) | (x & 1)))) & 3;
}

__device__ __forceinline__ bool db_finite(float v) { return (v - v) == 0.0f; }

__device__ __forceinline__ int db_reflect(int i, int n) {
    if (i < 0) i = -i;
    if (i >= n) i = 2 * (n - 1) - i;
    return i;
}

// Value of plane `a` (H x W) at (y + dy, x + dx) with mirror reflection.
__device__ __forceinline__ float db_at(const float* a, int H, int W, int y, int x, int dy, int dx) {
    int yy = db_reflect(y + dy, H);
    int xx = db_reflect(x + dx, W);
    return a[(long long)yy * W + xx];
}

// db_at inside a kernel's grid-stride loop (item i at (y, x), `in` true when the pixel is at
// least 4 from every edge, the farthest any RCD step reads): a plain load there, the
// reflected one near the edges.
#define DB_AT(a, dy, dx) (in ? (a)[i + (long long)((dy) * W + (dx))] : db_at((a), H, W, y, x, (dy), (dx)))

// Declares the pixel of item i in a kernel's grid-stride loop for DB_AT: its row y and column x
// (32-bit division: H * W < 2^31, debayer.debayer checks) and `in`.
#define DB_LOCATE                 \
    const int y = (int)i / W;     \
    const int x = (int)i - y * W; \
    const bool in = y >= 4 && y < H - 4 && x >= 4 && x < W - 4

// The loop body of an RCD kernel around its item function CALL (which reads y, x, i and `in`).
// Native builds (kernels/native.py: the loop runs over a contiguous chunk of items) walk the chunk
// from item i row by row: no division per item, and the run of pixels at least 4 from every edge
// calls CALL with `in` a constant true, so its loads are plain (and the loop may vectorise); then
// i moves to the chunk's last item (the loop's ++i ends it). The same operations: the same bits.
#ifdef SKYSTACK_NATIVE
#define DB_ITEMS(CALL) DB_RUNS(CALL, for (; x < x_end; ++x, ++i) CALL)
// DB_ITEMS, with the run of pixels at least 4 from every edge (row y, columns x .. x_end - 1, from
// item i) given to RUN, which leaves x at x_end and i at its item: a kernel's run function
// computes the run in vectorisable loops (db_*_run below), with the item function's operations.
#define DB_RUNS(CALL, RUN)                                                           \
    {                                                                                \
        const long long last = skystack_item_end < n ? skystack_item_end : n;        \
        int y = (int)i / W;                                                          \
        int x = (int)i - y * W;                                                      \
        while (i < last) {                                                           \
            const bool row_in = y >= 4 && y < H - 4;                                 \
            if (row_in && x >= 4 && x < W - 4) {                                     \
                const long long left = last - i;                                     \
                const int x_end = (W - 4 - x < left) ? W - 4 : x + (int)left;        \
                const bool in = true;                                                \
                (void)in;                                                            \
                RUN;                                                                 \
            } else {                                                                 \
                const bool in = false;                                               \
                CALL;                                                                \
                ++x;                                                                 \
                ++i;                                                                 \
            }                                                                        \
            if (x == W) {                                                            \
                x = 0;                                                               \
                ++y;                                                                 \
            }                                                                        \
        }                                                                            \
        i = last - 1;                                                                \
    }
#else
#define DB_ITEMS(CALL) \
    {                  \
        DB_LOCATE;     \
        CALL;          \
    }
#define DB_RUNS(CALL, RUN) DB_ITEMS(CALL)
#endif

// Bilinear estimate of channel c at (y, x): the sample itself when the pixel
// has colour c, else the mean of the finite same-colour pixels among its 8
// neighbours (row-major order), NaN when there are none.
__device__ float db_bilinear_at(const float* cfa, int H, int W, int pat, int y, int x, int c) {
    if (db_colour(pat, y, x) == c) return cfa[(long long)y * W + x];
    float s = 0.0f;
    int n = 0;
    for (int dy = -1; dy <= 1; ++dy) {
        int yy = y + dy;
        if (yy < 0 || yy >= H) continue;
        for (int dx = -1; dx <= 1; ++dx) {
            if (dy == 0 && dx == 0) continue;
            int xx = x + dx;
            if (xx < 0 || xx >= W) continue;
            if (db_colour(pat, yy, xx) != c) continue;
            float v = cfa[(long long)yy * W + xx];
            if (!db_finite(v)) continue;
            s = s + v;
            n = n + 1;
        }
    }
    if (n == 0) return nanf("");
    return s / (float)n;
}

// out[i] = cfa[i] * w[colour(i)]  (n = H * W)
extern "C" __global__ void debayer_wb_kernel(float* out, const float* cfa, long long n, int W, int pat,
                                             float wr, float wg, float wb) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        int y = (int)i / W;  // 32-bit division: H * W < 2^31 (debayer.debayer checks)
        int x = (int)i - y * W;
        int c = db_colour(pat, y, x);
        float w = (c == 0) ? wr : ((c == 1) ? wg : wb);
        out[i] = cfa[i] * w;
    }
}

// out (3, H, W); one thread per pixel writes its three channels.
extern "C" __global__ void debayer_bilinear_kernel(float* out, const float* cfa, int H, int W, int pat) {
    long long n = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        int y = (int)i / W;  // 32-bit division: H * W < 2^31 (debayer.debayer checks)
        int x = (int)i - y * W;
        for (int c = 0; c < 3; ++c) out[c * n + i] = db_bilinear_at(cfa, H, W, pat, y, x, c);
    }
}

// out (3, H/2, W/2); output pixel (u, v) is the 2x2 tile at rows 2v..2v+1,
// cols 2u..2u+1: R and B are the samples, G the mean of the finite greens.
extern "C" __global__ void debayer_superpixel_kernel(float* out, const float* cfa, int H, int W, int pat) {
    int h2 = H / 2, w2 = W / 2;
    long long n = (long long)h2 * w2;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        int v = (int)(i / w2);
        int u = (int)(i - (long long)v * w2);
        float r = 0.0f, b = 0.0f, g1 = 0.0f, g2 = 0.0f;
        int ng = 0;
        for (int k = 0; k < 4; ++k) {
            int y = 2 * v + (k >> 1);
            int x = 2 * u + (k & 1);
            float s = cfa[(long long)y * W + x];
            int c = (pat >> (2 * k)) & 3;
            if (c == 0) {
                r = s;
            } else if (c == 2) {
                b = s;
            } else {
                if (ng == 0) g1 = s; else g2 = s;
                ng = ng + 1;
            }
        }
        bool f1 = db_finite(g1), f2 = db_finite(g2);
        float g = (f1 && f2) ? (g1 + g2) * 0.5f : (f1 ? g1 : g2);
        out[i] = r;
        out[n + i] = g;
        out[2 * n + i] = b;
    }
}

// ------------------------------------------------------------------ RCD
// Squared colour-difference high-pass of the CFA along a direction (sy, sx):
// ((c[-3] - c[-1] - c[+1] + c[+3]) - 3 (c[-2] + c[+2]) + 6 c[0])^2
__device__ __forceinline__ float rcd_hpf2(const float* cfa, int H, int W, int y, int x, long long i, bool in, int sy, int sx) {
    float t = (DB_AT(cfa, -3 * sy, -3 * sx) - DB_AT(cfa, -sy, -sx) - DB_AT(cfa, sy, sx) + DB_AT(cfa, 3 * sy, 3 * sx))
              - 3.0f * (DB_AT(cfa, -2 * sy, -2 * sx) + DB_AT(cfa, 2 * sy, 2 * sx))
              + 6.0f * cfa[i];
    return t * t;
}

// Step 1.1: squared high-pass along vertical, horizontal, P (\) and Q (/) diagonals.
__device__ __forceinline__ void rcd_hpf_item(float* hv, float* hh, float* hp, float* hq, const float* cfa,
                                          int H, int W,
                                          long long n, int y, int x, long long i, bool in) {
    hv[i] = rcd_hpf2(cfa, H, W, y, x, i, in, 1, 0);
    hh[i] = rcd_hpf2(cfa, H, W, y, x, i, in, 0, 1);
    hp[i] = rcd_hpf2(cfa, H, W, y, x, i, in, 1, 1);
    hq[i] = rcd_hpf2(cfa, H, W, y, x, i, in, 1, -1);
}

#ifdef SKYSTACK_NATIVE
// rcd_hpf2 on a run: c is the run's first pixel, s the step of the direction.
static inline float rcd_hpf2_run(const float* __restrict__ c, long long s) {
    float t = (c[-3 * s] - c[-s] - c[s] + c[3 * s]) - 3.0f * (c[-2 * s] + c[2 * s]) + 6.0f * c[0];
    return t * t;
}

// rcd_hpf_item on the run of len pixels from item i0 (all at least 4 from every edge).
__attribute__((noinline)) static void rcd_hpf_run(float* __restrict__ hv, float* __restrict__ hh,
                                                  float* __restrict__ hp, float* __restrict__ hq,
                                                  const float* __restrict__ cfa, int W, long long i0, int len) {
    const long long w = W;
    for (int k = 0; k < len; ++k) {
        const float* c = cfa + i0 + k;
        hv[i0 + k] = rcd_hpf2_run(c, w);
        hh[i0 + k] = rcd_hpf2_run(c, 1);
        hp[i0 + k] = rcd_hpf2_run(c, w + 1);
        hq[i0 + k] = rcd_hpf2_run(c, w - 1);
    }
}
#define RCD_HPF_RUN rcd_hpf_run(hv, hh, hp, hq, cfa, W, i, x_end - x); i += x_end - x; x = x_end
#else
#define RCD_HPF_RUN
#endif

extern "C" __global__ void rcd_hpf_kernel(float* hv, float* hh, float* hp, float* hq, const float* cfa,
                                          int H, int W) {
    long long n = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        DB_RUNS(rcd_hpf_item(hv, hh, hp, hq, cfa, H, W, n, y, x, i, in), RCD_HPF_RUN);
    }
}

// Step 1.2 + 2: directional discrimination VH_Dir, PQ_Dir and the low-pass filter.
__device__ __forceinline__ void rcd_dir_item(float* vhdir, float* pqdir, float* lpf, const float* hv,
                                          const float* hh, const float* hp, const float* hq,
                                          const float* cfa, int H, int W,
                                          long long n, int y, int x, long long i, bool in) {
    float vs = db_at_least_epssq((DB_AT(hv, -1, 0) + hv[i]) + DB_AT(hv, 1, 0));
    float hs = db_at_least_epssq((DB_AT(hh, 0, -1) + hh[i]) + DB_AT(hh, 0, 1));
    vhdir[i] = vs / (vs + hs);
    float ps = db_at_least_epssq((DB_AT(hp, -1, -1) + hp[i]) + DB_AT(hp, 1, 1));
    float qs = db_at_least_epssq((DB_AT(hq, -1, 1) + hq[i]) + DB_AT(hq, 1, -1));
    pqdir[i] = ps / (ps + qs);
    float card = ((DB_AT(cfa, -1, 0) + DB_AT(cfa, 1, 0)) + DB_AT(cfa, 0, -1))
                 + DB_AT(cfa, 0, 1);
    float diag = ((DB_AT(cfa, -1, -1) + DB_AT(cfa, -1, 1))
                  + DB_AT(cfa, 1, -1)) + DB_AT(cfa, 1, 1);
    lpf[i] = (cfa[i] + 0.5f * card) + 0.25f * diag;
}

#ifdef SKYSTACK_NATIVE
// rcd_dir_item on the run of len pixels from item i0.
__attribute__((noinline)) static void rcd_dir_run(float* __restrict__ vhdir, float* __restrict__ pqdir,
                                                  float* __restrict__ lpf, const float* __restrict__ hv,
                                                  const float* __restrict__ hh, const float* __restrict__ hp,
                                                  const float* __restrict__ hq, const float* __restrict__ cfa, int W,
                                                  long long i0, int len) {
    const long long w = W;
    for (int k = 0; k < len; ++k) {
        const long long i = i0 + k;
        float vs = db_at_least_epssq((hv[i - w] + hv[i]) + hv[i + w]);
        float hs = db_at_least_epssq((hh[i - 1] + hh[i]) + hh[i + 1]);
        vhdir[i] = vs / (vs + hs);
        float ps = db_at_least_epssq((hp[i - w - 1] + hp[i]) + hp[i + w + 1]);
        float qs = db_at_least_epssq((hq[i - w + 1] + hq[i]) + hq[i + w - 1]);
        pqdir[i] = ps / (ps + qs);
        float card = ((cfa[i - w] + cfa[i + w]) + cfa[i - 1]) + cfa[i + 1];
        float diag = ((cfa[i - w - 1] + cfa[i - w + 1]) + cfa[i + w - 1]) + cfa[i + w + 1];
        lpf[i] = (cfa[i] + 0.5f * card) + 0.25f * diag;
    }
}
#define RCD_DIR_RUN rcd_dir_run(vhdir, pqdir, lpf, hv, hh, hp, hq, cfa, W, i, x_end - x); i += x_end - x; x = x_end
#else
#define RCD_DIR_RUN
#endif

extern "C" __global__ void rcd_dir_kernel(float* vhdir, float* pqdir, float* lpf, const float* hv,
                                          const float* hh, const float* hp, const float* hq,
                                          const float* cfa, int H, int W) {
    long long n = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        DB_RUNS(rcd_dir_item(vhdir, pqdir, lpf, hv, hh, hp, hq, cfa, H, W, n, y, x, i, in), RCD_DIR_RUN);
    }
}

// Refined discrimination: the mean of the 4 diagonal neighbours when it is
// more decided (farther from 0.5) than the centre value.
__device__ __forceinline__ float rcd_disc(const float* dir, int H, int W, int y, int x, long long i, bool in) {
    float central = dir[i];
    float neigh = 0.25f * (((DB_AT(dir, -1, -1) + DB_AT(dir, -1, 1)) + DB_AT(dir, 1, -1)) + DB_AT(dir, 1, 1));
    return (fabsf(0.5f - central) < fabsf(0.5f - neigh)) ? neigh : central;
}

// Ratio correction 2 lpf0 / (lpf0 + lpfk): 1 when the denominator is not
// positive (or NaN), and clamped to [0, 2] (the range it has for
// non-negative data) so that negative calibrated values cannot blow it up.
// (RCD's reference adds eps = 1e-5 to the denominator, which biases faint
// signals in [0, 1] units by ~eps / (2 lpf); the guard makes it unnecessary.)
__device__ __forceinline__ float rcd_ratio(float l0, float lk) {
    float den = l0 + lk;
    float r = (den > 0.0f) ? (l0 + l0) / den : 1.0f;
    return (r < 0.0f) ? 0.0f : ((r > 2.0f) ? 2.0f : r);
}

// Step 3: green everywhere (G sites copy the sample); R/B sites also get
// their own sample in their own channel.
__device__ __forceinline__ void rcd_green_item(float* out, const float* cfa, const float* vhdir, const float* lpf,
                                            int H, int W, int pat,
                                          long long n, int y, int x, long long i, bool in) {
    int col = db_colour(pat, y, x);
    if (col == 1) {
        out[n + i] = cfa[i];
        return;
    }
    out[col * n + i] = cfa[i];
    float c0 = cfa[i];
    float cn1 = DB_AT(cfa, -1, 0), cs1 = DB_AT(cfa, 1, 0);
    float cw1 = DB_AT(cfa, 0, -1), ce1 = DB_AT(cfa, 0, 1);
    float cn2 = DB_AT(cfa, -2, 0), cs2 = DB_AT(cfa, 2, 0);
    float cw2 = DB_AT(cfa, 0, -2), ce2 = DB_AT(cfa, 0, 2);
    float cn3 = DB_AT(cfa, -3, 0), cs3 = DB_AT(cfa, 3, 0);
    float cw3 = DB_AT(cfa, 0, -3), ce3 = DB_AT(cfa, 0, 3);
    float cn4 = DB_AT(cfa, -4, 0), cs4 = DB_AT(cfa, 4, 0);
    float cw4 = DB_AT(cfa, 0, -4), ce4 = DB_AT(cfa, 0, 4);
    float ng = DB_EPS + fabsf(cn1 - cs1) + fabsf(c0 - cn2) + fabsf(cn1 - cn3) + fabsf(cn2 - cn4);
    float sg = DB_EPS + fabsf(cs1 - cn1) + fabsf(c0 - cs2) + fabsf(cs1 - cs3) + fabsf(cs2 - cs4);
    float wg = DB_EPS + fabsf(cw1 - ce1) + fabsf(c0 - cw2) + fabsf(cw1 - cw3) + fabsf(cw2 - cw4);
    float eg = DB_EPS + fabsf(ce1 - cw1) + fabsf(c0 - ce2) + fabsf(ce1 - ce3) + fabsf(ce2 - ce4);
    float l0 = lpf[i];
    float ne = cn1 * rcd_ratio(l0, DB_AT(lpf, -2, 0));
    float se = cs1 * rcd_ratio(l0, DB_AT(lpf, 2, 0));
    float we = cw1 * rcd_ratio(l0, DB_AT(lpf, 0, -2));
    float ee = ce1 * rcd_ratio(l0, DB_AT(lpf, 0, 2));
    float v_est = (sg * ne + ng * se) / (ng + sg);
    float h_est = (eg * we + wg * ee) / (eg + wg);
    float d = rcd_disc(vhdir, H, W, y, x, i, in);
    float g = d * (h_est - v_est) + v_est;
    if (!db_finite(g)) g = db_bilinear_at(cfa, H, W, pat, y, x, 1);
    out[n + i] = g;
}

#ifdef SKYSTACK_NATIVE
// Pixels a run function estimates at once (its estimates wait in a buffer of this many).
#define DB_BLOCK 256

// rcd_ratio with the division made whether it is kept or not (the same value where it is), so
// that a loop over a run may be vectorised.
static inline float rcd_ratio_run(float l0, float lk) {
    float den = l0 + lk;
    float q = (l0 + l0) / den;
    float r = (den > 0.0f) ? q : 1.0f;
    float lo = (r < 0.0f) ? 0.0f : r;
    return (lo > 2.0f) ? 2.0f : lo;
}

// rcd_disc at d (a pixel at least 4 from every edge; w the row length).
static inline float rcd_disc_run(const float* __restrict__ d, long long w) {
    float central = d[0];
    float neigh = 0.25f * (((d[-w - 1] + d[-w + 1]) + d[w - 1]) + d[w + 1]);
    return (fabsf(0.5f - central) < fabsf(0.5f - neigh)) ? neigh : central;
}

// Whether row y alternates green and another colour; *first_green: whether column x is green.
static inline bool db_bayer_row(int pat, int y, int x, bool* first_green) {
    const bool g0 = db_colour(pat, y, x) == 1, g1 = db_colour(pat, y, x + 1) == 1;
    *first_green = g0;
    return g0 != g1;
}

// The start of a run function (row y, columns x0 .. x0 + len - 1, from item i0): declares
// first_green (whether column x0 is green) where row y alternates green and another colour; on
// any other row it runs the item function ITEM (of k, the pixel's place in the run) on each
// pixel and returns.
#define DB_RUN_START(ITEM)                                   \
    bool first_green;                                        \
    if (!db_bayer_row(pat, y, x0, &first_green)) {           \
        for (int k = 0; k < len; ++k) ITEM;                  \
        return;                                              \
    }

// rcd_green_item on the run of len pixels from (y, x0), item i0: the estimate computed at every
// pixel (vectorised; the green sites keep their sample), then the other colour's own plane and
// the fallback of a non-finite estimate at the non-green sites.
__attribute__((noinline)) static void rcd_green_run(float* out, const float* __restrict__ cfa,
                                                    const float* __restrict__ vhdir, const float* __restrict__ lpf,
                                                    int H, int W, int pat, long long n, int y, int x0, long long i0,
                                                    int len) {
    DB_RUN_START(rcd_green_item(out, cfa, vhdir, lpf, H, W, pat, n, y, x0 + k, i0 + k, true));
    const long long w = W;
    const int odd = first_green ? 1 : 0;  // parity of k at the non-green sites
    const int col = db_colour(pat, y, x0 + odd);
    float* G = out + n;
    float est[DB_BLOCK];
    for (int b0 = 0; b0 < len; b0 += DB_BLOCK) {
        const int m = len - b0 < DB_BLOCK ? len - b0 : DB_BLOCK;
        for (int k = 0; k < m; ++k) {
            const long long i = i0 + b0 + k;
            const float* c = cfa + i;
            float c0 = c[0];
            float cn1 = c[-w], cs1 = c[w];
            float cw1 = c[-1], ce1 = c[1];
            float cn2 = c[-2 * w], cs2 = c[2 * w];
            float cw2 = c[-2], ce2 = c[2];
            float cn3 = c[-3 * w], cs3 = c[3 * w];
            float cw3 = c[-3], ce3 = c[3];
            float cn4 = c[-4 * w], cs4 = c[4 * w];
            float cw4 = c[-4], ce4 = c[4];
            float ng = DB_EPS + fabsf(cn1 - cs1) + fabsf(c0 - cn2) + fabsf(cn1 - cn3) + fabsf(cn2 - cn4);
            float sg = DB_EPS + fabsf(cs1 - cn1) + fabsf(c0 - cs2) + fabsf(cs1 - cs3) + fabsf(cs2 - cs4);
            float wg = DB_EPS + fabsf(cw1 - ce1) + fabsf(c0 - cw2) + fabsf(cw1 - cw3) + fabsf(cw2 - cw4);
            float eg = DB_EPS + fabsf(ce1 - cw1) + fabsf(c0 - ce2) + fabsf(ce1 - ce3) + fabsf(ce2 - ce4);
            float l0 = lpf[i];
            float ne = cn1 * rcd_ratio_run(l0, lpf[i - 2 * w]);
            float se = cs1 * rcd_ratio_run(l0, lpf[i + 2 * w]);
            float we = cw1 * rcd_ratio_run(l0, lpf[i - 2]);
            float ee = ce1 * rcd_ratio_run(l0, lpf[i + 2]);
            float v_est = (sg * ne + ng * se) / (ng + sg);
            float h_est = (eg * we + wg * ee) / (eg + wg);
            float d = rcd_disc_run(vhdir + i, w);
            est[k] = d * (h_est - v_est) + v_est;
        }
        for (int k = 0; k < m; ++k) {  // green sites: their sample; the others: the estimate
            const long long i = i0 + b0 + k;
            G[i] = ((b0 + k) & 1) == odd ? est[k] : cfa[i];
        }
    }
    for (int k = odd; k < len; k += 2) {  // the non-green sites' own colour, and the fallback
        out[col * n + i0 + k] = cfa[i0 + k];
        if (!db_finite(G[i0 + k])) G[i0 + k] = db_bilinear_at(cfa, H, W, pat, y, x0 + k, 1);
    }
}
#define RCD_GREEN_RUN rcd_green_run(out, cfa, vhdir, lpf, H, W, pat, n, y, x, i, x_end - x); i += x_end - x; x = x_end
#else
#define RCD_GREEN_RUN
#endif

extern "C" __global__ void rcd_green_kernel(float* out, const float* cfa, const float* vhdir, const float* lpf,
                                            int H, int W, int pat) {
    long long n = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        DB_RUNS(rcd_green_item(out, cfa, vhdir, lpf, H, W, pat, n, y, x, i, in), RCD_GREEN_RUN);
    }
}

// Step 4.2: red at blue sites and blue at red sites from diagonal colour
// differences (reads the green plane of out and the CFA samples).
__device__ __forceinline__ void rcd_rb_item(float* out, const float* cfa, const float* pqdir, int H, int W, int pat,
                                          long long n, int y, int x, long long i, bool in) {
    int col = db_colour(pat, y, x);
    if (col == 1) return;
    int c = 2 - col;
    const float* G = out + n;  // the green plane
    float g0 = G[i];
    float cnw = DB_AT(cfa, -1, -1), cne = DB_AT(cfa, -1, 1);
    float csw = DB_AT(cfa, 1, -1), cse = DB_AT(cfa, 1, 1);
    float nw_g = DB_EPS + fabsf(cnw - cse) + fabsf(cnw - DB_AT(cfa, -3, -3))
                 + fabsf(g0 - DB_AT(G, -2, -2));
    float ne_g = DB_EPS + fabsf(cne - csw) + fabsf(cne - DB_AT(cfa, -3, 3))
                 + fabsf(g0 - DB_AT(G, -2, 2));
    float sw_g = DB_EPS + fabsf(csw - cne) + fabsf(csw - DB_AT(cfa, 3, -3))
                 + fabsf(g0 - DB_AT(G, 2, -2));
    float se_g = DB_EPS + fabsf(cse - cnw) + fabsf(cse - DB_AT(cfa, 3, 3))
                 + fabsf(g0 - DB_AT(G, 2, 2));
    float nw_e = cnw - DB_AT(G, -1, -1);
    float ne_e = cne - DB_AT(G, -1, 1);
    float sw_e = csw - DB_AT(G, 1, -1);
    float se_e = cse - DB_AT(G, 1, 1);
    float p_est = (nw_g * se_e + se_g * nw_e) / (nw_g + se_g);
    float q_est = (ne_g * sw_e + sw_g * ne_e) / (ne_g + sw_g);
    float d = rcd_disc(pqdir, H, W, y, x, i, in);
    float v = g0 + (d * (q_est - p_est) + p_est);
    if (!db_finite(v)) v = db_bilinear_at(cfa, H, W, pat, y, x, c);
    out[c * n + i] = v;
}

#ifdef SKYSTACK_NATIVE
// rcd_rb_item on the run of len pixels from (y, x0), item i0: the estimate computed at every
// pixel of a block (vectorised), then kept at the non-green sites (or their fallback).
__attribute__((noinline)) static void rcd_rb_run(float* out, const float* __restrict__ cfa,
                                                 const float* __restrict__ pqdir, int H, int W, int pat, long long n,
                                                 int y, int x0, long long i0, int len) {
    DB_RUN_START(rcd_rb_item(out, cfa, pqdir, H, W, pat, n, y, x0 + k, i0 + k, true));
    const long long w = W;
    const int odd = first_green ? 1 : 0;
    const int c = 2 - db_colour(pat, y, x0 + odd);
    const float* __restrict__ G = out + n;
    float* __restrict__ X = out + c * n;
    float est[DB_BLOCK];
    for (int b0 = 0; b0 < len; b0 += DB_BLOCK) {
        const int m = len - b0 < DB_BLOCK ? len - b0 : DB_BLOCK;
        for (int k = 0; k < m; ++k) {
            const long long i = i0 + b0 + k;
            const float* cc = cfa + i;
            const float* g = G + i;
            float g0 = g[0];
            float cnw = cc[-w - 1], cne = cc[-w + 1];
            float csw = cc[w - 1], cse = cc[w + 1];
            float nw_g = DB_EPS + fabsf(cnw - cse) + fabsf(cnw - cc[-3 * w - 3]) + fabsf(g0 - g[-2 * w - 2]);
            float ne_g = DB_EPS + fabsf(cne - csw) + fabsf(cne - cc[-3 * w + 3]) + fabsf(g0 - g[-2 * w + 2]);
            float sw_g = DB_EPS + fabsf(csw - cne) + fabsf(csw - cc[3 * w - 3]) + fabsf(g0 - g[2 * w - 2]);
            float se_g = DB_EPS + fabsf(cse - cnw) + fabsf(cse - cc[3 * w + 3]) + fabsf(g0 - g[2 * w + 2]);
            float nw_e = cnw - g[-w - 1];
            float ne_e = cne - g[-w + 1];
            float sw_e = csw - g[w - 1];
            float se_e = cse - g[w + 1];
            float p_est = (nw_g * se_e + se_g * nw_e) / (nw_g + se_g);
            float q_est = (ne_g * sw_e + sw_g * ne_e) / (ne_g + sw_g);
            float d = rcd_disc_run(pqdir + i, w);
            est[k] = g0 + (d * (q_est - p_est) + p_est);
        }
        for (int k = (b0 + odd) & 1; k < m; k += 2) {  // the non-green sites
            const float v = est[k];
            X[i0 + b0 + k] = db_finite(v) ? v : db_bilinear_at(cfa, H, W, pat, y, x0 + b0 + k, c);
        }
    }
}
#define RCD_RB_RUN rcd_rb_run(out, cfa, pqdir, H, W, pat, n, y, x, i, x_end - x); i += x_end - x; x = x_end
#else
#define RCD_RB_RUN
#endif

extern "C" __global__ void rcd_rb_kernel(float* out, const float* cfa, const float* pqdir, int H, int W, int pat) {
    long long n = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        DB_RUNS(rcd_rb_item(out, cfa, pqdir, H, W, pat, n, y, x, i, in), RCD_RB_RUN);
    }
}

// Step 4.3: red and blue at green sites from cardinal colour differences
// (reads the R, G and B planes of out, complete at R/B sites after step 4.2).
__device__ __forceinline__ void rcd_rbg_item(float* out, const float* cfa, const float* vhdir, int H, int W, int pat,
                                          long long n, int y, int x, long long i, bool in) {
    if (db_colour(pat, y, x) != 1) return;
    const float* G = out + n;  // the green plane
    float g0 = G[i];
    float d = rcd_disc(vhdir, H, W, y, x, i, in);
    for (int c = 0; c <= 2; c += 2) {
        const float* X = out + c * n;
        float xn1 = DB_AT(X, -1, 0), xs1 = DB_AT(X, 1, 0);
        float xw1 = DB_AT(X, 0, -1), xe1 = DB_AT(X, 0, 1);
        float ng = DB_EPS + fabsf(g0 - DB_AT(G, -2, 0)) + fabsf(xn1 - xs1)
                   + fabsf(xn1 - DB_AT(X, -3, 0));
        float sg = DB_EPS + fabsf(g0 - DB_AT(G, 2, 0)) + fabsf(xs1 - xn1)
                   + fabsf(xs1 - DB_AT(X, 3, 0));
        float wg = DB_EPS + fabsf(g0 - DB_AT(G, 0, -2)) + fabsf(xw1 - xe1)
                   + fabsf(xw1 - DB_AT(X, 0, -3));
        float eg = DB_EPS + fabsf(g0 - DB_AT(G, 0, 2)) + fabsf(xe1 - xw1)
                   + fabsf(xe1 - DB_AT(X, 0, 3));
        float ne = xn1 - DB_AT(G, -1, 0);
        float se = xs1 - DB_AT(G, 1, 0);
        float we = xw1 - DB_AT(G, 0, -1);
        float ee = xe1 - DB_AT(G, 0, 1);
        float v_est = (ng * se + sg * ne) / (ng + sg);
        float h_est = (eg * we + wg * ee) / (eg + wg);
        float v = g0 + (d * (h_est - v_est) + v_est);
        if (!db_finite(v)) v = db_bilinear_at(cfa, H, W, pat, y, x, c);
        out[c * n + i] = v;
    }
}

#ifdef SKYSTACK_NATIVE
// rcd_rbg_item on the run of len pixels from (y, x0), item i0: both estimates computed at every
// pixel of a block (vectorised, into buffers: they read the planes they are written to), then
// kept at the green sites (or their fallback).
__attribute__((noinline)) static void rcd_rbg_run(float* out, const float* __restrict__ cfa,
                                                  const float* __restrict__ vhdir, int H, int W, int pat, long long n,
                                                  int y, int x0, long long i0, int len) {
    DB_RUN_START(rcd_rbg_item(out, cfa, vhdir, H, W, pat, n, y, x0 + k, i0 + k, true));
    const long long w = W;
    const int even = first_green ? 0 : 1;  // parity of k at the green sites
    const float* G = out + n;
    float est[2][DB_BLOCK];
    for (int b0 = 0; b0 < len; b0 += DB_BLOCK) {
        const int m = len - b0 < DB_BLOCK ? len - b0 : DB_BLOCK;
        for (int ch = 0; ch < 2; ++ch) {
            const float* X = out + 2 * ch * n;
            float* __restrict__ e = est[ch];
            for (int k = 0; k < m; ++k) {
                const long long i = i0 + b0 + k;
                const float* g = G + i;
                const float* xx = X + i;
                float g0 = g[0];
                float d = rcd_disc_run(vhdir + i, w);
                float xn1 = xx[-w], xs1 = xx[w];
                float xw1 = xx[-1], xe1 = xx[1];
                float ng = DB_EPS + fabsf(g0 - g[-2 * w]) + fabsf(xn1 - xs1) + fabsf(xn1 - xx[-3 * w]);
                float sg = DB_EPS + fabsf(g0 - g[2 * w]) + fabsf(xs1 - xn1) + fabsf(xs1 - xx[3 * w]);
                float wg = DB_EPS + fabsf(g0 - g[-2]) + fabsf(xw1 - xe1) + fabsf(xw1 - xx[-3]);
                float eg = DB_EPS + fabsf(g0 - g[2]) + fabsf(xe1 - xw1) + fabsf(xe1 - xx[3]);
                float ne = xn1 - g[-w];
                float se = xs1 - g[w];
                float we = xw1 - g[-1];
                float ee = xe1 - g[1];
                float v_est = (ng * se + sg * ne) / (ng + sg);
                float h_est = (eg * we + wg * ee) / (eg + wg);
                e[k] = g0 + (d * (h_est - v_est) + v_est);
            }
        }
        for (int k = (b0 + even) & 1; k < m; k += 2) {  // the green sites
            for (int ch = 0; ch < 2; ++ch) {
                const float v = est[ch][k];
                out[2 * ch * n + i0 + b0 + k] =
                    db_finite(v) ? v : db_bilinear_at(cfa, H, W, pat, y, x0 + b0 + k, 2 * ch);
            }
        }
    }
}
#define RCD_RBG_RUN rcd_rbg_run(out, cfa, vhdir, H, W, pat, n, y, x, i, x_end - x); i += x_end - x; x = x_end
#else
#define RCD_RBG_RUN
#endif

extern "C" __global__ void rcd_rbg_kernel(float* out, const float* cfa, const float* vhdir, int H, int W, int pat) {
    long long n = (long long)H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        DB_RUNS(rcd_rbg_item(out, cfa, vhdir, H, W, pat, n, y, x, i, in), RCD_RBG_RUN);
    }
}
