"""finish: curves, colour-noise-free saturation, the whole pipeline, reading stacks, writing pictures."""

from __future__ import annotations

import numpy as np
import pytest

from skystack.engine.errors import FrameReadError, InputNotFound, OutputError, SkystackError
from skystack.engine.finish import (
    FinishConfig,
    _shared_stretch,
    black_point,
    boost_saturation,
    finish_command,
    finish_image,
    read_stack,
    s_curve,
    stretch_shared,
)
from skystack.engine.output import write_tiff

# ----------------------------------------------------------------------------- curves


@pytest.mark.parametrize("c", [0.0, 0.2, 0.6, 1.0])
def test_s_curve_properties(c):
    x = np.linspace(0, 1, 10001, dtype=np.float32)
    y = s_curve(x, c)
    assert y[0] == 0.0 and y[-1] == pytest.approx(1.0, abs=1e-6)
    assert s_curve(np.float32(0.5), c) == pytest.approx(0.5, abs=1e-6)
    assert np.all(np.diff(y.astype(np.float64)) >= -1e-7)  # monotonic
    assert np.allclose(y + y[::-1], 1.0, atol=2e-6)  # symmetric about (0.5, 0.5)
    slope = (s_curve(np.float32(0.5001), c) - s_curve(np.float32(0.4999), c)) / 0.0002
    assert slope == pytest.approx(1.0 + c, rel=2e-3)
    if c > 0:
        assert s_curve(np.float32(0.2), c) < 0.2 < 0.8 < s_curve(np.float32(0.8), c)  # more contrast


def test_s_curve_zero_is_identity():
    x = np.random.default_rng(0).random(1000).astype(np.float32)
    assert np.array_equal(s_curve(x, 0.0), x)


def test_black_point():
    x = np.array([0.0, 0.05, 0.1, 0.55, 1.0], np.float32)
    assert np.allclose(black_point(x, 0.1), [0, 0, 0, 0.5, 1.0], atol=1e-6)
    assert np.array_equal(black_point(x, 0.0), x)


# ----------------------------------------------------------------------------- saturation


def _chroma_rms(img: np.ndarray, sl=np.s_[:, :]) -> float:
    c = img - img.mean(axis=0, keepdims=True)
    return float(np.sqrt(np.mean(c[(slice(None),) + sl] ** 2)))


@pytest.fixture
def coloured_scene(rng):
    """A stretched-looking image: noisy neutral sky at 0.2 and a bright orange disk."""
    h, w = 240, 320
    img = np.full((3, h, w), 0.2, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    disk = np.hypot(xx - 220, yy - 120) < 40
    img[:, disk] = np.array([0.75, 0.6, 0.45], np.float32)[:, None]
    img += (0.02 * rng.standard_normal((3, h, w))).astype(np.float32)
    return img, disk


def test_saturation_adds_no_colour_noise_to_the_sky(coloured_scene):
    img, disk = coloured_scene
    sky = np.s_[10:110, 10:110]
    out = boost_saturation(img, 2.0)
    # sky chroma noise is unchanged (measured ratio 1.000); a plain L + 2 C boost doubles it
    ratio = _chroma_rms(out, sky) / _chroma_rms(img, sky)
    assert ratio < 1.02
    naive = img.mean(0, keepdims=True) + 2.0 * (img - img.mean(0, keepdims=True))
    assert _chroma_rms(naive, sky) / _chroma_rms(img, sky) == pytest.approx(2.0, rel=1e-3)
    # the disk's (mean) colour is doubled away from grey
    inner = np.zeros_like(disk)
    inner[120 - 25:120 + 25, 220 - 25:220 + 25] = True
    inner &= disk
    c_in = (img - img.mean(0))[:, inner].mean(axis=1)
    c_out = (out - out.mean(0))[:, inner].mean(axis=1)
    assert np.allclose(c_out, 2.0 * c_in, rtol=0.03, atol=0.003)
    # luminance is kept (a chroma change has zero channel mean)
    assert np.allclose(out.mean(0)[inner].mean(), img.mean(0)[inner].mean(), atol=1e-4)


def test_saturation_neutral_identity_and_desaturation(coloured_scene):
    img, disk = coloured_scene
    grey = np.repeat(img[1:2], 3, axis=0)
    assert np.allclose(boost_saturation(grey, 2.5), grey, atol=1e-6)
    assert np.array_equal(boost_saturation(img, 1.0), img)
    half = boost_saturation(img, 0.5)
    assert _chroma_rms(half) == pytest.approx(0.5 * _chroma_rms(img), rel=0.02)
    mono = img[0]
    assert np.array_equal(boost_saturation(mono, 2.0), mono)


# ----------------------------------------------------------------------------- stretch


def test_shared_stretch_keeps_a_neutral_sky_neutral(rng):
    """After neutralisation the sky levels are equal but the noise is not (blue gain 1.9)."""
    h, w = 300, 400
    noise = np.array([0.0004, 0.0002, 0.0007])[:, None, None]
    img = (0.015 + noise * rng.standard_normal((3, h, w))).astype(np.float32)
    cfg = FinishConfig(target_background=0.2)
    c0, m = _shared_stretch(img, cfg)
    out = stretch_shared(img, c0, m)
    med = np.median(out.reshape(3, -1), axis=1)
    assert np.ptp(med) < 0.003, med  # measured 0.000
    assert np.median(out.mean(0)) == pytest.approx(0.2, abs=0.01)
    # the stack preview's linked stretch clips each channel at its own 2.8 sigma, which tints it
    from skystack.engine.stretch import StretchConfig, autostretch

    tinted = np.median(autostretch(img, StretchConfig(linked=True)).reshape(3, -1), axis=1)
    assert np.ptp(tinted) > 0.05
    # shadows: at most the 2.8-sigma tail of the noisiest channel clips to black
    assert np.mean(out[2] == 0) < 0.006


# ----------------------------------------------------------------------------- pipeline


def _session_like(rng, h=300, w=400, n=10):
    """A stack with ragged, partly covered edges (NaN beyond), a 20 % gradient and a few stars."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    count = np.full((h, w), n, np.int32)
    count[:, :12] = 4
    count[:, :4] = 0
    count[-20:, :] = np.minimum(count[-20:, :], 8)
    count[:7, 200:] = 5
    sky = 0.05 * (1.0 + 0.2 * xx / w)
    img = np.stack([sky * 1.1, sky, sky * 0.8]).astype(np.float64)
    for k in range(40):
        x0, y0 = rng.uniform(20, w - 20), rng.uniform(20, h - 20)
        img += np.array([0.5, 1.0, 0.7])[:, None, None] * 0.02 * rng.uniform(0.2, 1) * np.exp(
            -((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 1.5 ** 2))
    img += 0.0005 * rng.standard_normal(img.shape)
    img = img.astype(np.float32)
    img[:, count == 0] = np.nan
    return img, count


def test_finish_image_crops_flattens_and_stretches(rng):
    img, count = _session_like(rng)
    cfg = FinishConfig(contrast=0.0, saturation=1.0, white_balance=False)
    fin = finish_image(img, count=count, n_frames=10, config=cfg)
    y0, y1, x0, x1 = fin.crop
    assert fin.crop_source == "coverage"
    assert count[y0:y1, x0:x1].min() >= 9  # no pixel that fewer than 90 % of the frames covered
    assert (y0, y1, x0, x1) == (7, 280, 12, 400)  # the largest such rectangle
    assert fin.image.shape == fin.linear.shape == (3, y1 - y0, x1 - x0)
    assert np.isfinite(fin.image).all() and fin.image.min() >= 0 and fin.image.max() <= 1
    # flat and neutral: sky medians of left and right thirds agree in every channel
    left = np.median(fin.linear[:, :, :100].reshape(3, -1), axis=1)
    right = np.median(fin.linear[:, :, -100:].reshape(3, -1), axis=1)
    assert np.allclose(left, right, rtol=0.002)
    assert np.ptp(left) / left.mean() < 0.002
    assert np.median(fin.image.mean(0)) == pytest.approx(0.2, abs=0.01)
    s = fin.summary()
    assert s["crop"]["x0"] == 12 and s["background"]["boxes_used"] > 0


def test_finish_image_without_coverage_crops_nan_edges(rng):
    img, _ = _session_like(rng)
    fin = finish_image(img, config=FinishConfig())
    assert fin.crop == (0, 300, 4, 400) and fin.crop_source == "data"
    assert any("coverage" in w for w in fin.warnings)


def test_finish_image_options_off_and_mono(rng):
    img, count = _session_like(rng)
    cfg = FinishConfig(crop=False, background="none", neutralize=False, white_balance=False,
                       contrast=0.0, saturation=1.0)
    fin = finish_image(img, count=count, config=cfg)
    assert fin.crop is None and fin.background is None and fin.colour is None
    assert np.array_equal(np.isnan(fin.linear), np.isnan(img))
    mono = finish_image(img[1], count=count, n_frames=10, config=FinishConfig())
    assert mono.image.ndim == 2 and mono.image.shape == (273, 388)


@pytest.mark.parametrize("kw, match", [
    ({"background": "flat"}, "background"), ({"crop_fraction": 1.5}, "crop-fraction"),
    ({"target_background": 1.0}, "target-background"), ({"black_point": -0.1}, "black-point"),
    ({"contrast": 1.5}, "contrast"), ({"saturation": -1}, "saturation"), ({"bg_degree": 7}, "degree"),
])
def test_bad_finish_config(kw, match):
    with pytest.raises(SkystackError, match=match):
        FinishConfig(**kw)


def test_coverage_shape_mismatch(rng):
    img, count = _session_like(rng)
    with pytest.raises(SkystackError, match="coverage map"):
        finish_image(img, count=count[:-1], config=FinishConfig())


# ----------------------------------------------------------------------------- files


def _write_fits(path, img, count=None, n=None):
    from astropy.io import fits

    hdus = [fits.PrimaryHDU(img.astype(np.float32))]
    hdus[0].header["NCOMBINE"] = 10
    if count is not None:
        cov = fits.ImageHDU(count.astype(np.int16), name="COVERAGE")
        if n is not None:
            cov.header["NFRAMES"] = n
        hdus.append(cov)
    fits.HDUList(hdus).writeto(path)


def test_read_stack_tiff_fits_and_coverage(tmp_path, rng):
    img, count = _session_like(rng)
    tif = write_tiff(tmp_path / "s.tif", img)
    st = read_stack(tif)
    assert np.array_equal(st.image, img, equal_nan=True) and st.count is None
    _write_fits(tmp_path / "s.fits", img, count, n=10)  # the FITS beside the TIFF has the map
    st = read_stack(tif)
    assert np.array_equal(st.count, count) and st.n_frames == 10 and st.coverage_path == tmp_path / "s.fits"
    st = read_stack(tmp_path / "s.fits")
    assert np.array_equal(st.image, img, equal_nan=True) and np.array_equal(st.count, count)
    _write_fits(tmp_path / "nocov.fits", img)
    with pytest.raises(FrameReadError, match="COVERAGE"):
        read_stack(tif, coverage=tmp_path / "nocov.fits")
    _write_fits(tmp_path / "small.fits", img, count[:-2])
    with pytest.raises(FrameReadError, match="does not match"):
        read_stack(tif, coverage=tmp_path / "small.fits")
    with pytest.raises(InputNotFound, match="no such stack"):
        read_stack(tmp_path / "missing.tif")
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(FrameReadError, match="TIFF or FITS"):
        read_stack(tmp_path / "x.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(FrameReadError, match="cannot read"):
        read_stack(tmp_path / "bad.tif")


def test_finish_command_writes_everything(tmp_path, rng):
    from PIL import Image
    import json
    import tifffile

    img, count = _session_like(rng)
    write_tiff(tmp_path / "s.tif", img)
    _write_fits(tmp_path / "s.fits", img, count, n=10)
    res, out = finish_command(tmp_path / "s.tif", tmp_path / "pic.jpg", config=FinishConfig(),
                              linear=tmp_path / "lin.tif", tiff16=tmp_path / "pic16.tif",
                              report=tmp_path / "pic.json")
    assert set(out) == {"picture", "linear", "tiff16", "report"}
    with Image.open(tmp_path / "pic.jpg") as im:
        assert im.size == (388, 273) and im.mode == "RGB"
    t16 = tifffile.imread(tmp_path / "pic16.tif")
    assert t16.dtype == np.uint16 and t16.shape == (273, 388, 3)
    assert np.abs(t16.astype(np.float64) / 65535 - np.moveaxis(res.image, 0, -1)).max() < 1e-4
    lin = tifffile.imread(tmp_path / "lin.tif")
    assert lin.dtype == np.float32 and np.allclose(np.moveaxis(lin, -1, 0), res.linear, equal_nan=True)
    rep = json.loads((tmp_path / "pic.json").read_text())
    assert rep["crop"]["source"] == "coverage" and rep["crop"]["y0"] == 7
    # PNG by suffix; a 16-bit TIFF picture when -o is .tif
    _, out2 = finish_command(tmp_path / "s.fits", tmp_path / "pic.png")
    with Image.open(out2["picture"]) as im:
        assert im.format == "PNG"
    with pytest.raises(SkystackError, match="unknown picture type"):
        finish_command(tmp_path / "s.tif", tmp_path / "pic.bmp")
    # never overwrite the input
    before = (tmp_path / "s.tif").read_bytes()
    with pytest.raises(OutputError, match="input"):
        finish_command(tmp_path / "s.tif", tmp_path / "s.tif", config=FinishConfig())
    with pytest.raises(OutputError, match="input"):  # the coverage file is an input too
        finish_command(tmp_path / "s.tif", tmp_path / "p.png", report=tmp_path / "s.fits")
    with pytest.raises(OutputError, match="input"):
        finish_command(tmp_path / "s.tif", tmp_path / "s.fits.png", linear=tmp_path / "s.tif")
    assert (tmp_path / "s.tif").read_bytes() == before
    assert not list(tmp_path.glob("*.part"))
