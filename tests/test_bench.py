"""The benchmark machinery (tools/bench/): sessions, isolated measurements, tables, JSON, metrics."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from skystack.tools import bench


def test_sensor_size_is_even_3_to_2_and_the_requested_megapixels():
    for mp in (0.3, 4.0, 16.0, 24.0):
        w, h = bench.sensor_size(mp)
        assert w % 2 == 0 and h % 2 == 0
        assert w * h == pytest.approx(mp * 1e6, rel=0.01)
        assert w / h == pytest.approx(1.5, rel=0.01)
    assert bench.sensor_size(24.0) == (6000, 4000)


def test_session_is_synthesized_once_and_cached_by_config(tmp_path):
    from skystack.engine.io import read_meta
    from skystack.engine.session import discover_session

    cfg = bench.session_synth_config(3, 0.05, n_calib=2)
    a = bench.ensure_session(cfg, tmp_path)
    stamp = (a / "truth.json").stat().st_mtime_ns
    assert bench.ensure_session(cfg, tmp_path) == a
    assert (a / "truth.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    files = discover_session(a)
    assert files.counts() == {"lights": 3, "darks": 2, "flats": 2, "bias": 2, "dark_flats": 0}
    assert read_meta(files.lights[0]).shape == (cfg.height, cfg.width)
    other = bench.ensure_session(bench.session_synth_config(3, 0.05, n_calib=2, seed=1), tmp_path)
    assert other != a and not list(tmp_path.glob("*.partial"))


def test_run_measured_reports_each_childs_own_peak_memory(tmp_path):
    """Each child's own ru_maxrss: neither an earlier big child nor this (big) process leaks into it."""
    code = "import numpy as np; a = np.ones({n} * 2**20 // 8); print(a.sum())"
    big = bench.run_measured([sys.executable, "-c", code.format(n=300)], log_path=tmp_path / "big.log")
    ballast = np.ones(400 * 2**20 // 8)  # this process now holds 400 MiB more than the child needs
    small = bench.run_measured([sys.executable, "-c", code.format(n=10)], log_path=tmp_path / "small.log")
    assert ballast.sum() > 0
    assert big.returncode == 0 and small.returncode == 0
    assert 300 * 2**20 <= big.peak_rss_bytes <= 300 * 2**20 + 150 * 2**20
    assert 10 * 2**20 <= small.peak_rss_bytes < 120 * 2**20
    assert 0 < small.wall_s < 60
    slow = bench.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], log_path=tmp_path / "t.log",
                              timeout_s=1.0)
    assert slow.timed_out and slow.returncode != 0


def test_benchmark_tiny_session_one_row_per_backend_and_same_run_ratios(tmp_path):
    from skystack.engine.backend import _gpu_cached

    out = tmp_path / "res.json"
    cfg = bench.BenchConfig(frames=4, megapixels=0.3, cache_root=str(tmp_path / "cache"), output=str(out),
                            quiet=True, timeout_s=600)
    res = bench.run_benchmark(cfg)
    expected = ["cpu", "gpu"] if _gpu_cached()[0] is not None else ["cpu"]
    assert [r["requested_backend"] for r in res["runs"]] == expected
    w, h = bench.sensor_size(0.3)
    assert (res["session"]["width"], res["session"]["height"]) == (w, h)
    dec = res["decode_floor"]
    assert dec["ok"] and dec["lights_frames"] == 4 and dec["calibration_frames"] == 3 * 4
    assert dec["total_s"] == pytest.approx(dec["lights_s"] + dec["calibration_s"])
    for r in res["runs"]:
        assert r["ok"], r.get("error")
        assert r["frames_used"] >= 3
        total = r["timings"]["total"]
        # every derived number comes from this same run and this same decode floor
        assert r["ratio_to_decode_floor"] == pytest.approx(total / dec["total_s"], rel=1e-12)
        assert r["frames_per_s"] == pytest.approx(4 / total, rel=1e-12)
        assert r["megapixels_per_s"] == pytest.approx(4 * w * h / 1e6 / total, rel=1e-12)
        stages = sum(v for k, v in r["timings"].items() if k != "total")
        assert r["other_s"] == pytest.approx(max(0.0, total - stages), abs=1e-9)
        # stage times are summed over worker threads: at most (threads x wall) in all
        assert stages <= total * (os.cpu_count() or 1) * 1.001
        # the pipeline decodes the same lights (and more), so it cannot beat the lights' decode floor
        assert total > dec["lights_s"]
        # measured in a separate process: its peak holds at least the (3, H, W) float32 result
        assert r["pid"] != os.getpid()
        assert r["peak_rss_bytes"] >= 3 * w * h * 4
        assert r["process"]["peak_rss_bytes"] >= r["peak_rss_bytes"] * 0.9
    saved = json.loads(out.read_text())
    assert saved["runs"][0]["timings"] == res["runs"][0]["timings"]
    m = saved["machine"]
    assert m["cores_logical"] == os.cpu_count() and m["cpu"]
    assert m["versions"]["numpy"] == np.__version__
    assert "gpu" in m and "available" in m["gpu"]
    stage_table, summary = bench.bench_tables(res)
    assert stage_table.row_count == summary.row_count == len(expected)
    md = bench.markdown_tables(res)
    assert md.count("\n| cpu |") == 2


def test_update_results_md_keeps_one_section_per_machine(tmp_path):
    p = tmp_path / "RESULTS.md"
    bench.update_results_md(p, "box A", "table 1")
    bench.update_results_md(p, "box B", "table 2")
    bench.update_results_md(p, "box A", "table 3")
    text = p.read_text()
    assert "table 1" not in text and "table 2" in text and "table 3" in text
    assert text.count("### box A") == 1 and text.index("box A") < text.index("box B")


@pytest.fixture(scope="module")
def truth():
    from skystack.tools.synth import build_truth

    return build_truth(bench.session_synth_config(5, 0.3))


def test_quality_metrics_recover_known_scale_and_noise(truth):
    """image = a * (noise-free light 0) + b + N(0, sigma): scale a, noise sigma / a."""
    rng = np.random.default_rng(7)
    a, b, sigma = 2.5e-5, 0.01, 3e-4
    sky = truth.sky(0)
    img = (a * sky + b + rng.normal(0.0, sigma, sky.shape)).astype(np.float32)
    q = bench.truth_quality(img, truth, 0)
    assert q.n_boxes >= 30 and q.n_phot_stars >= 10
    for s in q.scale:
        assert s == pytest.approx(a, rel=0.03)
    for n, nb in zip(q.noise_adu, q.noise_binned_adu):
        assert n == pytest.approx(sigma / a, rel=0.08)
        assert nb == pytest.approx(sigma / a, rel=0.15)  # white noise: the same at 4x4 binning
    # the background is exactly the truth's, so the residual is the noise and has no large-scale part
    assert q.bg_residual_adu == pytest.approx(sigma / a, rel=0.08)
    assert q.bg_large_scale_adu < 0.15 * sigma / a
    fwhm0 = truth.lights[0].fwhm_px
    assert 0.8 * fwhm0 <= q.fwhm_px <= fwhm0 + 2.0


def test_binned_noise_sees_through_smoothing(truth):
    """Smoothing lowers per-pixel noise a lot but 4x4-binned noise only a little."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(11)
    a, sigma = 2.5e-5, 3e-4
    noise = rng.normal(0.0, sigma, (3, *truth.shape))
    smooth = np.stack([gaussian_filter(n, 1.0) for n in noise])
    img = (a * truth.sky(0) + smooth).astype(np.float32)
    q = bench.truth_quality(img, truth, 0, detect=False)
    for n, nb in zip(q.noise_adu, q.noise_binned_adu):
        assert n == pytest.approx(0.282 * sigma / a, rel=0.12)  # 1 / (2 sqrt(pi) s) for a Gaussian of s = 1
        assert 0.6 * sigma / a < nb < 0.95 * sigma / a


def test_colour_noise_is_the_spread_of_channel_differences(truth):
    """Independent noise sigma per channel: R - G and B - G spread sqrt(2) sigma; shared noise: none."""
    rng = np.random.default_rng(5)
    a, sigma = 2.5e-5, 3e-4
    sky = a * truth.sky(0)
    q = bench.truth_quality((sky + rng.normal(0.0, sigma, sky.shape)).astype(np.float32), truth, 0, detect=False)
    for c in q.colour_noise_adu:
        assert c == pytest.approx(np.sqrt(2.0) * sigma / a, rel=0.08)
    grey = (sky + rng.normal(0.0, sigma, sky.shape[1:])[None]).astype(np.float32)  # the same noise in R, G, B
    q = bench.truth_quality(grey, truth, 0, detect=False)
    assert max(q.colour_noise_adu) < 0.1 * sigma / a


def test_completeness_falls_with_noise_and_ignores_smoothing(truth):
    """The matched filter finds the faint band's stars in a clean image, fewer in a noisy one,
    and as many after smoothing the noisy one (its threshold is the filtered noise)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    a = 2.5e-5
    sky = a * truth.sky(0)
    clean = (sky + rng.normal(0.0, 2e-6, sky.shape)).astype(np.float32)
    noisy = (sky + rng.normal(0.0, 1e-3, sky.shape)).astype(np.float32)
    noisier = (sky + rng.normal(0.0, 2e-3, sky.shape)).astype(np.float32)
    smooth = np.stack([gaussian_filter(c, 0.6) for c in noisy]).astype(np.float32)
    qc, qn, q2, qs = (bench.truth_quality(im, truth, 0) for im in (clean, noisy, noisier, smooth))
    assert qc.completeness > 0.75  # measured 0.82 (the rest are blended with brighter neighbours)
    assert qn.completeness < 0.3
    # the 50 % limit scales with the noise (measured 870 and ~1800 ADU)
    assert 1.6 < q2.limit_flux_adu / qn.limit_flux_adu < 2.4
    # smoothing (FWHM 3.3 -> 3.7 px) moves the limit by a few percent only (measured 845 against 870)
    assert qs.limit_flux_adu == pytest.approx(qn.limit_flux_adu, rel=0.08)


def test_star_free_mask_excludes_every_star_centre(truth):
    mask = bench.star_free_mask(truth, 0)
    h, w = truth.shape
    xy = truth.project_stars(0)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= h - 1)
    ix, iy = np.rint(xy[inside]).astype(int).T
    assert not mask[iy, ix].any()
    assert 0.1 < mask.mean() < 0.9


def test_registration_error_against_truth(truth):
    from skystack.engine.match import grid_rms

    tr = truth.transforms()
    exact = {i: np.linalg.inv(tr[0]) @ tr[i] for i in range(len(tr))}
    assert bench.registration_error(exact, truth, 0)["rms_px"] == pytest.approx(0.0, abs=1e-9)
    shifted = {i: np.array([[1, 0, 0.3], [0, 1, 0.0], [0, 0, 1]]) @ t for i, t in exact.items()}
    r = bench.registration_error(shifted, truth, 0)
    assert r["n"] == len(tr) - 1 and r["rms_px"] == pytest.approx(0.3, abs=1e-9)
    # an unregistered light measured on its pixels: its error is the whole truth motion
    rng = np.random.default_rng(3)
    k = len(tr) - 1
    img = (truth.sky(k) + rng.normal(0.0, 3.0, (3, *truth.shape))).astype(np.float32)
    m = bench.measured_registration_error([(k, img)], truth, 0, match_radius=6.0)
    moved = grid_rms(exact[k], np.eye(3), truth.shape)
    assert moved > 0.5
    assert m["per_frame"][str(k)] == pytest.approx(moved, abs=0.05)


def test_noise_spectrum_is_flat_for_white_noise_and_follows_a_known_filter(truth):
    """White noise reads its variance in every band; a 2-tap mean along x, |cos(pi fx)|^2 of it."""
    from scipy.ndimage import correlate1d

    rng = np.random.default_rng(2)
    a, sigma = 2.5e-5, 3e-4
    sky = a * truth.sky(0)
    noise = rng.normal(0.0, sigma, sky.shape)
    white = bench.noise_spectrum((sky + noise).astype(np.float32), truth, 0, scale=np.full(3, a))
    assert white.n_boxes >= 8
    var = (sigma / a) ** 2
    assert np.mean(white.power) == pytest.approx(var, rel=0.05)
    assert np.mean(white.chroma) == pytest.approx(2 * var, rel=0.05)  # R - G of independent channels
    assert np.allclose(white.power, var, rtol=0.2) and np.allclose(white.chroma, 2 * var, rtol=0.2)
    pair = correlate1d(noise, [0.5, 0.5], axis=2, mode="nearest")
    smooth = bench.noise_spectrum((sky + pair).astype(np.float32), truth, 0, scale=np.full(3, a))
    f = np.fft.fftfreq(48)
    fx, fy = np.meshgrid(f, f)
    gain = np.cos(np.pi * fx) ** 2
    for (lo, hi), p, q in zip(smooth.bands, smooth.power, white.power):
        band = (np.hypot(fx, fy) >= lo) & (np.hypot(fx, fy) < hi)
        assert p / q == pytest.approx(gain[band].mean(), rel=0.08, abs=0.02)


def test_gpu_warm_up_is_half_the_lights_up_to_a_whole_sessions_work():
    """Host seconds per added light come from the measured run less the warm-up: from 24 lights on,
    both do the whole per-session work (landscape frames, the model choice's validation frames)."""
    from skystack.engine import foreground, register
    from skystack.tools.bench import harness

    assert harness.WHOLE_SESSION_LIGHTS >= max(foreground.N_FRAMES, register.N_VALIDATE + 1)
    assert [harness.warmup_lights(n) for n in (4, 6, 10, 23, 24, 50)] == [3, 3, 5, 11, 12, 12]
