// cuda_shim.h -- lets g++ compile skystack's CUDA C kernels for the CPU emulator.
//
// Used only by skystack.kernels.emulate (never by NVRTC/CuPy). It defines the
// CUDA qualifiers away, provides dim3 and the threadIdx/blockIdx/blockDim/
// gridDim globals that the generated launch wrapper sets before calling the
// kernel body for each (block, thread), and provides the atomics and math
// intrinsics CUDA device code uses. Threads run one at a time, so the atomics
// are plain read-modify-write. Build with -ffp-contract=off (no fused
// multiply-add) so float arithmetic rounds like NumPy and like NVRTC with
// --fmad=false.
#ifndef SKYSTACK_CUDA_SHIM_H
#define SKYSTACK_CUDA_SHIM_H

#include <math.h>
#include <cmath>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstring>

#define SKYSTACK_EMULATION 1

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __constant__
#define __managed__
#define __launch_bounds__(...)
// __restrict__ is a g++ keyword already.

// ---------------------------------------------------------------- geometry
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
static thread_local uint3 threadIdx = {0, 0, 0};
static thread_local uint3 blockIdx = {0, 0, 0};
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;
static const int warpSize = 32;

// ---------------------------------------------------------------- classification
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// ---------------------------------------------------------------- integer/float min/max (CUDA overloads)
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline long long llmin(long long a, long long b) { return a < b ? a : b; }
static inline long long llmax(long long a, long long b) { return a > b ? a : b; }
static inline unsigned int umin(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int umax(unsigned int a, unsigned int b) { return a > b ? a : b; }

// ---------------------------------------------------------------- math intrinsics
// Fast-math intrinsics map to the accurate functions (the GPU versions differ by
// a few ulp; tests compare such kernels with a tolerance).
// glibc already declares most of these names (as aliases of the accurate
// functions), so they are macros here.
#define __expf(x) expf(x)
#define __exp10f(x) exp10f(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __log10f(x) log10f(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __sincosf(x, s, c) sincosf((x), (s), (c))
#define __powf(x, y) powf((x), (y))
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
static inline float sinpif(float x) { return sinf(3.14159265358979323846f * x); }
static inline float cospif(float x) { return cosf(3.14159265358979323846f * x); }
static inline float __saturatef(float x) { return isnan(x) ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

// ---------------------------------------------------------------- conversions
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }  // ties to even
static inline int __float2int_rz(float x) { return (int)truncf(x); }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned int __float2uint_rn(float x) { return (unsigned int)nearbyintf(x); }
static inline unsigned int __float2uint_rz(float x) { return (unsigned int)truncf(x); }
static inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
static inline long long __float2ll_rz(float x) { return (long long)truncf(x); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __uint2float_rn(unsigned int x) { return (float)x; }
static inline float __ll2float_rn(long long x) { return (float)x; }
static inline int __double2int_rn(double x) { return (int)nearbyint(x); }
static inline float __double2float_rn(double x) { return (float)x; }
static inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
static inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
static inline unsigned int __float_as_uint(float x) { unsigned int i; std::memcpy(&i, &x, 4); return i; }
static inline float __uint_as_float(unsigned int i) { float x; std::memcpy(&x, &i, 4); return x; }
static inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
static inline double __longlong_as_double(long long i) { double x; std::memcpy(&x, &i, 8); return x; }

// ---------------------------------------------------------------- integer intrinsics
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __mul24(int a, int b) { return a * b; }
static inline unsigned int __umul24(unsigned int a, unsigned int b) { return a * b; }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * (long long)b) >> 32); }

// ---------------------------------------------------------------- atomics
// Threads run sequentially in the emulator, so these need no hardware atomics.
// The native CPU backend (SKYSTACK_NATIVE: blocks run on several cores) gets real
// ones: a compare-and-swap loop on GCC's generic __atomic builtins.
// Each returns the old value, like CUDA's.
#ifdef SKYSTACK_NATIVE
#define SKYSTACK_ATOMIC_RMW(NAME, T, EXPR)                                               \
    static inline T NAME(T* address, T val) {                                            \
        T old;                                                                           \
        __atomic_load(address, &old, __ATOMIC_RELAXED);                                  \
        T desired;                                                                       \
        do {                                                                             \
            desired = (EXPR);                                                            \
        } while (!__atomic_compare_exchange(address, &old, &desired, false,              \
                                            __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));        \
        return old;                                                                      \
    }
#else
#define SKYSTACK_ATOMIC_RMW(NAME, T, EXPR)                 \
    static inline T NAME(T* address, T val) {              \
        T old = *address;                                  \
        *address = (EXPR);                                 \
        return old;                                        \
    }
#endif
SKYSTACK_ATOMIC_RMW(atomicAdd, int, old + val)
SKYSTACK_ATOMIC_RMW(atomicAdd, unsigned int, old + val)
SKYSTACK_ATOMIC_RMW(atomicAdd, unsigned long long, old + val)
SKYSTACK_ATOMIC_RMW(atomicAdd, float, old + val)
SKYSTACK_ATOMIC_RMW(atomicAdd, double, old + val)
SKYSTACK_ATOMIC_RMW(atomicSub, int, old - val)
SKYSTACK_ATOMIC_RMW(atomicSub, unsigned int, old - val)
SKYSTACK_ATOMIC_RMW(atomicExch, int, val)
SKYSTACK_ATOMIC_RMW(atomicExch, unsigned int, val)
SKYSTACK_ATOMIC_RMW(atomicExch, unsigned long long, val)
SKYSTACK_ATOMIC_RMW(atomicExch, float, val)
SKYSTACK_ATOMIC_RMW(atomicMin, int, (val < old ? val : old))
SKYSTACK_ATOMIC_RMW(atomicMin, unsigned int, (val < old ? val : old))
SKYSTACK_ATOMIC_RMW(atomicMin, long long, (val < old ? val : old))
SKYSTACK_ATOMIC_RMW(atomicMin, unsigned long long, (val < old ? val : old))
SKYSTACK_ATOMIC_RMW(atomicMax, int, (val > old ? val : old))
SKYSTACK_ATOMIC_RMW(atomicMax, unsigned int, (val > old ? val : old))
SKYSTACK_ATOMIC_RMW(atomicMax, long long, (val > old ? val : old))
SKYSTACK_ATOMIC_RMW(atomicMax, unsigned long long, (val > old ? val : old))
SKYSTACK_ATOMIC_RMW(atomicAnd, int, old & val)
SKYSTACK_ATOMIC_RMW(atomicAnd, unsigned int, old & val)
SKYSTACK_ATOMIC_RMW(atomicAnd, unsigned long long, old & val)
SKYSTACK_ATOMIC_RMW(atomicOr, int, old | val)
SKYSTACK_ATOMIC_RMW(atomicOr, unsigned int, old | val)
SKYSTACK_ATOMIC_RMW(atomicOr, unsigned long long, old | val)
SKYSTACK_ATOMIC_RMW(atomicXor, int, old ^ val)
SKYSTACK_ATOMIC_RMW(atomicXor, unsigned int, old ^ val)
SKYSTACK_ATOMIC_RMW(atomicInc, unsigned int, (old >= val) ? 0u : old + 1u)
SKYSTACK_ATOMIC_RMW(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef SKYSTACK_ATOMIC_RMW

#ifdef SKYSTACK_NATIVE
#define SKYSTACK_ATOMIC_CAS(T)                                                            \
    static inline T atomicCAS(T* address, T compare, T val) {                             \
        __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_SEQ_CST,      \
                                    __ATOMIC_SEQ_CST);                                    \
        return compare;                                                                   \
    }
SKYSTACK_ATOMIC_CAS(int)
SKYSTACK_ATOMIC_CAS(unsigned int)
SKYSTACK_ATOMIC_CAS(unsigned long long)
#undef SKYSTACK_ATOMIC_CAS
#else
static inline int atomicCAS(int* address, int compare, int val) {
    int old = *address;
    if (old == compare) *address = val;
    return old;
}
static inline unsigned int atomicCAS(unsigned int* address, unsigned int compare, unsigned int val) {
    unsigned int old = *address;
    if (old == compare) *address = val;
    return old;
}
static inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                           unsigned long long val) {
    unsigned long long old = *address;
    if (old == compare) *address = val;
    return old;
}
#endif

// No-ops: threads never share memory within a launch under the kernel rules.
static inline void __threadfence() {}
static inline void __threadfence_block() {}

#endif  // SKYSTACK_CUDA_SHIM_H
