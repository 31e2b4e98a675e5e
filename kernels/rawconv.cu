// rawconv.cu -- raw sensor data to normalised float32.
//
// out = (raw - black[pos]) / range[pos], pos = ((y & 1) << 1) | (x & 1) being the
// pixel's place in the 2x2 CFA tile (row-major, as engine/frame.py defines it)
// and range = white - black. The last two axes of the data are (height, width);
// leading axes (e.g. 3 colour planes) repeat the same 2x2 rule. Negative
// results are kept (clipping at 0 would bias the noise floor of dark frames).
// NumPy twin: skystack.engine.rawconv._cfa_to_float_numpy.

__device__ __forceinline__ float rawconv_pick(int pos, float v0, float v1, float v2, float v3)
{
    return pos == 0 ? v0 : (pos == 1 ? v1 : (pos == 2 ? v2 : v3));
}

// The 2x2 CFA tile's black levels and ranges (white - black), in tile order.
#define RAWCONV_LEVELS \
    float black0, float black1, float black2, float black3, float range0, float range1, float range2, float range3

// Black level *b and range *r of item i: those of its place in the CFA tile (x = i % width,
// y = (i / width) % height).
__device__ __forceinline__ void rawconv_levels(long long i, int width, int height, RAWCONV_LEVELS, float* b, float* r)
{
    const long long x = i % width;
    const long long y = (i / width) % height;
    const int pos = (int)(((y & 1) << 1) | (x & 1));
    *b = rawconv_pick(pos, black0, black1, black2, black3);
    *r = rawconv_pick(pos, range0, range1, range2, range3);
}

#ifdef SKYSTACK_NATIVE
// Native builds (kernels/native.py) run each kernel's loop over a contiguous chunk of items: there
// the chunk goes row by row, the tile's levels picked once per row (no 64-bit division per item,
// which took half the time), then i moves to the chunk's last item (the loop's ++i ends it). The
// same operations: the same bits.
#define RAWCONV_BODY(VALUE)                                                                     \
    {                                                                                           \
        const long long last = skystack_item_end < n ? skystack_item_end : n;                  \
        long long x = i % width;                                                                \
        long long y = (i / width) % height;                                                     \
        while (i < last) {                                                                      \
            const long long stop = last - i < width - x ? last : i + (width - x);               \
            const int p0 = (int)((y & 1) << 1);                                                 \
            const float b0 = rawconv_pick(p0, black0, black1, black2, black3);                  \
            const float b1 = rawconv_pick(p0 | 1, black0, black1, black2, black3);              \
            const float r0 = rawconv_pick(p0, range0, range1, range2, range3);                  \
            const float r1 = rawconv_pick(p0 | 1, range0, range1, range2, range3);              \
            for (; i < stop; ++i, ++x) {                                                        \
                const bool odd = (x & 1) != 0;                                                  \
                out[i] = (VALUE - (odd ? b1 : b0)) / (odd ? r1 : r0);                           \
            }                                                                                   \
            x = 0;                                                                              \
            y = y + 1 == height ? 0 : y + 1;                                                    \
        }                                                                                       \
        i = last - 1;                                                                           \
    }
#else
#define RAWCONV_BODY(VALUE)                                                                     \
    {                                                                                           \
        float b, r;                                                                             \
        rawconv_levels(i, width, height, black0, black1, black2, black3, range0, range1, range2, \
                       range3, &b, &r);                                                         \
        out[i] = (VALUE - b) / r;                                                               \
    }
#endif

// uint16 input (camera RAW, 16-bit FITS/TIFF): 2 bytes per pixel cross the bus.
extern "C" __global__ void cfa_to_float_u16(const unsigned short* __restrict__ raw, float* __restrict__ out,
                                            long long n, int width, int height, RAWCONV_LEVELS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        RAWCONV_BODY((float)raw[i])
}

// float32 input (float FITS/TIFF, or other integer types converted first).
extern "C" __global__ void cfa_to_float_f32(const float* __restrict__ raw, float* __restrict__ out,
                                            long long n, int width, int height, RAWCONV_LEVELS)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        RAWCONV_BODY(raw[i])
}
