"""Native CPU kernels (kernels/native.py): the CUDA sources at -O3, blocks over the cores, against the twins.

The same comparisons as the emulation tests: every operation's GPU branch runs
its kernels natively on NumPy arrays and must give the NumPy twin's bits.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from skystack.engine import combine as combine_mod
from skystack.engine import debayer as debayer_mod
from skystack.engine import rawconv as rawconv_mod
from skystack.engine import warp as warp_mod
from skystack.engine.backend import BLOCK
from skystack.engine.combine import METHODS, combine, max_frames_define
from skystack.kernels.native import available, host_isa, native
from skystack.kernels.native import threads as threads_default

pytestmark = pytest.mark.skipif(not available(), reason="g++ is not on PATH")

KAPPAS = {"sigma": (2.5, 3.0), "winsorized": (2.0, 2.5), "linear": (2.1, 2.6), "percentile": (0.04, 0.05),
          "minmax": (1.0, 2.0), "median": (3.0, 3.0), "mean": (3.0, 3.0), "gesd": (0.3, 0.05)}


def _native_launch(source, kernel, n_items, args, *, defines=(), block=BLOCK):
    native(source, tuple(defines)).launch(kernel, n_items, args, block=block)


def use_native(monkeypatch, module):
    """Send ``module``'s operations down their GPU branch on NumPy arrays, kernels built natively."""
    monkeypatch.setattr(module, "is_device_array", lambda a: isinstance(a, np.ndarray))
    monkeypatch.setattr(module, "launch", _native_launch)


def _cube(rng, n, h, w):
    cube = rng.normal(1.0, 0.05, size=(n, h, w)).astype(np.float32)
    cube[rng.random(cube.shape) < 0.05] = np.nan
    cube[rng.random(cube.shape) < 0.04] += 1.0  # outliers
    return cube


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n, h, w", [(1, 1, 1), (3, 1, 9), (20, 16, 15), (65, 5, 3), (30, 64, 70)])
def test_combine_native_equals_twin(monkeypatch, rng, method, n, h, w):
    cube = _cube(rng, n, h, w)
    scale = rng.uniform(0.9, 1.1, n).astype(np.float32)
    offset = rng.normal(0, 0.01, n).astype(np.float32)
    weights = rng.uniform(0.5, 2, n).astype(np.float32)
    kl, kh = KAPPAS[method]
    kw = dict(method=method, kappa_low=kl, kappa_high=kh, scale=scale, offset=offset, weights=weights)
    twin = combine(cube, **kw)
    use_native(monkeypatch, combine_mod)
    got = combine(cube, **kw)
    for f in ("mean", "count", "rejected"):  # rejected: real atomics from several cores
        np.testing.assert_array_equal(getattr(got, f), getattr(twin, f))


def test_native_blocks_run_on_several_cores_with_the_same_bits(rng):
    """Small blocks, many of them: the per-frame atomic counts and the results equal the one-core run."""
    n, h, w = 30, 50, 41
    cube = _cube(rng, n, h, w)
    ones = np.ones(n, np.float32)

    def run(mod, block):
        mean, count = np.empty((h, w), np.float32), np.empty((h, w), np.int32)
        rej = np.zeros(n, np.uint64)
        mod.launch("sigma_clip_mean", h * w, (cube, np.int64(h * w), np.int32(n), ones, ones * 0, ones,
                                              np.float32(2.5), np.float32(2.5), np.int32(10), mean, count, rej),
                   block=block)
        return mean, count, rej

    from skystack.kernels.emulate import emulated

    ref = run(emulated("combine.cu", max_frames_define(n)), 256)
    got = run(native("combine.cu", max_frames_define(n)), 8)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    assert ref[2].sum() > 0


@pytest.mark.parametrize("kind", ["u16", "f32"])
def test_rawconv_native_equals_twin(monkeypatch, rng, kind):
    raw = rng.integers(0, 4096, size=(37, 50)).astype(np.uint16)
    if kind == "f32":
        raw = raw.astype(np.float32)
    kw = dict(pattern="RGGB", black_level=(60, 64, 64, 61), white_level=4095)
    twin = rawconv_mod.cfa_to_float(raw, **kw)
    use_native(monkeypatch, rawconv_mod)
    np.testing.assert_array_equal(rawconv_mod.cfa_to_float(raw, **kw), twin)


def test_native_row_walks_give_the_emulators_bits(rng):
    """Native builds walk raw conversion and the fused calibration + defect fix row by row (no
    64-bit division per item): the emulator's bits (one item at a time) across planes of odd height
    (the CFA row parity restarts with each plane), chunks that end inside rows and planes, and one
    or three cores."""
    from skystack.kernels.emulate import emulated

    levels = [np.float32(v) for v in (0.01, 0.02, 0.03, 0.04, 0.9, 0.8, 0.7, 0.6)]
    for planes, h, w in ((1, 37, 50), (3, 37, 51), (2, 5, 1001)):
        n = planes * h * w
        raw = rng.integers(0, 4096, size=(planes, h, w)).astype(np.uint16)
        light = rng.normal(0.3, 0.05, (planes, h, w)).astype(np.float32)
        mask = (rng.random((h, w)) < 0.05).astype(np.uint8)
        calib = (light, light * 0.1, light * 0.2, light * 0 + 0.9)
        runs = {"cfa_to_float_u16": (raw, np.int64(n), np.int32(w), np.int32(h), *levels),
                "cfa_to_float_f32": (raw.astype(np.float32), np.int64(n), np.int32(w), np.int32(h), *levels)}
        for kernel, (src, *rest) in runs.items():
            want = np.empty((planes, h, w), np.float32)
            emulated("rawconv.cu").launch(kernel, n, (src, want, *rest))
            mod = native("rawconv.cu")
            for threads in (1, 3):
                mod.set_threads(threads)
                got = np.full_like(want, np.nan)
                mod.launch(kernel, n, (src, got, *rest))
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
            mod.set_threads(threads_default())
        args = (*calib, mask, np.int64(n), np.int32(h), np.int32(w), np.int32(0b01101001), np.int32(1),
                np.int32(1), np.int32(1), np.float32(0.8))
        want = np.empty_like(light)
        emulated("calibrate.cu").launch("calibrate_cosmetic_kernel", n, (want, *args))
        mod = native("calibrate.cu")
        for threads in (1, 3):
            mod.set_threads(threads)
            got = np.full_like(want, np.nan)
            mod.launch("calibrate_cosmetic_kernel", n, (got, *args))
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        mod.set_threads(threads_default())


@pytest.mark.parametrize("with_defects", [False, True])
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_calibrate_native_equals_twin(monkeypatch, rng, with_defects, mode):
    """The host's calibration (fused with the defect fix when there is a map), natively built or
    chosen by timing: the native kernel runs (twice: forced twice, or a warm-up and the timed launch)
    and gives the twin's bits, flats at zero and NaN included."""
    from skystack.engine import backend as be
    from skystack.engine import calibrate as cal_mod
    from skystack.kernels import native as nat

    launched = []
    real = nat.native

    class Spy:  # the real native module, its launches counted (no cache path: no kept choice either)
        def __init__(self, source, defines=()):
            self.mod = real(source, defines)

        def launch(self, kernel, *a, **k):
            launched.append(kernel)
            return self.mod.launch(kernel, *a, **k)

        def set_threads(self, n):
            self.mod.set_threads(n)

    monkeypatch.setattr(nat, "native", Spy)

    h, w = 130, 140  # past NATIVE_MIN_ITEMS: auto times the kernel
    light = rng.normal(0.3, 0.05, (h, w)).astype(np.float32)
    bias = rng.normal(0.01, 0.001, (h, w)).astype(np.float32)
    dark = rng.normal(0.02, 0.01, (h, w)).astype(np.float32)
    flat = rng.uniform(0.6, 1.2, (h, w)).astype(np.float32)
    flat[3, 4], flat[10, 11], light[7, 8] = 0.0, np.nan, np.nan
    defects = (rng.random((h, w)) < 0.02).astype(np.uint8) if with_defects else None
    kw = dict(bias=bias, dark=dark, dark_scale=0.8, flat=flat, defects=defects, pattern="RGGB")
    monkeypatch.setattr(be, "_native_choice", {})
    monkeypatch.setenv("SKYSTACK_NATIVE", "off")
    twin = cal_mod.calibrate(light, **kw)
    monkeypatch.setenv("SKYSTACK_NATIVE", mode)
    for _ in range(2):  # (auto: the timed launch, then the choice)
        np.testing.assert_array_equal(cal_mod.calibrate(light, **kw), twin)
    kernel = "calibrate_cosmetic_kernel" if with_defects else "calibrate_kernel"
    assert launched[:2] == [kernel, kernel], launched


@pytest.mark.parametrize("method", ["bilinear", "rcd", "superpixel"])
def test_debayer_native_equals_twin(monkeypatch, rng, method):
    cfa = rng.uniform(0.0, 1.0, size=(45, 62)).astype(np.float32)
    twin = debayer_mod.debayer(cfa, "GRBG", method=method, wb=(1.7, 1.0, 1.3))
    use_native(monkeypatch, debayer_mod)
    got = debayer_mod.debayer(cfa, "GRBG", method=method, wb=(1.7, 1.0, 1.3))
    np.testing.assert_allclose(got, twin, rtol=1e-5, atol=1e-7, equal_nan=True)  # as the GPU test


@pytest.mark.parametrize("method", ["lanczos3", "bilinear"])
def test_warp_native_equals_twin(monkeypatch, rng, method):
    src = rng.uniform(0, 1, size=(3, 40, 52)).astype(np.float32)
    src[:, 20:23, 30:32] = np.nan  # a hole inside (the kernel's fast path must fall back around it)
    src[1, 8, 12] = np.nan
    src[:, :, :3] = np.nan  # and a no-data border, as a warped frame has
    t = np.array([[np.cos(0.1), -np.sin(0.1), 3.2], [np.sin(0.1), np.cos(0.1), -1.7], [0, 0, 1]])
    twin = warp_mod.warp(src, t, (38, 50), method=method)
    use_native(monkeypatch, warp_mod)
    got = warp_mod.warp(src, t, (38, 50), method=method)
    # the same float operations in the same order (no contraction): the same bits
    np.testing.assert_array_equal(got, twin)


@pytest.mark.parametrize("method", ["lanczos3", "bilinear"])
@pytest.mark.parametrize("lens", [False, True])
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_native_warp_blocks_give_the_twins_bits(monkeypatch, rng, method, lens, isa):
    """The native build warps blocks of pixels (their positions, floors and weights in vectorised
    loops, and the taps of runs of neighbours side by side): the twin's bits across rows that end
    inside a block, chunks of the launch, the frame's edge, holes inside runs and a lens (a floor
    that truncates fails it, and so do a run's tap sums taken in another order), built for AVX2
    and for baseline x86-64."""
    from skystack.engine.lens import RadialLens

    src = rng.uniform(0, 1, size=(3, 61, 77)).astype(np.float32)
    src[:, 30:33, 40:42] = np.nan
    src[0, 10, 20] = np.nan
    lp = RadialLens(cx=38.0, cy=30.0, r_norm=48.0, k1=-0.08, k2=0.01) if lens else None
    for angle in (0.2, 0.004):  # runs of a few pixels, and runs as long as a block (taps side by side)
        t = np.array([[np.cos(angle), -np.sin(angle), 9.4], [np.sin(angle), np.cos(angle), -6.3], [0, 0, 1]])
        twin = warp_mod.warp(src, t, (59, 83), method=method, lens=lp)
        with monkeypatch.context() as mp:
            use_native(mp, warp_mod)
            mp.setenv("SKYSTACK_NATIVE_ISA", isa)
            host_isa.cache_clear()
            got = warp_mod.warp(src, t, (59, 83), method=method, lens=lp)
        host_isa.cache_clear()
        np.testing.assert_array_equal(got, twin)
        assert np.isfinite(got).mean() > 0.5


@pytest.mark.parametrize("pattern", ["RGGB", "GRBG", "GBRG", "BGGR"])
@pytest.mark.parametrize("rows", [2, 6, 40])
def test_rcd_on_the_host_band_by_band_gives_the_whole_frames_bits(rng, pattern, rows):
    """The host's RCD runs in bands of rows with a halo of mosaic either side: the same bits as one
    launch over the whole frame (and the twin's values), down to bands of two rows, holes included."""
    cfa = rng.gamma(2.0, 300.0, size=(151, 83)).astype(np.float32)
    cfa[rng.random(cfa.shape) < 0.003] = np.nan
    cfa[rng.integers(0, 151, 40), rng.integers(0, 83, 40)] += 20000.0  # sharp peaks: large differences
    code = debayer_mod.pattern_code(pattern)
    mod = native(debayer_mod._SRC)
    whole = debayer_mod._rcd_launch(mod.launch, np, cfa, code)
    banded = debayer_mod._rcd_bands(mod.launch, cfa, code, band_rows=rows)
    np.testing.assert_array_equal(banded, whole)
    np.testing.assert_allclose(banded, debayer_mod._rcd_numpy(cfa, code), rtol=1e-5, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("pattern", ["RGGB", "GRBG", "GBRG", "BGGR"])
def test_native_rcd_runs_give_the_emulators_bits(rng, isa, pattern):
    """Native builds compute RCD's steps over each row's interior run in vectorised loops (every
    pixel's estimate into a buffer, then kept at its sites; the ratios' division made whether kept
    or not): the emulator's bits, which run the item functions one pixel at a time, across
    frames narrower than a run, runs longer than a buffer (256), chunks of the launch that end
    inside rows, holes (the bilinear fallback) and sharp peaks (clamped ratios)."""
    from skystack.kernels.emulate import emulated

    code = debayer_mod.pattern_code(pattern)
    for h, w in ((37, 8), (40, 9), (61, 300), (23, 613)):
        cfa = rng.gamma(2.0, 300.0, size=(h, w)).astype(np.float32)
        cfa[rng.random(cfa.shape) < 0.01] = np.nan
        cfa[rng.integers(0, h, 30), rng.integers(0, w, 30)] += 20000.0
        cfa[h // 3:h // 3 + 5, w // 2:w // 2 + 3] = -900.0  # dark patches: ratios clamped to 0 and 2
        cfa[h // 2:h // 2 + 2, 1:5] = -400.0
        want = debayer_mod._rcd_launch(emulated(debayer_mod._SRC).launch, np, cfa, code)
        mod = native(debayer_mod._SRC, isa=isa)
        for threads in (1, 3):
            mod.set_threads(threads)
            got = debayer_mod._rcd_launch(mod.launch, np, cfa, code)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        mod.set_threads(threads_default())


@pytest.mark.parametrize("method", ["rcd", "bilinear"])
def test_debayer_into_a_callers_buffer(rng, method):
    """``debayer(out=...)`` (the stack's reused per-thread buffer) gives the same bits, in ``out``."""
    cfa = rng.gamma(2.0, 300.0, size=(140, 96)).astype(np.float32)
    want = debayer_mod.debayer(cfa, "BGGR", method=method)
    buf = np.full((3, 140, 96), -1.0, np.float32)
    got = debayer_mod.debayer(cfa, "BGGR", method=method, out=buf)
    assert got is buf
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- the CPU branch's choice


@pytest.fixture
def choice(monkeypatch):
    """A fresh per-kernel choice, and a count of the native launches."""
    from skystack.engine import backend as be
    from skystack.kernels import native as nat

    monkeypatch.setattr(be, "_native_choice", {})
    calls = []
    real = nat.native

    def spy(source, defines=()):
        mod = real(source, defines)

        class Counting:
            def launch(self, kernel, *a, **k):
                calls.append(kernel)
                return mod.launch(kernel, *a, **k)

            def set_threads(self, n):
                mod.set_threads(n)

        return Counting()

    monkeypatch.setattr(nat, "native", spy)
    return be, calls


def _warp_case(rng):
    src = rng.uniform(0, 1, size=(3, 200, 150)).astype(np.float32)
    t = np.array([[1.0, 0.01, 2.5], [-0.01, 1.0, -1.5], [0, 0, 1]])
    return src, t


def _twin_warp(src, t):
    out = np.empty((3, 200, 150), np.float32)
    warp_mod._warp_numpy(src, warp_mod.inverse_coeffs(t), out, "lanczos3")
    return out


@pytest.mark.parametrize("mode, launches", [("on", 2), ("off", 0)])
def test_native_mode_on_and_off(monkeypatch, choice, rng, mode, launches):
    be, calls = choice
    monkeypatch.setenv("SKYSTACK_NATIVE", mode)
    src, t = _warp_case(rng)
    a = warp_mod.warp(src, t, (200, 150))
    b = warp_mod.warp(src, t, (200, 150))
    assert len(calls) == launches
    np.testing.assert_allclose(a, _twin_warp(src, t), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a, b)


def test_auto_times_both_once_and_keeps_the_faster(monkeypatch, choice, rng):
    be, calls = choice
    monkeypatch.delenv("SKYSTACK_NATIVE", raising=False)
    src, t = _warp_case(rng)
    first = warp_mod.warp(src, t, (200, 150))
    np.testing.assert_array_equal(first, _twin_warp(src, t))  # the benchmark call returns the twin's
    key = ("warp.cu", "warp_lanczos3", ())
    assert len(calls) == 2 and be._native_choice[key] in ("native", "twin")  # a warm-up, then the timed launch
    for _ in range(3):
        warp_mod.warp(src, t, (200, 150))
    assert len(calls) == (5 if be._native_choice[key] == "native" else 2)


def test_no_compiler_uses_the_twins_and_says_so_once(monkeypatch, choice, rng, caplog):
    import logging

    from skystack.kernels import native as nat

    be, calls = choice
    monkeypatch.setenv("SKYSTACK_NATIVE", "on")
    monkeypatch.setattr(nat, "emulator_available", lambda: False)
    monkeypatch.setattr(nat, "_said", False)
    src, t = _warp_case(rng)
    with caplog.at_level(logging.INFO, logger="skystack.kernels.native"):
        got = warp_mod.warp(src, t, (200, 150))
        warp_mod.warp(src, t, (200, 150))
        nat.available()
    np.testing.assert_array_equal(got, _twin_warp(src, t))
    assert calls == []
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "NumPy twins" in caplog.records[0].getMessage() and len(caplog.records) == 1


@pytest.mark.parametrize("method", ["sigma", "linear", "median"])
def test_combine_on_the_cpu_uses_native_kernels_with_the_twins_bits(monkeypatch, choice, rng, method):
    be, calls = choice
    monkeypatch.setenv("SKYSTACK_NATIVE", "on")
    cube = _cube(rng, 25, 30, 41)
    got = combine(cube, method=method)
    monkeypatch.setenv("SKYSTACK_NATIVE", "off")
    twin = combine(cube, method=method)
    assert len(calls) == 1
    for f in ("mean", "count", "rejected"):
        np.testing.assert_array_equal(getattr(got, f), getattr(twin, f))


def test_bad_native_mode_is_one_clear_error(monkeypatch, rng):
    from skystack.engine.errors import SkystackError

    monkeypatch.setenv("SKYSTACK_NATIVE", "fast")
    with pytest.raises(SkystackError, match="SKYSTACK_NATIVE='fast': use auto, on or off"):
        combine(_cube(rng, 5, 4, 4))


# ----------------------------------------------------------------------------- sharing the cores


def test_set_threads_is_per_calling_thread():
    """``set_threads`` sizes the OpenMP team of the calling thread's launches only (libgomp's per-thread ICV)."""
    import ctypes

    mod = native("combine.cu", max_frames_define(5))
    get = ctypes.CDLL(str(mod.path)).omp_get_max_threads
    default = get()
    seen = {}

    def worker(k):
        mod.set_threads(k)
        seen[k] = get()

    for k in (3, 5):
        t = threading.Thread(target=worker, args=(k,))
        t.start()
        t.join()
    assert seen == {3: 3, 5: 5}
    assert get() == default  # the main thread's teams keep their size


class _FakeModule:
    """A native module that records each launch with the team size its thread asked for."""

    def __init__(self):
        self.size = threading.local()
        self.launches = []

    def set_threads(self, n):
        self.size.n = n

    def launch(self):
        self.launches.append(getattr(self.size, "n", None))


@pytest.fixture
def fake_native(monkeypatch):
    from skystack.engine import backend as be
    from skystack.kernels import native as nat

    mod = _FakeModule()
    monkeypatch.setattr(be, "_native_choice", {})
    monkeypatch.setattr(nat, "native", lambda source, defines=(): mod)
    monkeypatch.setattr(nat, "available", lambda: True)
    monkeypatch.setattr(nat, "threads", lambda: 4)
    monkeypatch.delenv("SKYSTACK_NATIVE", raising=False)
    return be, mod


def test_concurrent_first_calls_benchmark_once_on_their_share(fake_native):
    """Two pool threads reaching a kernel's first launch together: one benchmark (a warm-up, then the
    native launch on the thread's share of the cores), not two that time each other; the other thread
    then runs the choice."""
    import time

    be, mod = fake_native
    twins = []
    start = threading.Barrier(2)

    def twin():
        twins.append(1)
        time.sleep(0.05)  # the slower one: native wins
        return "twin"

    def native_op(m):
        m.launch()
        return "native"

    out = []

    def caller():
        start.wait()
        with be.cpu_workers(2):
            out.append(be.run_cpu("combine.cu", "gesd_clip_mean", 1 << 20, twin, native_op))

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert be._native_choice[("combine.cu", "gesd_clip_mean", ())] == "native"
    assert sorted(out) == ["native", "twin"] and len(twins) == 1
    assert mod.launches == [2, 2, 2]  # warm-up and timed launch on the pool thread's 4 // 2 cores; then 2
    be._native_choice.clear()
    be.run_cpu("combine.cu", "gesd_clip_mean", 1 << 20, twin, native_op)  # a lone caller: every core
    assert mod.launches[3:] == [4, 4]


def test_a_later_process_reuses_the_benchmarks_choice(fake_native, tmp_path, monkeypatch):
    """The choice is kept beside the native build (per kernel, share of the cores and CPU model): a
    later process (a fresh ``_native_choice``) runs the kept choice without timing the twin again; a
    damaged or foreign record, or one timed on a launch under half the size of this one, is timed afresh."""
    import json
    import time

    be, mod = fake_native
    mod.path = tmp_path / "combine-0123abcd.so"
    monkeypatch.setattr(be, "_busy_elsewhere", lambda *a: 0.0)  # a quiet machine (see the test below)
    twins = []

    def twin():
        twins.append(1)
        time.sleep(0.05)  # the slower one: native wins
        return "twin"

    def run(n=1 << 20):
        return be.run_cpu("combine.cu", "gesd_clip_mean", n, twin, lambda m: (m.launch(), "native")[1])

    assert run() == "twin" and len(twins) == 1 and len(mod.launches) == 2  # timed: a warm-up, the timed launch
    kept = tmp_path / "combine-0123abcd.gesd_clip_mean.4of4.choice.json"
    rec = json.loads(kept.read_text())
    assert rec["choice"] == "native" and rec["cpu"] == be.cpu_model() and rec["twin_s"] >= 0.05
    be._native_choice.clear()  # a new process
    assert run() == "native" and len(twins) == 1 and len(mod.launches) == 3  # no benchmark: one launch
    for bad in ("{not json", json.dumps({**rec, "cpu": "another CPU"})):
        kept.write_text(bad)
        be._native_choice.clear()
        before = len(mod.launches)
        assert run() == "twin" and len(mod.launches) == before + 2  # timed again
    assert len(twins) == 3 and json.loads(kept.read_text())["cpu"] == be.cpu_model()
    be._native_choice.clear()
    assert run(1 << 21) == "native" and len(twins) == 3  # twice the timed size: still this record
    be._native_choice.clear()
    assert run(1 << 22) == "twin" and len(twins) == 4 and json.loads(kept.read_text())["n_items"] == 1 << 22
    with be.cpu_workers(2):  # another share of the cores: its own record
        be._native_choice.clear()
        run()
    assert (tmp_path / "combine-0123abcd.gesd_clip_mean.2of4.choice.json").is_file()
    kept.unlink()  # a near tie is not kept: the next process times it again
    be._native_choice.clear()
    tie = lambda out: (time.sleep(0.03), out)[1]  # noqa: E731 (both take the same time)
    assert be.run_cpu("combine.cu", "gesd_clip_mean", 1 << 20, lambda: tie("twin"), lambda m: tie("native"))
    assert not kept.exists()


def test_a_variant_is_timed_and_kept_apart(fake_native, tmp_path, monkeypatch):
    """One kernel launched in two shapes (``variant``): each gets its own benchmark, its own choice in
    the process and its own record beside the build, and neither decides for the other."""
    import json
    import time

    be, mod = fake_native
    mod.path = tmp_path / "framestats-0123abcd.so"
    monkeypatch.setattr(be, "_busy_elsewhere", lambda *a: 0.0)

    def run(variant, twin_s, native_s):
        return be.run_cpu("framestats.cu", "clipped_mad_sigma_rows", 1 << 20,
                          lambda: (time.sleep(twin_s), "twin")[1],
                          lambda m: (m.launch(), time.sleep(native_s), "native")[2], variant=variant)

    run("", 0.0, 0.05)  # long rows: the twin wins
    run("boxes", 0.05, 0.0)  # short rows: native wins
    assert be._native_choice[("framestats.cu", "clipped_mad_sigma_rows", ())] == "twin"
    assert be._native_choice[("framestats.cu", "clipped_mad_sigma_rows", (), "boxes")] == "native"
    plain = tmp_path / "framestats-0123abcd.clipped_mad_sigma_rows.4of4.choice.json"
    boxes = tmp_path / "framestats-0123abcd.clipped_mad_sigma_rows.boxes.4of4.choice.json"
    assert json.loads(plain.read_text())["choice"] == "twin" and json.loads(boxes.read_text())["choice"] == "native"
    assert run("boxes", 0.0, 0.0) == "native" and run("", 0.0, 0.0) == "twin"


def test_a_benchmark_on_a_busy_machine_is_not_kept(fake_native, tmp_path, monkeypatch):
    """Other processes busy during the benchmark: its winner serves this process only, and the next
    process times it again. The probe sees another process's CPU time and not this one's."""
    import subprocess
    import sys
    import time

    be, mod = fake_native
    mod.path = tmp_path / "combine-0123abcd.so"
    kept = tmp_path / "combine-0123abcd.gesd_clip_mean.4of4.choice.json"

    def run():
        be._native_choice.clear()
        return be.run_cpu("combine.cu", "gesd_clip_mean", 1 << 20, lambda: (time.sleep(0.05), "twin")[1],
                          lambda m: (m.launch(), "native")[1])

    monkeypatch.setattr(be, "_busy_elsewhere", lambda *a: 0.5)
    assert run() == "twin" and be._native_choice[("combine.cu", "gesd_clip_mean", ())] == "native"
    assert not kept.exists()
    monkeypatch.setattr(be, "_busy_elsewhere", lambda *a: 0.1)
    run()
    assert kept.is_file()
    monkeypatch.undo()
    start = be._cpu_busy()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"],
                   check=True)  # another process busy for 0.4 s
    assert be._busy_elsewhere(start, time.perf_counter() - t0) >= 0.15
    start = be._cpu_busy()
    t0 = time.perf_counter()
    t = time.process_time()
    while time.process_time() - t < 0.3:  # this process busy: not elsewhere
        pass
    assert be._busy_elsewhere(start, time.perf_counter() - t0) < 0.15 or _machine_busy()


def _machine_busy() -> bool:
    """Whether other processes keep this machine's cores busy now (then the probe rightly sees them)."""
    import psutil

    return psutil.cpu_percent(interval=0.3) > 30


def test_native_launches_share_the_cores(fake_native):
    """A pool of k workers (``cpu_workers``) or k launches in flight: each team takes cores // k."""
    be, mod = fake_native
    be._native_choice[("combine.cu", "k", ())] = "native"

    def run():
        be.run_cpu("combine.cu", "k", 1 << 20, lambda: None, lambda m: m.launch())

    run()
    with be.cpu_workers(2):
        run()
        with be.cpu_workers(8):
            run()
        run()
    run()
    assert mod.launches == [4, 2, 1, 2, 4]
    inside, release = threading.Barrier(2), threading.Event()

    def slow(m):
        m.launch()
        inside.wait()  # both launches in flight
        release.wait(5)

    t = threading.Thread(target=lambda: be.run_cpu("combine.cu", "k", 1 << 20, None, slow))
    t.start()
    be.run_cpu("combine.cu", "k", 1 << 20, None, lambda m: (m.launch(), inside.wait(), release.set()))
    t.join()
    assert sorted(mod.launches[5:]) == [2, 4]  # the second one in flight took half


def test_combine_store_splits_tiles_by_rows_one_core_per_worker(monkeypatch, rng):
    """The CPU combine gives each worker thread a band of rows (every channel of it), one core each
    for its native launches, and the image, count and rejections of one combine per channel."""
    from skystack.engine import backend as be
    from skystack.engine.backend import CPU
    from skystack.engine.framestore import FrameStore
    from skystack.engine.stack import StackConfig, _combine_store
    from skystack.kernels import native as nat

    n, c, h, w = 12, 3, 90, 400
    store = FrameStore(n, (c, h, w))
    frames = [_cube(rng, c, h, w) for _ in range(n)]
    for i, f in enumerate(frames):
        store.put(i, f)
    scale = rng.uniform(0.9, 1.1, (n, c)).astype(np.float32)
    offset = rng.normal(0, 0.01, (n, c)).astype(np.float32)
    weights = rng.uniform(0.5, 2, (n, c)).astype(np.float32)
    sizes = []
    real = nat.native("combine.cu", max_frames_define(n))

    class Spy:
        def set_threads(self, k):
            sizes.append(k)
            real.set_threads(k)

        def launch(self, *a, **k):
            real.launch(*a, **k)

    monkeypatch.setattr(be, "_native_choice", {})
    monkeypatch.setattr(nat, "native", lambda source, defines=(): Spy())
    monkeypatch.setattr(nat, "threads", lambda: 2)
    monkeypatch.setenv("SKYSTACK_NATIVE", "on")
    cfg = StackConfig(quiet=True, workers=2)  # auto: gesd for 12 frames
    image, count, _cov, rejected = _combine_store(store, list(range(n)), scale, offset, weights, cfg, CPU,
                                                  budget=n * w * 4 * 6 * 30)  # tiles of 30 rows
    assert sizes and set(sizes) == {1}  # two bands per tile, one core each
    cube = np.stack(frames)
    monkeypatch.setenv("SKYSTACK_NATIVE", "off")
    rej = np.zeros(n, np.int64)
    for ch in range(c):
        r = combine(cube[:, ch], method="gesd", scale=scale[:, ch], offset=offset[:, ch], weights=weights[:, ch])
        np.testing.assert_array_equal(image[ch], r.mean)
        rej += r.rejected
        if ch == 0:
            np.testing.assert_array_equal(count, r.count)
    np.testing.assert_array_equal(rejected, rej)


def test_native_chunks_cover_every_item_whatever_the_launch(tmp_path):
    """The native build runs each kernel's grid-stride loop over contiguous chunks: every item once,
    for launches smaller than the kernel's own bound (the last chunk runs to it), larger ones, one
    item, and in reverse; a kernel without the canonical loop header is refused, named."""
    from skystack.engine.errors import KernelCompileError

    src = tmp_path / "count.cu"
    src.write_text('extern "C" __global__ void count_kernel(int* hits, long long n) {\n'
                   "    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;\n"
                   "         i += (long long)blockDim.x * gridDim.x) {\n"
                   "        atomicAdd(&hits[i], 1);\n    }\n}\n")
    mod = native(src)
    for n, items, reverse in ((1000, 1000, False), (1000, 10, True), (1000, 5000, False), (1, 1, True),
                              (100_003, 100_003, True)):
        hits = np.zeros(n, np.int32)
        mod.launch("count_kernel", items, (hits, np.int64(n)), reverse=reverse)
        assert hits.min() == hits.max() == 1, (n, items)
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void bad_kernel(float* x, long long n) {\n'
                   "    long long i = threadIdx.x;\n    if (i < n) x[i] = 1.0f;\n}\n")
    with pytest.raises(KernelCompileError, match="grid-stride loop header"):
        native(bad)


def _launch_combine(mod, method, cube, scale, offset, weights):
    """(mean bits, count, rejected) of ``method``'s kernel in ``mod`` on ``cube`` (N, H, W), 10 rounds."""
    n, h, w = cube.shape
    kl, kh = KAPPAS[method]
    entry = combine_mod.REGISTRY[method]
    tables = entry.tables(n, kh) if entry.tables else ()
    mean, count = np.empty((h, w), np.float32), np.empty((h, w), np.int32)
    rej = np.zeros(n, np.uint64)
    mod.launch(entry.kernel, h * w, (cube, np.int64(h * w), np.int32(n), scale, offset, weights, *tables,
                                     np.float32(kl), np.float32(kh), np.int32(10), mean, count, rej))
    return mean.view(np.uint32), count, rej


@pytest.mark.parametrize("method", ["gesd", "sigma", "linear", "winsorized", "minmax", "median"])
def test_native_sort_of_many_frames_gives_the_rank_sorts_bits(rng, method):
    """Up to 384 frames a native build sorts by network (a network of up to 512 inputs, its
    comparators past the frames dropped), beyond them pixel by pixel; the emulator (and a GPU)
    counts ranks: the same (value, frame) order, ties in frame order and -0 equal to +0, so the
    same bits, down to which frames were rejected."""
    from skystack.kernels.emulate import emulated

    if not available():
        pytest.skip("no C++ compiler")
    for n in (95, 96, 150, 300, 384, 385):
        h, w = 6, 7
        cube = np.round(rng.normal(1.0, 0.05, size=(n, h, w)) * 64).astype(np.float32) / np.float32(64)  # ties
        cube[rng.random(cube.shape) < 0.03] = np.nan
        cube[rng.random(cube.shape) < 0.04] += 1.0
        cube[[5, 9], 0, 0] = 0.0
        cube[[20, 30], 0, 0] = -0.0  # equal lowest values of both signs: frame order decides which go
        cube[:, 1, 1] = rng.normal(0, 1e3, n).astype(np.float32)  # negative and positive values
        scale = np.ones(n, np.float32)
        minus_zero = np.full(n, -0.0, np.float32)  # offsets of -0 keep -0 values -0 (+0 would make them +0)
        weights = rng.uniform(0.5, 2, n).astype(np.float32)
        defines = max_frames_define(n)
        ref, got = (_launch_combine(mod("combine.cu", defines), method, cube, scale, minus_zero, weights)
                    for mod in (emulated, native))
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b, err_msg=f"{method} {n}")
        if method != "median":
            assert ref[2].sum() > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_native_sorting_network_gives_the_rank_sorts_bits(rng, method, isa):
    """Up to 95 frames a native build sorts neighbouring pixels' values together with a sorting
    network on (value, frame) pairs, eight pixels a vector when built for AVX2, else four; the
    emulator (and a GPU) counts ranks pixel by pixel. Missing values, ties, -0 and +0, infinities, a row whose
    pixels are not a whole number of vectors: the same bits, down to the rejected frames."""
    from skystack.kernels.emulate import emulated

    for n in (2, 3, 8, 9, 33, 64, 95):
        h, w = 5, 7
        cube = np.round(rng.normal(1.0, 0.05, size=(n, h, w)) * 64).astype(np.float32) / np.float32(64)  # ties
        cube[rng.random(cube.shape) < 0.1] = np.nan
        cube[rng.random(cube.shape) < 0.04] += 1.0
        cube[:, 2, :3] = np.nan  # pixels with no value at all
        cube[0, 3, 3] = np.inf
        cube[[0, n - 1], 0, 0] = 0.0
        cube[[n // 2], 0, 0] = -0.0
        cube[:, 0, 1] = 1.0  # every value equal: which frames minmax drops is frame order alone
        cube[::2, 0, 2] = 0.5  # half of them equal and low
        scale = np.ones(n, np.float32)  # keeps the equal values equal
        offset = np.full(n, -0.0, np.float32)
        weights = rng.uniform(0.5, 2, n).astype(np.float32)
        defines = max_frames_define(n)
        ref = _launch_combine(emulated("combine.cu", defines), method, cube, scale, offset, weights)
        got = _launch_combine(native("combine.cu", defines, isa=isa), method, cube, scale, offset, weights)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b, err_msg=f"{method} {n}")


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_native_gesd_of_whole_vectors_gives_the_emulators_bits(rng, isa):
    """GESD runs its steps on a whole vector of pixels at once where every value of each is valid
    (eight pixels built for AVX2, else four): each pixel's own operations in the scalar order, so the
    emulator's bits, down to the rejected frames. Outliers large enough to make the running sums be
    recomputed, ties, negative values, scale, offset and weights; blocks with a missing value and a
    row that is not a whole number of vectors take the pixel-by-pixel path beside them."""
    from skystack.kernels.emulate import emulated

    for n in (3, 4, 10, 20, 33, 95):
        h, w = 9, 13
        cube = np.round(rng.normal(300.0, 8.0, size=(n, h, w)) * 4).astype(np.float32) / np.float32(4)  # ties
        hot = rng.random(cube.shape) < 0.06
        cube[hot] += rng.choice(np.array([40.0, -60.0, 3e4, -2e5], np.float32), hot.sum())
        cube[:, 4] -= 600.0  # a row of negative values
        cube[0, 7, 9] = np.nan  # one block with a missing value
        scale = rng.uniform(0.9, 1.1, n).astype(np.float32)
        offset = rng.normal(0.0, 2.0, n).astype(np.float32)
        weights = rng.uniform(0.5, 2, n).astype(np.float32)
        defines = max_frames_define(n)
        ref = _launch_combine(emulated("combine.cu", defines), "gesd", cube, scale, offset, weights)
        got = _launch_combine(native("combine.cu", defines, isa=isa), "gesd", cube, scale, offset, weights)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b, err_msg=f"gesd {n}")
        if n >= 10:
            assert ref[2].sum() > 0.03 * cube.size  # the outliers were found and dropped


def test_a_tile_of_many_frames_and_few_pixels_may_run_natively(monkeypatch, rng):
    """The combine counts a launch's work in values, not pixels: a memory-bound tile of 300 frames
    has only a few thousand pixels a thread, and counted in pixels it was too small to time the
    native kernel against the twin, so it always took the twin (~4x slower at 300 frames)."""
    from skystack.engine import backend as be

    monkeypatch.setattr(be, "_native_choice", {})
    monkeypatch.delenv("SKYSTACK_NATIVE", raising=False)
    cube = _cube(rng, 300, 8, 8)  # 64 pixels, 19 200 values
    twin = combine(cube, method="gesd")
    key = ("combine.cu", "gesd_clip_mean", max_frames_define(300))
    assert key in be._native_choice or not available()
    for f in ("mean", "count", "rejected"):  # whichever was chosen: the twin's bits
        np.testing.assert_array_equal(getattr(combine(cube, method="gesd"), f), getattr(twin, f))


def test_native_kernels_openmp_teams_wait_passively():
    """skystack's own threads (workers, decoders, writers) run beside the native kernels' OpenMP teams, so
    a team's idle threads sleep instead of spinning on the cores the others need: libgomp, loaded with
    the first native library, spins 0 times before it sleeps (its default: 300 000), unless the user set
    a wait policy."""
    import os
    import subprocess
    import sys

    code = ("import ctypes, sys\n"
            "from skystack.kernels.native import native\n"
            "native('half.cu')\n"
            "gomp = ctypes.CDLL('libgomp.so.1')\n"
            "gomp.omp_display_env(1)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if "OPENMP DISPLAY ENVIRONMENT" not in run.stderr + run.stdout:
        pytest.skip(f"this libgomp cannot display its settings: {run.stderr[-200:]}")
    shown = run.stderr + run.stdout
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown and "GOMP_SPINCOUNT = '0'" in shown


@pytest.mark.parametrize("src", __import__("skystack.kernels", fromlist=["list_sources"]).list_sources())
def test_every_source_builds_natively(src):
    """Every kernel file builds for the native CPU backend (each kernel has the grid-stride loop header
    the native launcher rewrites; without it the CPU silently keeps the NumPy twins)."""
    from skystack.kernels import parse_kernels, read_source

    assert sorted(native(src).kernels) == sorted(parse_kernels(read_source(src)))


def test_sources_native_equals_twin(monkeypatch, rng):
    """Star candidates through the native builds (``SKYSTACK_NATIVE=on``) and through the twins (``off``):
    the same catalogue, background and noise, bit for bit."""
    from skystack.engine import backend, sources

    img = (400.0 + rng.normal(0.0, 6.0, (240, 330))).astype(np.float32)
    yy, xx = np.mgrid[:240, :330]
    for x, y, f in zip(rng.uniform(5, 325, 80), rng.uniform(5, 235, 80), rng.uniform(200, 20000, 80)):
        img += (f / (2 * np.pi * 1.2 ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.2 ** 2))).astype(np.float32)
    img[50:52, 10:90] = np.nan
    got = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("SKYSTACK_NATIVE", mode)
        monkeypatch.setattr(backend, "_native_choice", {})
        cat, bg, noise, sub = sources.find_sources(img, threshold_sigma=3.0, min_area=5, box=64, filt=3)
        got[mode] = (cat, bg, noise, sub)
    assert len(got["on"][0]) > 40
    for k in sources.FIELDS:
        np.testing.assert_array_equal(got["on"][0][k], got["off"][0][k], err_msg=k)
    assert got["on"][1:3] == got["off"][1:3]
    np.testing.assert_array_equal(got["on"][3], got["off"][3])
