"""Benchmark: star detection + matching of one 24 MP (6000 x 4000) CFA frame.

The acceptance target (issue 5) is < 1 s for detect + match on this machine.
Run with ``pytest bench/bench_register.py --benchmark-enable`` or as a script
(``python bench/bench_register.py``), which prints the timings of each step.
"""

from __future__ import annotations

import math
import time

import numpy as np

H, W = 4000, 6000
PATTERN = "RGGB"


def _render_cfa(rng: np.random.Generator, xy: np.ndarray, flux: np.ndarray, colour: np.ndarray,
                fwhm: float = 3.5, sky=(0.05, 0.08, 0.08, 0.04), noise: float = 0.004) -> np.ndarray:
    """Calibrated-looking float32 CFA frame with pixel-integrated Gaussian stars."""
    from scipy.special import erf

    img = np.empty((H, W), dtype=np.float32)
    img[0::2, 0::2], img[0::2, 1::2], img[1::2, 0::2], img[1::2, 1::2] = sky
    img += rng.normal(0.0, noise, (H, W)).astype(np.float32)
    sig = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    r = int(math.ceil(4 * fwhm))
    off = np.arange(-r, r + 1)
    site_colour = {"R": 0, "G": 1, "B": 2}
    site = np.array([[site_colour[PATTERN[0]], site_colour[PATTERN[1]]],
                     [site_colour[PATTERN[2]], site_colour[PATTERN[3]]]])
    for (x, y), f, c in zip(xy, flux, colour):
        ix, iy = int(round(x)), int(round(y))
        xs, ys = ix + off, iy + off
        if xs[0] < 0 or ys[0] < 0 or xs[-1] >= W or ys[-1] >= H:
            continue
        px = 0.5 * (erf((xs + 0.5 - x) / (math.sqrt(2) * sig)) - erf((xs - 0.5 - x) / (math.sqrt(2) * sig)))
        py = 0.5 * (erf((ys + 0.5 - y) / (math.sqrt(2) * sig)) - erf((ys - 0.5 - y) / (math.sqrt(2) * sig)))
        gain = c[site[ys[:, None] % 2, xs[None, :] % 2]]
        img[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] += (f * np.outer(py, px) * gain).astype(np.float32)
    return img


def make_pair(seed: int = 1, n_stars: int = 1500):
    """A 24 MP CFA frame and a rotated/shifted copy of the same sky, plus the truth."""
    rng = np.random.default_rng(seed)
    xy_ref = np.column_stack([rng.uniform(20, W - 20, n_stars), rng.uniform(20, H - 20, n_stars)])
    flux = 10 ** rng.uniform(-0.5, 1.5, n_stars)
    colour = np.column_stack([rng.uniform(0.5, 1.5, n_stars), np.ones(n_stars), rng.uniform(0.5, 1.5, n_stars)])
    th = math.radians(7.0)
    t = np.array([[math.cos(th), -math.sin(th), 150.3], [math.sin(th), math.cos(th), -80.7], [0, 0, 1.0]])
    xy_frame = (xy_ref - t[:2, 2]) @ np.linalg.inv(t[:2, :2]).T
    ref = _render_cfa(rng, xy_ref, flux, colour)
    frame = _render_cfa(rng, xy_frame, flux, colour)
    return frame, ref, t


def detect_and_match(frame: np.ndarray, ref_stars):
    from skystack.engine.detect import detect_stars
    from skystack.engine.match import match_stars

    stars = detect_stars(frame, pattern=PATTERN)
    return match_stars(stars, ref_stars)


def test_detect_and_match_24mp(benchmark):
    from skystack.engine.detect import detect_stars
    from skystack.engine.match import grid_rms

    frame, ref, t = make_pair()
    ref_stars = detect_stars(ref, pattern=PATTERN)
    res = benchmark(detect_and_match, frame, ref_stars)
    assert grid_rms(res.transform, t, (H, W)) < 0.05


def main() -> None:
    from skystack.engine.detect import detect_stars
    from skystack.engine.match import grid_rms, match_stars

    t0 = time.perf_counter()
    frame, ref, t = make_pair()
    print(f"render two 24 MP frames: {time.perf_counter() - t0:.1f} s")
    ref_stars = detect_stars(ref, pattern=PATTERN)
    best = {}
    for _ in range(5):
        a = time.perf_counter()
        stars = detect_stars(frame, pattern=PATTERN)
        b = time.perf_counter()
        res = match_stars(stars, ref_stars)
        c = time.perf_counter()
        for k, v in (("detect", b - a), ("match", c - b), ("total", c - a)):
            best[k] = min(best.get(k, 1e9), v)
    print(f"stars: {len(stars)} kept of {stars.n_total}; inliers {res.n_inliers}; "
          f"residual {res.residual_rms_px:.3f} px; error vs truth {grid_rms(res.transform, t, (H, W)):.4f} px")
    print("best of 5: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in best.items()))


if __name__ == "__main__":
    main()
