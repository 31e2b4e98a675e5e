"""What ``stack`` writes: one way up everywhere, a FITS header a plate solver can use,
one consistent output set, and an HTML report that renders with its plots."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from skystack import cli
from skystack.tools.synth import SynthConfig, simulate

from sessions import write_small_session

N_LIGHTS = 6


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """A 6-light FITS session (with pointing headers added) stacked by the CLI."""
    from astropy.io import fits

    root = tmp_path_factory.mktemp("report")
    write_small_session(root / "s", n_lights=N_LIGHTS, bias=3, file_format="fits")
    lights = sorted((root / "s" / "lights").iterdir())
    for i, f in enumerate(lights):
        with fits.open(f, mode="update") as h:
            h[0].header.update(RA=189.99, DEC=41.12, OBJCTRA="12 39 57.6", TELESCOP="Synth 80/480",
                               FILTER="L-eNhance", OBJECT="M 94", **{"CCD-TEMP": 10.0 + i})
    out = root / "o" / "m94.tif"
    assert cli.main(["--backend", "cpu", "stack", str(root / "s"), "-o", str(out), "-q",
                     "--cache-dir", str(root / "c")]) == 0
    return out, lights


def _corr(a, b) -> float:
    m = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[m].ravel(), b[m].ravel())[0, 1])


def test_fits_is_stored_bottom_up_with_roworder(stacked):
    """astropy: the FITS rows are the TIFF's rows in reverse (FITS convention), and it says so."""
    import tifffile
    from astropy.io import fits

    out, _ = stacked
    tif = np.moveaxis(tifffile.imread(out), -1, 0)
    with fits.open(out.with_suffix(".fits")) as h:
        assert h[0].header["ROWORDER"] == "BOTTOM-UP"
        data = h[0].data
        cov = h["COVERAGE"].data
    np.testing.assert_array_equal(data[:, ::-1, :], tif)
    assert _corr(data, tif) < 0.99 < _corr(data[:, ::-1, :], tif)  # the check can tell the two apart
    # finish reads either file the same way up, with its coverage map
    from skystack.engine.finish import read_stack

    a, b = read_stack(out), read_stack(out.with_suffix(".fits"))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_array_equal(b.count, cov[::-1])


@pytest.mark.skipif(shutil.which("siril-cli") is None, reason="siril-cli is not installed")
def test_siril_loads_fits_and_tiff_the_same_way_up(stacked, tmp_path):
    """Siril loads the stack FITS and its TIFF; what it holds correlates > 0.99 without any flip."""
    from astropy.io import fits

    out, _ = stacked
    script = tmp_path / "load.ssf"
    script.write_text(f"requires 1.0.0\nload {out.with_suffix('.fits')}\nsave {tmp_path / 'from_fits'}\n"
                      f"load {out}\nsave {tmp_path / 'from_tiff'}\n")
    r = subprocess.run(["siril-cli", "-d", str(tmp_path), "-s", str(script)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    a = fits.getdata(tmp_path / "from_fits.fit").astype(np.float64)
    b = fits.getdata(tmp_path / "from_tiff.fit").astype(np.float64)
    assert a.shape == b.shape
    assert _corr(a, b) > 0.99
    assert _corr(a[:, ::-1, :], b) < 0.99


def test_fits_header_carries_the_lights_acquisition(stacked):
    """DATE-OBS/DATE-END, target, camera, pointing, optics and sensor cards, as Siril writes them."""
    from astropy.io import fits

    out, lights = stacked
    heads = [fits.getheader(f) for f in lights]
    rep = json.loads(out.with_suffix(".json").read_text())
    used = {Path(f["path"]).name for f in rep["frames"] if f["used"]}
    assert len(used) == N_LIGHTS
    h = fits.getheader(out.with_suffix(".fits"))
    starts = [dt.datetime.fromisoformat(x["DATE-OBS"]) for x in heads]
    ends = [s + dt.timedelta(seconds=x["EXPTIME"]) for s, x in zip(starts, heads)]
    assert dt.datetime.fromisoformat(h["DATE-OBS"]) == min(starts)
    assert dt.datetime.fromisoformat(h["DATE-END"]) == max(ends)
    for key in ("OBJECT", "INSTRUME", "TELESCOP", "FILTER", "OBJCTRA"):
        assert h[key] == heads[0][key], key
    for key in ("RA", "DEC", "FOCALLEN", "XPIXSZ", "YPIXSZ", "GAIN"):
        assert h[key] == pytest.approx(heads[0][key]), key
    assert h["CCD-TEMP"] == pytest.approx(np.mean([x["CCD-TEMP"] for x in heads]))
    assert h["NCOMBINE"] == N_LIGHTS == h["STACKCNT"]
    assert h["EXPTIME"] == pytest.approx(sum(x["EXPTIME"] for x in heads))


def test_every_output_carries_one_run_id(stacked):
    import tifffile
    from astropy.io import fits
    from PIL import Image

    out, _ = stacked
    run = json.loads(out.with_suffix(".json").read_text())["run_id"]
    assert len(run) == 16
    assert fits.getheader(out.with_suffix(".fits"))["RUNID"] == run
    with tifffile.TiffFile(out) as tf:
        assert run in tf.pages[0].description
    with Image.open(out.with_suffix(".png")) as im:
        assert im.text["skystack-run"] == run
    assert run in out.with_suffix(".html").read_text()
    for p in out.parent.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask(), p


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_html_report_is_self_contained_and_complete(stacked):
    import re

    out, lights = stacked
    page = out.with_suffix(".html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing fetched
    assert not re.search(r"(href|src)=\"(https?:|//)", page)
    for img_id in ("preview", "time-plots", "coverage", "rejections"):
        assert f'id="{img_id}"' in page
    for col in ("used / why not", "stars", "FWHM px", "roundness", "background", "noise", "weight",
                "residual px", "rejected %"):
        assert f">{col}<" in page
    assert page.count("<tr class=\"used\">") == N_LIGHTS
    assert all(f.name in page for f in lights)
    for word in ("Settings", "Stage timings", "peak memory", "transform_model", "rejection"):
        assert word in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _screenshot(page: Path, png: Path, size=(1280, 2600)) -> np.ndarray:
    from PIL import Image

    exe = _chromium()
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not png.is_file():
        pytest.skip(f"headless chromium could not render: {r.stderr[-300:]}")
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _near(shot: np.ndarray, rgb, tol=24) -> np.ndarray:
    return (np.abs(shot - np.asarray(rgb, dtype=np.int16)).max(axis=-1) <= tol)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (CI installs it)")
def test_html_report_renders_its_plots_in_headless_chromium(stacked, tmp_path):
    """The screenshot shows the plots: the time series' line colour and the maps' viridis colours.

    The same page with its images and inline SVG plots removed is the control: it shows none of them.
    """
    import re

    out, _ = stacked
    shot = _screenshot(out.with_suffix(".html"), tmp_path / "shot.png")
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<svg.*?</svg>", "", re.sub(r'src="data:[^"]*"', 'src=""',
                                                      out.with_suffix(".html").read_text()), flags=re.S))
    control = _screenshot(bare, tmp_path / "bare.png")
    line = _near(shot, (0x1F, 0x77, 0xB4))  # the used frames' FWHM, stars... curves (matplotlib's C0)
    yellow = _near(shot, (0xFD, 0xE7, 0x25))  # viridis maximum: fully covered pixels
    purple = _near(shot, (0x44, 0x01, 0x54), tol=16)  # viridis minimum: colour bars
    assert line.sum() > 1000 and yellow.sum() > 20000 and purple.sum() > 200, (line.sum(), yellow.sum(),
                                                                               purple.sum())
    # the curves sit in the plot region: between the preview (above) and the maps (below)
    rows = np.flatnonzero(line.sum(axis=1) > 3)
    yrows = np.flatnonzero(yellow.sum(axis=1) > 50)
    assert rows.size > 100 and yrows.size > 100 and np.median(rows) < np.median(yrows)
    assert _near(control, (0x1F, 0x77, 0xB4)).sum() < 50 and _near(control, (0xFD, 0xE7, 0x25)).sum() < 50
    # the preview itself: a dark sky, not the white page
    assert (shot[100:300, 30:400].mean(axis=-1) < 90).mean() > 0.5


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (CI installs it)")
def test_html_frame_table_sorts_in_chromium(stacked, tmp_path):
    """Clicking a column title sorts the rows by it (twice: the other way round)."""
    import re

    out, _ = stacked
    page = out.with_suffix(".html").read_text()
    click = ("<script>var th = Array.from(document.querySelectorAll('#frames th'))"
             ".find(function(t){ return t.textContent === 'FWHM px'; }); th.click(); "
             "var first = Array.from(document.querySelectorAll('#frames tbody tr')).map(function(r){ "
             "return r.cells[5].dataset.v; }).join(','); th.click(); "
             "var second = Array.from(document.querySelectorAll('#frames tbody tr')).map(function(r){ "
             "return r.cells[5].dataset.v; }).join(','); "
             "document.body.setAttribute('data-asc', first); document.body.setAttribute('data-desc', second);"
             "</script></body>")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", click))
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"headless chromium could not render: {r.stderr[-300:]}")
    asc = [float(v) for v in re.search(r'data-asc="([^"]*)"', r.stdout).group(1).split(",")]
    desc = [float(v) for v in re.search(r'data-desc="([^"]*)"', r.stdout).group(1).split(",")]
    fwhm = sorted(json.loads(out.with_suffix(".json").read_text())["frames"], key=lambda f: f["fwhm_px"])
    assert asc == sorted(asc) and desc == asc[::-1] and len(asc) == N_LIGHTS
    assert asc == pytest.approx([f["fwhm_px"] for f in fwhm])


def test_rejection_map_shows_a_satellite_trail(tmp_path):
    """The report's rejection-count map (coverage - kept values) lights up along the simulated
    satellite of light 2, mapped into the reference grid, and stays dark elsewhere."""
    from skystack.engine.report import rejection_map
    from skystack.engine.session import discover_session
    from skystack.engine.stack import StackConfig, stack_session
    from skystack.tools.synth import load_truth

    truth = load_truth(simulate(SynthConfig(seed=5, width=480, height=360, n_lights=6, n_bias=0, n_darks=0,
                                            n_flats=0, n_dark_flats=0, file_format="fits", trail_frames=(2,),
                                            cloudy_frame=None, shake_frame=None), tmp_path / "s"))
    # percentile clipping: with 6 frames a 3-sigma clip cannot reject a lone outlier ((n-1)/sqrt(n) < 3).
    # Its thresholds are fractions of the level (0.2 / 0.1 of the median), not of the noise: with the
    # default RCD's 1.07-1.24x per-pixel noise this faint sky's own noise reaches them (18 % of pixels far
    # from the trail), so the map is read on the bilinear debayer's stack
    res = stack_session(discover_session(tmp_path / "s"), StackConfig(quiet=True, backend="cpu",
                                                                      rejection="percentile", debayer="bilinear"))
    rej = rejection_map(res)
    trail = truth.frames("light")[2].trail
    t = np.asarray(res.frames[2].transform)
    (x0, y0, _), (x1, y1, _) = t @ [trail["x0"], trail["y0"], 1.0], t @ [trail["x1"], trail["y1"], 1.0]
    yy, xx = np.mgrid[: rej.shape[0], : rej.shape[1]]
    dist = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / np.hypot(x1 - x0, y1 - y0)
    covered = res.coverage == N_LIGHTS
    near, far = covered & (dist < 1.5), covered & (dist > 8)
    assert near.sum() > 300
    assert (rej[near] >= 1).mean() > 0.9 and rej[far].mean() < 0.1, ((rej[near] >= 1).mean(), rej[far].mean())


def test_time_plots_svg_places_every_value():
    """The hand-drawn SVG plots: one panel per quantity, each frame's marker at its value (a linear
    axis: marker heights are an affine map of the values), skipped frames hollow red, a missing value
    breaks the used frames' curve, ticks are round numbers inside the axis."""
    import re

    from skystack.engine.htmlreport import TIME_PLOTS, _ticks, time_plots_svg

    fwhm = [2.5, 3.1, None, 2.2, 4.0, 2.8]
    frames = [{"path": f"f{i}.fits", "used": i != 4, "fwhm_px": v, "stars": 100 + 7 * i, "background": 0.01,
               "weight": 1.0, "residual_px": 0.1 * i, "timestamp": f"2025-03-27T01:2{i}:00"}
              for i, v in enumerate(fwhm)]
    svg = time_plots_svg(frames)
    assert svg.count('<rect x="80"') == len(TIME_PLOTS) and "minutes since the first light" in svg
    circles = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="3" ([^/]*)/>', svg)
    panels = svg.split('<rect x="80"')[1:]
    first = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="3" ([^/]*)/>', panels[0])
    assert len(first) == 5  # the missing FWHM has no marker
    cx = np.array([float(c[0]) for c in first])
    cy = np.array([float(c[1]) for c in first])
    vals = np.array([v for v in fwhm if v is not None])
    np.testing.assert_allclose(np.diff(cx) / np.diff([0, 1, 3, 4, 5]), (cx[1] - cx[0]), rtol=0.02)  # minutes
    slope, icpt = np.polyfit(vals, cy, 1)
    assert slope < 0 and np.abs(cy - (slope * vals + icpt)).max() < 0.1  # higher value, higher on the page
    assert ["#d62728" in c[2] and 'fill="none"' in c[2] for c in first] == [False, False, False, True, False]
    # the used frames' curve: 0-1, then (after the missing value) 3-5 without the skipped frame 4
    lines = re.findall(r'<polyline points="([^"]*)"', panels[0])
    assert [len(p.split()) for p in lines] == [2, 2]
    assert len(circles) == 5 + 4 * len(frames) + 2  # plus the legend's used and skipped marks
    ticks, dec = _ticks(0.0, 1.0, n=5)
    np.testing.assert_allclose(ticks, [0, 0.25, 0.5, 0.75, 1.0])
    assert dec == 2
    t, dec = _ticks(2.13, 4.09, n=4)
    np.testing.assert_allclose(t, [2.5, 3.0, 3.5, 4.0])
    assert dec == 1


def _small_result(seed: int = 3):
    """A StackResult of a 200x150 sky with stars and a coverage map (no stacking needed)."""
    from skystack.engine.stack import FrameRecord, StackResult

    rng = np.random.default_rng(seed)
    img = (0.05 + 0.002 * rng.standard_normal((3, 150, 200))).astype(np.float32)
    yy, xx = np.mgrid[:150, :200]
    for x, y in rng.uniform(10, 140, (40, 2)):
        img += (0.3 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.0)).astype(np.float32)
    cov = np.full((150, 200), 4, np.int16)
    cov[:, :6] = 3
    frames = [FrameRecord(path=f"l{i}.fits", used=True, stars=30 + i, fwhm_px=2.0 + 0.1 * i, weight=1.0)
              for i in range(4)]
    return StackResult(image=img, count=cov.astype(np.int32), coverage=cov, frames=frames, reference="l0.fits",
                       backend="cpu", device="test", settings={"rejection": "median"})


def test_outputs_written_in_threads_stay_one_set(tmp_path, monkeypatch):
    """The PNG is encoded in a thread while the HTML and JSON are made, yet the files stay one set:
    the PNG failing in its thread, the FITS, the preview or the HTML failing on the main thread leaves the
    previous set untouched and no temporary file; a good run replaces all five."""
    import tifffile

    from skystack.engine import finish, output
    from skystack.engine.errors import OutputError
    from skystack.engine.report import write_outputs

    paths = {k: str(tmp_path / f"s.{ext}") for k, ext in (("tiff", "tif"), ("preview", "png"), ("fits", "fits"),
                                                           ("report", "json"), ("html", "html"))}
    first = write_outputs(_small_result(1), **paths)
    assert list(first) == ["tiff", "fits", "preview", "report", "html"]
    run = json.loads((tmp_path / "s.json").read_text())["run_id"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def png_fails(*_a, **_k):
        time.sleep(0.2)  # the JSON and HTML are staged by then
        raise OutputError("disk full while writing the PNG")

    def fits_fails(*_a, **_k):
        raise OutputError("disk full while writing the FITS")

    def preview_fails(*_a, **_k):
        raise ValueError("no preview")

    def html_fails(*_a, **_k):
        time.sleep(0.5)  # the PNG is written (to its temporary file) by then
        raise OutputError("disk full while writing the HTML")

    cases = ((output, "write_preview", png_fails), (output, "write_fits", fits_fails),
             (finish, "preview_image", preview_fails), (output, "write_text", html_fails))
    for target, name, fn in cases:
        with monkeypatch.context() as m:
            m.setattr(target, name, fn)
            with pytest.raises((OutputError, ValueError)):
                write_outputs(_small_result(2), **paths)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no .part, nothing replaced
    write_outputs(_small_result(2), **paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    new = json.loads((tmp_path / "s.json").read_text())["run_id"]
    assert new != run and new in (tmp_path / "s.html").read_text()
    assert new in tifffile.TiffFile(tmp_path / "s.tif").pages[0].description
    np.testing.assert_array_equal(np.moveaxis(tifffile.imread(tmp_path / "s.tif"), -1, 0), _small_result(2).image)
