"""Native CPU kernels (kernels/native.py) against the NumPy twins, per kernel: median wall seconds.

    python bench/bench_native.py [--frames 40] [--size 600x400] [--repeat 3] [--results-md bench/RESULTS.md]

Each row runs one operation's GPU branch with the kernel built natively (-O3, OpenMP
over the cores) and the twin on the same inputs, checks they agree (the same bits
for combine and raw conversion), and prints twin/native. The first native call
(the build, cached on disk) is excluded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from skystack.engine import combine as combine_mod
from skystack.engine import debayer as debayer_mod
from skystack.engine import rawconv as rawconv_mod
from skystack.engine import warp as warp_mod
from skystack.engine.backend import BLOCK
from skystack.kernels.native import native, threads


def _native_launch(source, kernel, n_items, args, *, defines=(), block=BLOCK):
    native(source, tuple(defines)).launch(kernel, n_items, args, block=block)


class _Native:
    """Context: ``module``'s operations take their kernel branch, built natively."""

    def __init__(self, module):
        self.m = module

    def __enter__(self):
        self.saved = (self.m.is_device_array, self.m.launch)
        self.m.is_device_array = lambda a: isinstance(a, np.ndarray)
        self.m.launch = _native_launch

    def __exit__(self, *exc):
        self.m.is_device_array, self.m.launch = self.saved


def _time(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cases(n, h, w):
    rng = np.random.default_rng(0)
    cube = rng.normal(1.0, 0.05, size=(n, h, w)).astype(np.float32)
    cube[rng.random(cube.shape) < 0.03] += 1.0
    raw = rng.integers(0, 4096, size=(h, w)).astype(np.uint16)
    cfa = rng.uniform(0, 1, size=(h, w)).astype(np.float32)
    rgb = rng.uniform(0, 1, size=(3, h, w)).astype(np.float32)
    t = np.array([[np.cos(0.01), -np.sin(0.01), 2.3], [np.sin(0.01), np.cos(0.01), -1.1], [0, 0, 1]])
    out = []
    for method in ("gesd", "sigma", "winsorized", "linear", "percentile", "minmax", "median"):
        out.append((f"combine {method} ({n}x{h}x{w})", combine_mod,
                    lambda m=method: combine_mod.combine(cube, method=m), True))
    out.append((f"rawconv u16 ({h}x{w})", rawconv_mod, lambda: rawconv_mod.cfa_to_float(
        raw, pattern="RGGB", black_level=(64,) * 4, white_level=4095), True))
    for method in ("bilinear", "rcd"):
        out.append((f"debayer {method} ({h}x{w})", debayer_mod,
                    lambda m=method: debayer_mod.debayer(cfa, "RGGB", method=m), False))
    out.append((f"warp lanczos3 (3x{h}x{w})", warp_mod, lambda: warp_mod.warp(rgb, t, (h, w)), False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", default="600x400")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--results-md", help="append the table to this Markdown file")
    a = ap.parse_args()
    os.environ["SKYSTACK_NATIVE"] = "off"  # the twin column times the twins, not run_cpu's choice
    w, h = (int(v) for v in a.size.split("x"))
    rows = []
    for name, mod, fn, exact in cases(a.frames, h, w):
        twin = fn()
        with _Native(mod):
            got = fn()  # builds (cached) and warms up
            t_nat = _time(fn, a.repeat)
        t_twin = _time(fn, a.repeat)
        g, r = (got, twin) if isinstance(got, np.ndarray) else (got.mean, twin.mean)
        same = bool(np.array_equal(g, r, equal_nan=True)) if exact else bool(
            np.allclose(g, r, rtol=1e-5, atol=1e-6, equal_nan=True))
        rows.append((name, t_twin, t_nat, same))
        print(f"{name:34s} twin {t_twin:7.3f} s  native {t_nat:7.3f} s  x{t_twin / t_nat:5.2f}  "
              f"{'same bits' if exact and same else ('within 1e-5' if same else 'DIFFERS')}")
    if a.results_md:
        lines = [f"\n#### OMP_NUM_THREADS={threads()}: "
                 f"`python bench/bench_native.py --frames {a.frames} --size {a.size} --repeat {a.repeat}`\n",
                 "| kernel | twin s | native s | speedup | agreement |", "|---|---|---|---|---|"]
        for name, tt, tn, same in rows:
            agree = "DIFFERS" if not same else (
                "same bits" if name.startswith(("combine", "rawconv")) else "within 1e-5")
            lines.append(f"| {name} | {tt:.3f} | {tn:.3f} | {tt / tn:.2f}x | {agree} |")
        with open(a.results_md, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
