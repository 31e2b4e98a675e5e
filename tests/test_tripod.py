"""The seed's night, by default: a phone on a tripod for an hour, wide barrel lens, a landscape.

Acceptance of the fixed-tripod work, measured against the simulator's truth
(:mod:`skystack.tools.synth_scene`): 40 lights of 10 s over 60 minutes, a
~66 degree field with k1 = -0.045, the sky turning ~15 degrees and drifting
a fifth of the frame, a hill, a tree line, a house and 6 fixed lights.
``skystack stack SESSION -o out.tif`` with no flags must register every
light, keep stars round to the corners, match the noise of a stack
registered with the exact truth mappings, and keep the landscape sharp.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from skystack import cli
from skystack.engine import register, stack
from skystack.engine.background import luminance
from skystack.tools import skymetrics
from skystack.engine.session import discover_session
from skystack.tools.synth import load_truth, simulate
from skystack.tools.synth_scene import tripod_config

pytestmark = pytest.mark.slow
#: Finished pictures of the simulated night, kept for a look (not committed).
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "tripod"


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("tripod")
    simulate(tripod_config(seed=5), root / "session")
    out = root / "out"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rc = cli.main(["stack", str(root / "session"), "-o", str(out / "night.tif"), "--quiet",
                   "--cache-dir", str(root / "cache"), "--save-mask", str(out / "mask.png"),
                   "--picture", str(ARTIFACTS / "tripod-night.png")])
    assert rc == 0
    report = json.loads((out / "night.json").read_text())
    image = tifffile.imread(out / "night.tif")
    image = np.moveaxis(image, -1, 0) if image.ndim == 3 and image.shape[-1] == 3 else image
    truth = load_truth(root / "session")
    names = [f["path"] for f in report["frames"]]
    ref = names.index(report["reference"])
    return {"root": root, "truth": truth, "report": report, "image": image, "ref": ref}


def _truth_registration(truth, monkeypatch):
    """Make the pipeline use the simulator's exact mappings (same reference, lens and frames)."""
    real = register.register_frames

    def exact(stars, scores, shape, **kw):
        reg = real(stars, scores, shape, **kw)
        h_ref_inv = np.linalg.inv(truth.lights[reg.ref].transform)
        reg.transforms = {i: h_ref_inv @ truth.lights[i].transform for i in reg.transforms}
        reg.lens, reg.model = truth.lens, "homography+radial"
        return reg

    monkeypatch.setattr(register, "register_frames", exact)


def test_every_light_registers_with_the_lens_model(night):
    rep = night["report"]
    assert rep["frames_used"] == 40, [f["reason"] for f in rep["frames"] if not f["used"]]
    reg = rep["registration"]
    assert reg["model"] == "homography+radial"
    assert reg["lens"]["k1"] == pytest.approx(-0.045, abs=0.004)
    # the held-out residuals show why: similarity cannot follow a wide field
    assert reg["heldout_rms_px"]["similarity"] > 5 * reg["heldout_rms_px"]["homography+radial"]
    # the reference comes from the middle of the night, not its start
    assert 14 <= night["ref"] <= 26
    assert "landscape" in reg["foreground"]


def test_stars_round_to_the_corners(night):
    truth, ref, img = night["truth"], night["ref"], night["image"]
    lum = luminance(img, np.float64)
    pts = skymetrics.isolated_stars(truth, ref, lum.shape, flux_range=(1500.0, 2.0e4),
                                    avoid=truth.horizon_mask())
    reg = skymetrics.star_regions(lum, pts)
    assert reg["n_centre"] >= 8 and reg["n_corner"] >= 12, reg
    assert abs(reg["fwhm_corner"] / reg["fwhm_centre"] - 1.0) <= 0.05, reg
    assert reg["elong_corner"] <= 1.10, reg


def test_noise_matches_truth_registered_stack(night, monkeypatch):
    truth, ref = night["truth"], night["ref"]
    _truth_registration(truth, monkeypatch)
    files = discover_session(night["root"] / "session")
    exact = stack.stack_session(files, stack.StackConfig(quiet=True, cache_dir=str(night["root"] / "cache")))
    assert exact.reference == night["report"]["reference"]
    sky = skymetrics.star_free_sky(truth, ref, truth.shape, truth.horizon_mask())
    ours = skymetrics.sky_noise(luminance(night["image"], np.float64), sky)
    best = skymetrics.sky_noise(luminance(exact.image, np.float64), sky)
    assert ours / best <= 1.05, (ours, best)


def test_landscape_stays_sharp(night):
    truth, img = night["truth"], night["image"]
    lum = luminance(img, np.float64)
    lights = truth.static_lights()["xy"]
    fits = [skymetrics.fit_star(lum, x, y, r=5) for x, y in lights]
    assert all(f is not None for f in fits)
    pts = skymetrics.isolated_stars(truth, night["ref"], lum.shape, flux_range=(1500.0, 2.0e4),
                                    avoid=truth.horizon_mask())
    star_fwhm = skymetrics.star_regions(lum, pts)["fwhm_all"]
    assert max(f["fwhm"] for f in fits) <= 1.5 * star_fwhm, ([f["fwhm"] for f in fits], star_fwhm)
    truth.scene.horizon()
    width = skymetrics.edge_width(lum, truth.scene.house)
    assert width <= 2.0, width


def test_finished_picture_keeps_the_landscape_and_a_neutral_sky(night):
    """``--picture`` (saved in artifacts/tripod/): the full frame, a neutral dark sky, the lit windows
    standing out of a dark ground (the sky's gradient model is not extrapolated into the landscape)."""
    from PIL import Image

    pic = np.asarray(Image.open(ARTIFACTS / "tripod-night.png").convert("RGB"), dtype=np.float64)
    truth = night["truth"]
    assert pic.shape[:2] == truth.shape  # a tripod night keeps its whole frame
    sky = skymetrics.star_free_sky(truth, night["ref"], truth.shape, truth.horizon_mask())
    med = np.array([np.median(pic[..., c][sky]) for c in range(3)])
    assert np.ptp(med) <= 0.03 * 255 + 0.1 * med.mean(), med
    land_level = np.median(pic[truth.horizon_mask()].mean(axis=1))
    for x, y in truth.static_lights()["xy"]:
        assert pic[int(round(y)), int(round(x))].max() > land_level + 40, (x, y, land_level)


def test_landscape_mask_written_and_close_to_truth(night):
    from PIL import Image

    mask = np.asarray(Image.open(night["root"] / "out" / "mask.png").convert("L")) > 127
    truth_mask = night["truth"].horizon_mask()
    assert (truth_mask & ~mask).sum() <= 0.005 * truth_mask.sum()  # landscape left to the sky stack
    assert (mask & ~truth_mask).sum() <= 0.05 * (~truth_mask).sum()  # sky given to the still stack


def test_saved_mask_passed_back_gives_the_same_stack(night):
    """``--save-mask`` then ``--foreground MASK.png``: the user's (here unchanged) mask is used as is."""
    files = discover_session(night["root"] / "session")
    res = stack.stack_session(files, stack.StackConfig(quiet=True, foreground=str(night["root"] / "out" / "mask.png"),
                                                       cache_dir=str(night["root"] / "cache")))
    assert res.registration["foreground"].startswith("mask mask.png")
    np.testing.assert_array_equal(res.image, night["image"])
    # the landscape's counts are its own stack's: all 40 lights cover it, and rejection keeps most values
    land = res.landscape
    assert land is not None and (res.coverage[land] == 40).all()
    assert np.median(res.count[land]) >= 36, np.median(res.count[land])


def test_union_framing_covers_the_whole_night(night):
    files = discover_session(night["root"] / "session")
    res = stack.stack_session(files, stack.StackConfig(quiet=True, framing="union",
                                                       cache_dir=str(night["root"] / "cache")))
    canvas = res.registration["canvas"]
    ref = [f.path for f in res.frames].index(res.reference)
    share = skymetrics.union_sky_coverage(night["truth"], ref, res.coverage, tuple(canvas["reference_origin_px"]))
    assert share >= 0.95, share
    assert res.image.shape[-1] > night["truth"].shape[1] * 1.1  # the canvas grew with the drift
    assert res.coverage.shape == res.image.shape[-2:]


@pytest.mark.parametrize("fov,k1,k2,minutes,landscape", [
    (50.0, -0.02, 0.005, 30.0, True),
    (80.0, -0.07, 0.0, 60.0, False),
    (66.0, 0.0, 0.0, 45.0, True),
])
def test_lens_field_and_duration_variants(tmp_path, fov, k1, k2, minutes, landscape):
    """Other lenses, fields and durations: every light registers to within a fraction of a pixel of the
    exact mapping (over every star both frames see), and the landscape is found when there is one."""
    from skystack.engine.lens import RadialLens
    from skystack.engine.match import transform_points

    cfg = tripod_config(seed=11, width=640, height=480, n_lights=16, fov_deg=fov, lens_k1=k1, lens_k2=k2,
                        duration_min=minutes, landscape=landscape, n_bias=4, n_darks=4, n_flats=4,
                        n_dark_flats=4)
    simulate(cfg, tmp_path / "s")
    truth = load_truth(tmp_path / "s")
    res = stack.stack_session(discover_session(tmp_path / "s"), stack.StackConfig(quiet=True))
    assert res.n_used == 16
    reg = res.registration
    lens = RadialLens.for_shape((480, 640), **{k: reg["lens"][k] for k in ("k1", "k2")}) if reg["lens"] else None
    ref = [f.path for f in res.frames].index(res.reference)
    p_ref = truth.project_stars(ref)
    errs = []
    for i, f in enumerate(res.frames):
        p = truth.project_stars(i)
        both = np.isfinite(p).all(1) & np.isfinite(p_ref).all(1)
        both &= (p[:, 0] > 5) & (p[:, 0] < 634) & (p[:, 1] > 5) & (p[:, 1] < 474)
        both &= (p_ref[:, 0] > 5) & (p_ref[:, 0] < 634) & (p_ref[:, 1] > 5) & (p_ref[:, 1] < 474)
        q = p[both] if lens is None else lens.undistort(p[both])
        q = transform_points(np.asarray(f.transform), q)
        q = q if lens is None else lens.distort(q)
        errs.append(float(np.sqrt(np.mean(np.sum((q - p_ref[both]) ** 2, axis=1)))))
    assert np.median(errs) < 0.2 and max(errs) < 0.5, (reg["model"], errs)
    if abs(k1) >= 0.04:
        assert reg["model"] == "homography+radial"
    assert ("landscape below" in reg["foreground"]) == landscape, reg["foreground"]


def test_telescope_session_unchanged(tmp_path):
    """A tracked, narrow field: auto picks similarity, finds no landscape, and the stack is exactly what
    the explicit pre-tripod settings (similarity, no foreground) give."""
    from skystack.tools.synth import SynthConfig

    simulate(SynthConfig(seed=4, width=640, height=480, n_lights=16, interval_s=60.0, n_bias=4, n_darks=4,
                         n_flats=4, n_dark_flats=4), tmp_path / "s")
    files = discover_session(tmp_path / "s")
    cache = str(tmp_path / "cache")
    auto = stack.stack_session(files, stack.StackConfig(quiet=True, cache_dir=cache))
    plain = stack.stack_session(files, stack.StackConfig(quiet=True, cache_dir=cache, transform_model="similarity",
                                                         foreground="none"))
    assert auto.registration["model"] == "similarity"
    assert auto.registration["max_sky_motion_px"] > 30  # the detector ran (the sky moved) ...
    assert "no still landscape" in auto.registration["foreground"]  # ... and found nothing
    assert auto.reference == plain.reference
    np.testing.assert_array_equal(auto.image, plain.image)


@pytest.mark.gpu
def test_gpu_path_matches_cpu_on_a_tripod_night(tmp_path):
    """The lens warp, landscape and framing on the GPU path (a real device or the simulated one) give the
    CPU's stack."""
    cfg = tripod_config(seed=13, width=480, height=360, n_lights=8, duration_min=40.0, n_bias=3, n_darks=3,
                        n_flats=3, n_dark_flats=0, star_density=12000.0)
    simulate(cfg, tmp_path / "s")
    files = discover_session(tmp_path / "s")
    cpu = stack.stack_session(files, stack.StackConfig(quiet=True, backend="cpu", cache_dir=str(tmp_path / "c")))
    gpu = stack.stack_session(files, stack.StackConfig(quiet=True, backend="gpu", cache_dir=str(tmp_path / "g")))
    assert gpu.backend == "gpu" and gpu.registration["model"] == cpu.registration["model"]
    both = np.isfinite(gpu.image) & np.isfinite(cpu.image)
    assert both.mean() > 0.9
    assert np.max(np.abs(gpu.image[both] - cpu.image[both])) < 1e-4 * np.nanmax(np.abs(cpu.image))


@pytest.mark.realdata
def test_reference_comes_from_the_majority_on_real_seestar_frames(realdata, tmp_path):
    """Seestar M 94: 6 lights of session 1 and the 2 of session 3, rotated by ~69 degrees. The reference
    is one of the 6, and the rotated pair registers onto it (at ~69.4 degrees)."""
    import math

    from skystack.engine.session import SessionFiles

    s1 = sorted((realdata / "seestar-m94" / "lights_session1").glob("*.fit"))[:6]
    s3 = sorted((realdata / "seestar-m94" / "lights_session3_rotated").glob("*.fit"))
    files = SessionFiles(lights=[*s3, *s1])
    with stack.register_session(files, stack.StackConfig(quiet=True, cache_dir=str(tmp_path / "c"))) as reg:
        ref_path = reg.lights[reg.ref]
        assert ref_path in s1, ref_path
        assert len(reg.used) == 8
        for i in range(2):
            t = np.asarray(reg.records[i].transform)
            ang = abs(math.degrees(math.atan2(t[1, 0] - t[0, 1], t[0, 0] + t[1, 1])))
            assert 68.5 < ang < 70.5, ang


def test_bad_foreground_and_framing_are_one_line_errors(tmp_path):
    """A missing mask, a mask of the wrong size and an unknown framing are refused with the file and the fix."""
    from PIL import Image

    from skystack.engine.errors import SkystackError
    from skystack.engine.foreground import load_mask

    with pytest.raises(SkystackError, match="nope.png: no such mask file"):
        stack.StackConfig(foreground=str(tmp_path / "nope.png"))
    with pytest.raises(SkystackError, match="--framing 'mosaic'"):
        stack.StackConfig(framing="mosaic")
    p = tmp_path / "m.png"
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(p)
    with pytest.raises(SkystackError, match=r"m.png: mask is 20x10 but the lights are 64x48"):
        load_mask(p, (48, 64))
    assert load_mask(p, (10, 20)).mask.sum() == 0


def test_block_mean_is_numpys_nanmean_and_quiet_from_threads(rng):
    """The small frames' block means are NumPy's nanmean bit for bit (NaN-only blocks NaN), and binning
    in several threads at once gives no "Mean of empty slice" warning (warnings filters are global)."""
    import warnings

    from skystack.engine.foreground import block_mean
    from skystack.engine.workers import map_threads

    imgs = [rng.normal(0.1, 0.02, (3, 61, 83)).astype(np.float32) for _ in range(8)]
    for img in imgs:
        img[:, rng.random((61, 83)) < 0.2] = np.nan
        img[:, :8] = np.nan  # whole blocks without data
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = map_threads(lambda im: block_mean(im, 4), imgs)
    assert not [w for w in seen if "empty slice" in str(w.message)]
    for img, g in zip(imgs, got):
        lum = img.mean(axis=0)[:60, :80].reshape(15, 4, 20, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = np.nanmean(lum, axis=(1, 3)).astype(np.float32)
        assert g.dtype == np.float32 and np.array_equal(g, ref, equal_nan=True) and np.isnan(g[:2]).all()
