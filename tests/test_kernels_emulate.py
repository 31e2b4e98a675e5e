"""The CPU emulation harness of the CUDA kernels, and the rule that every kernel has an emulation test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from skystack.engine.backend import BLOCK, MAX_BLOCKS, grid_for
from skystack.engine.errors import KernelCompileError
from skystack.kernels import KERNEL_DIR, list_sources, parse_kernels, read_source
from skystack.kernels.emulate import emulated, emulator_available

pytestmark = pytest.mark.skipif(not emulator_available(), reason="g++ is not on PATH")

TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- coverage rule


def _all_kernels() -> dict[str, str]:
    """Kernel name -> source file, over every kernels/*.cu."""
    out = {}
    for src in list_sources():
        for name in parse_kernels(read_source(src)):
            out[name] = src
    return out


def _uncovered(kernels: dict[str, str], test_texts: list[str]) -> list[str]:
    """Kernels no test calls through ``.launch("<name>"`` or ``.call("<name>"``."""
    called = set()
    for text in test_texts:
        called |= set(re.findall(r"""\.(?:launch|call)\(\s*["']([A-Za-z_]\w*)["']""", text))
    return sorted(f"{src}:{name}" for name, src in kernels.items() if name not in called)


def _test_texts() -> list[str]:
    return [p.read_text() for p in sorted(TESTS.glob("*.py"))]


def test_every_kernel_has_an_emulation_test():
    kernels = _all_kernels()
    assert kernels, "no kernels found in kernels/*.cu"
    missing = _uncovered(kernels, _test_texts())
    assert not missing, (
        "kernels without an emulation test (call emulated(src).launch(\"<name>\", ...) in tests/): "
        + ", ".join(missing)
    )


def test_coverage_rule_reports_a_kernel_without_test(tmp_path):
    # A new .cu with a kernel nobody tests must be reported by the rule above.
    name = "brand_new_" + "kernel"  # built, so this file's text never launches it
    text = f'extern "C" __global__ void {name}(float* x, long long n) {{}}\n'
    texts = _test_texts()
    before = set(_uncovered(_all_kernels(), texts))
    kernels = {**_all_kernels(), **{k: "new.cu" for k in parse_kernels(text)}}
    assert set(_uncovered(kernels, texts)) - before == {f"new.cu:{name}"}
    # ...and is satisfied once a test launches it.
    texts.append(f'mod.launch("{name}", n, args)')
    assert set(_uncovered(kernels, texts)) == before
    # rawconv/combine kernels are covered by tests/test_rawconv.py and tests/test_combine.py
    assert not {m for m in before if m.split(":")[0] in ("rawconv.cu", "combine.cu")}


@pytest.mark.parametrize("src", list_sources())
def test_every_source_builds_for_emulation(src):
    mod = emulated(src)
    assert sorted(mod.kernels) == sorted(parse_kernels(read_source(src)))
    assert mod.path.exists()


# ----------------------------------------------------------------------------- harness self-tests

SELFTEST_CU = textwrap.dedent(r"""
    // Harness self-test kernels (not shipped).
    #ifndef OFFSET
    #define OFFSET 0.0f
    #endif
    extern "C" __global__ void emu_axpb(const float* __restrict__ x, float* __restrict__ y,
                                        long long n, float a, float b)
    {
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)blockDim.x * gridDim.x)
            y[i] = a * x[i] + b + OFFSET;
    }

    extern "C" __global__ void emu_atomics(const int* __restrict__ bins, const float* __restrict__ v,
                                           long long n, int* hist, unsigned int* uhist,
                                           unsigned long long* total, float* fsum, double* dsum,
                                           int* imin, int* imax)
    {
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)blockDim.x * gridDim.x) {
            atomicAdd(&hist[bins[i]], 1);
            atomicAdd(&uhist[bins[i]], 2u);
            atomicAdd(total, 1ULL);
            atomicAdd(fsum, v[i]);
            atomicAdd(dsum, (double)v[i]);
            atomicMin(imin, bins[i]);
            atomicMax(imax, bins[i]);
        }
    }

    extern "C" __global__ void emu_index2d(int* __restrict__ out, int width, int height)
    {
        const int x = blockIdx.x * blockDim.x + threadIdx.x;
        const int y = blockIdx.y * blockDim.y + threadIdx.y;
        if (x < width && y < height)
            out[y * width + x] = (int)(gridDim.x * 1000000 + blockDim.y * 10000 + y * 100 + x);
    }

    extern "C" __global__ void emu_math(const float* __restrict__ x, float* __restrict__ out,
                                        int* __restrict__ iout, long long n)
    {
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)blockDim.x * gridDim.x) {
            const float v = x[i];
            out[6 * i + 0] = __expf(v);
            out[6 * i + 1] = rsqrtf(fabsf(v) + 1.0f);
            out[6 * i + 2] = __fdividef(v, 3.0f);
            out[6 * i + 3] = fminf(v, 0.5f);
            out[6 * i + 4] = __saturatef(v);
            out[6 * i + 5] = isnan(v) ? -1.0f : (isinf(v) ? -2.0f : 0.0f);
            iout[i] = isfinite(v) ? __float2int_rn(v * 4.0f) : 0;
        }
    }

    extern "C" __global__ void emu_types(const unsigned short* a, const double* d,
                                         unsigned long long* u, long long n, unsigned int k,
                                         double s, int* out)
    {
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)blockDim.x * gridDim.x) {
            u[i] = (unsigned long long)a[i] * k;
            out[i] = (int)(d[i] * s);
        }
    }
""")


@pytest.fixture(scope="module")
def selftest_cu(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cu") / "selftest.cu"
    p.write_text(SELFTEST_CU)
    return p


@pytest.fixture(scope="module")
def mod(selftest_cu):
    return emulated(selftest_cu)  # an absolute path works as well as a kernels/ name


def test_parse_signatures(mod):
    assert mod.kernels == ["emu_axpb", "emu_atomics", "emu_index2d", "emu_math", "emu_types"]
    p = {q.name: q for q in mod.params("emu_types")}
    assert (p["a"].dtype, p["a"].pointer, p["a"].const) == (np.dtype(np.uint16), True, True)
    assert (p["u"].dtype, p["u"].pointer, p["u"].const) == (np.dtype(np.uint64), True, False)
    assert (p["n"].dtype, p["n"].pointer) == (np.dtype(np.int64), False)
    assert p["k"].dtype == np.uint32 and p["s"].dtype == np.float64 and p["d"].dtype == np.float64
    x = mod.params("emu_axpb")[0]
    assert (x.ctype, x.pointer, x.const) == ("float", True, True)


def test_parse_ignores_comments_and_rejects_unknown_types():
    text = '// extern "C" __global__ void ghost(float* x) {}\n/* extern "C" __global__ void ghost2() */\n'
    assert parse_kernels(text) == {}
    with pytest.raises(ValueError, match="unsupported type"):
        parse_kernels('extern "C" __global__ void k(float3* p) {}')


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 100_003])
def test_grid_stride_covers_every_item(mod, rng, n):
    x = rng.normal(size=n).astype(np.float32)
    y = np.full(n, np.nan, dtype=np.float32)
    mod.launch("emu_axpb", n, (x, y, np.int64(n), np.float32(2.5), np.float32(-1.0)))
    expect = np.float32(2.5) * x + np.float32(-1.0)  # same float32 ops: exact
    np.testing.assert_array_equal(y, expect)


def test_grid_is_capped_like_backend_launch(mod, rng):
    # More items than MAX_BLOCKS * block threads: only the grid-stride loop reaches the tail.
    block = 32
    n = MAX_BLOCKS * block + 1000
    assert grid_for(n, block) == MAX_BLOCKS
    x = rng.normal(size=n).astype(np.float32)
    y = np.zeros(n, dtype=np.float32)
    mod.launch("emu_axpb", n, (x, y, np.int64(n), np.float32(1.0), np.float32(0.0)), block=block)
    np.testing.assert_array_equal(y, x)


def test_defines_change_the_build(selftest_cu, rng):
    plain, shifted = emulated(selftest_cu), emulated(selftest_cu, ("OFFSET=10.0f",))
    assert plain.path != shifted.path
    x = rng.normal(size=50).astype(np.float32)
    y0, y1 = np.empty_like(x), np.empty_like(x)
    args = (np.int64(50), np.float32(1.0), np.float32(0.0))
    plain.launch("emu_axpb", 50, (x, y0, *args))
    shifted.launch("emu_axpb", 50, (x, y1, *args))
    np.testing.assert_array_equal(y1, x + np.float32(10.0))
    np.testing.assert_array_equal(y0, x)


def test_memoized(selftest_cu, mod):
    assert emulated(selftest_cu) is mod


def test_atomics(mod, rng):
    n = 10_001
    bins = rng.integers(3, 40, size=n).astype(np.int32)
    v = rng.uniform(0, 1, size=n).astype(np.float32)
    hist = np.zeros(64, np.int32)
    uhist = np.zeros(64, np.uint32)
    total = np.zeros(1, np.uint64)
    fsum = np.zeros(1, np.float32)
    dsum = np.zeros(1, np.float64)
    imin = np.array([1000], np.int32)
    imax = np.array([-1000], np.int32)
    mod.launch("emu_atomics", n, (bins, v, np.int64(n), hist, uhist, total, fsum, dsum, imin, imax),
               block=64)
    np.testing.assert_array_equal(hist, np.bincount(bins, minlength=64))
    np.testing.assert_array_equal(uhist, 2 * np.bincount(bins, minlength=64))
    assert total[0] == n
    ref = float(np.sum(v.astype(np.float64)))
    assert dsum[0] == pytest.approx(ref, rel=1e-12)
    assert fsum[0] == pytest.approx(ref, rel=1e-5)
    assert (imin[0], imax[0]) == (bins.min(), bins.max())


def test_2d_launch_geometry(mod):
    w, h = 37, 11
    out = np.full(w * h, -1, np.int32)
    grid, block = ((w + 7) // 8, (h + 3) // 4), (8, 4)
    mod.call("emu_index2d", grid, block, (out, np.int32(w), np.int32(h)))
    y, x = np.mgrid[0:h, 0:w]
    np.testing.assert_array_equal(out.reshape(h, w), grid[0] * 1_000_000 + 4 * 10_000 + y * 100 + x)


def test_reverse_order_gives_the_same_answer(mod, rng):
    n = 3000
    x = rng.normal(size=n).astype(np.float32)
    y0, y1 = np.empty_like(x), np.empty_like(x)
    args = (np.int64(n), np.float32(3.0), np.float32(1.0))
    mod.launch("emu_axpb", n, (x, y0, *args), block=128)
    mod.launch("emu_axpb", n, (x, y1, *args), block=128, reverse=True)
    np.testing.assert_array_equal(y0, y1)


def test_math_intrinsics(mod, rng):
    x = np.concatenate([rng.normal(0, 3, 500), [0.0, 0.125, 0.375, -0.625, 1.0, -1.0, 2.0,
                                                 np.nan, np.inf, -np.inf]]).astype(np.float32)
    n = x.size
    out = np.zeros((n, 6), np.float32)
    iout = np.zeros(n, np.int32)
    mod.launch("emu_math", n, (x, out, iout, np.int64(n)))
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(out[:, 0], np.exp(x64), rtol=1e-6)
        np.testing.assert_allclose(out[:, 1], 1 / np.sqrt(np.abs(x64) + 1), rtol=1e-6)
        np.testing.assert_allclose(out[:, 2], x64 / 3, rtol=1e-6)
        np.testing.assert_array_equal(out[:, 3], np.fmin(x, np.float32(0.5)))
        np.testing.assert_array_equal(out[:, 4], np.where(np.isnan(x), 0, np.clip(x, 0, 1)))
    np.testing.assert_array_equal(out[:, 5], np.where(np.isnan(x), -1, np.where(np.isinf(x), -2, 0)))
    fin = np.isfinite(x)
    # __float2int_rn rounds half to even, like np.rint: 0.125*4=0.5 -> 0, 0.375*4=1.5 -> 2, -2.5 -> -2
    np.testing.assert_array_equal(iout[fin], np.rint(x[fin] * 4).astype(np.int32))
    assert list(iout[-10:-3]) == [0, 0, 2, -2, 4, -4, 8]


def test_unsigned_and_double_types(mod, rng):
    n = 99
    a = rng.integers(0, 65535, size=n).astype(np.uint16)
    d = rng.uniform(-100, 100, size=n)
    u = np.zeros(n, np.uint64)
    out = np.zeros(n, np.int32)
    mod.launch("emu_types", n, (a, d, u, np.int64(n), np.uint32(70_000), np.float64(2.5), out))
    np.testing.assert_array_equal(u, a.astype(np.uint64) * 70_000)
    np.testing.assert_array_equal(out, np.trunc(d * 2.5).astype(np.int32))


# ----------------------------------------------------------------------------- argument checks


def _axpb_args(**over):
    args = {"x": np.zeros(10, np.float32), "y": np.zeros(10, np.float32), "n": np.int64(10),
            "a": np.float32(1), "b": np.float32(0)}
    args.update(over)
    return tuple(args.values())


@pytest.mark.parametrize("over, match", [
    ({"x": np.zeros(10, np.float64)}, r"argument 0 'x' \(const float\* __restrict__\): expected a float32 array"),
    ({"y": np.zeros(20, np.float32)[::2]}, "C-contiguous"),
    ({"n": 10}, r"'n' \(long long\): expected a NumPy scalar np.int64"),
    ({"n": np.int32(10)}, "expected a NumPy scalar np.int64"),
    ({"a": 1.0}, "expected a NumPy scalar np.float32"),
    ({"a": np.float64(1.0)}, "expected a NumPy scalar np.float32"),
    ({"x": [0.0] * 10}, "expected a NumPy array"),
])
def test_argument_validation(mod, over, match):
    with pytest.raises(TypeError, match=match):
        mod.launch("emu_axpb", 10, _axpb_args(**over))


def test_argument_count_and_readonly_output(mod):
    with pytest.raises(TypeError, match="takes 5 arguments"):
        mod.launch("emu_axpb", 10, _axpb_args()[:4])
    y = np.zeros(10, np.float32)
    y.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        mod.launch("emu_axpb", 10, _axpb_args(y=y))
    x = np.zeros(10, np.float32)
    x.flags.writeable = False  # const input: fine
    mod.launch("emu_axpb", 10, _axpb_args(x=x))
    with pytest.raises(ValueError, match="no kernel 'nope'"):
        mod.launch("nope", 10, ())


def test_compile_error_shows_the_gxx_log(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
    with pytest.raises(KernelCompileError, match="undefined_name"):
        emulated(bad)


def test_concurrent_builds_share_the_cache(tmp_path):
    # Two processes build the same fresh source into one cache folder at once.
    src = tmp_path / "race.cu"
    src.write_text(SELFTEST_CU.replace("emu_axpb", f"emu_race_{os.getpid()}"))
    cache = tmp_path / "cache"
    code = (
        "import numpy as np, sys\n"
        "from skystack.kernels.emulate import emulated\n"
        f"m = emulated({str(src)!r})\n"
        "x = np.arange(5, dtype=np.float32); y = np.zeros(5, np.float32)\n"
        f"m.launch('emu_race_{os.getpid()}', 5, (x, y, np.int64(5), np.float32(2), np.float32(1)))\n"
        "assert (y == 2 * x + 1).all()\n"
        "print(m.path)\n"
    )
    env = {**os.environ, "SKYSTACK_EMU_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1 and Path(paths.pop()).parent == cache
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []


def test_shim_is_package_data():
    assert (KERNEL_DIR / "cuda_shim.h").is_file()
    assert BLOCK == 256
