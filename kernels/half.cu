// half.cu -- float32 <-> IEEE binary16 (float16) of the spilled frame store, one
// thread per value. NumPy twins: FrameStore._encode_numpy / _decode_numpy in
// skystack/engine/framestore.py (np.multiply into float16 with a float32
// product, and back), whose bits these kernels give.
//
// to_half: h = half(src * scale), the product in float32, then rounded to the
// nearest float16 (ties to even); above the largest half (65504, with its
// rounding: from 65520 on) it becomes +-inf, below half the smallest subnormal
// (2^-25) a signed zero; a NaN stays a NaN (the quiet 0x7e00 with its sign).
// from_half: dst = float(h) * scale, exact conversion, float32 product.
// Every branch is computed and one selected by bit masks, so g++ vectorises the
// loop on the host; the only float operations (the product, the subnormal rounding by
// adding 0.5, m * 2^-24) are exact or IEEE round-to-nearest-even and give the
// same result with flush-to-zero (a float32 subnormal rounds to a zero half).

// c ? a : b, as bit masks: no branch for the host compiler to keep (a float operation in a
// branch stops g++ from vectorising the loop)
__device__ __forceinline__ unsigned int half_select(bool c, unsigned int a, unsigned int b)
{
    const unsigned int m = 0u - (unsigned int)c;
    return (a & m) | (b & ~m);
}

__device__ __forceinline__ unsigned short half_bits(float f)
{
    const unsigned int x = __float_as_uint(f);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int a = x & 0x7fffffffu;
    // normal half (2^-14 <= |f| < 65520): rebias, round to nearest even; a carry past 0x7bff gives inf
    const unsigned int normal = (a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u)) >> 13;
    // |f| < 2^-14: |f| + 0.5 rounds |f| to a multiple of 2^-24, the subnormal half's step
    // (ties to even); its low bits are the half's, 0x400 (the smallest normal) on a carry
    const unsigned int sub = __float_as_uint(__uint_as_float(a) + 0.5f) - 0x3f000000u;
    const unsigned int big = half_select(a > 0x7f800000u, 0x7e00u, 0x7c00u);  // NaN, else inf (|f| >= 65536)
    const unsigned int r = half_select(a >= 0x47800000u, big, half_select(a < 0x38800000u, sub, normal));
    return (unsigned short)(sign | r);
}

__device__ __forceinline__ float half_value(unsigned short h)
{
    const unsigned int u = (unsigned int)h;
    const unsigned int sign = (u & 0x8000u) << 16;
    const unsigned int e = (u >> 10) & 0x1fu;
    const unsigned int m = u & 0x03ffu;
    const float sub = (float)(int)m * 5.9604644775390625e-08f;      // zero or subnormal: m * 2^-24, exact
    const unsigned int big = 0x7f800000u | (m << 13);              // inf or NaN
    const unsigned int normal = ((e + 112u) << 23) | (m << 13);
    const unsigned int bits = half_select(e == 0u, __float_as_uint(sub), half_select(e == 0x1fu, big, normal));
    return __uint_as_float(sign | bits);
}

extern "C" __global__ void to_half(const float* __restrict__ src, unsigned short* __restrict__ dst,
                                   long long n, float scale)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        dst[i] = half_bits(src[i] * scale);
    }
}

extern "C" __global__ void from_half(const unsigned short* __restrict__ src, float* __restrict__ dst,
                                     long long n, float scale)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        dst[i] = half_value(src[i]) * scale;
    }
}
