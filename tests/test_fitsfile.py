"""engine/fitsfile.py: plain FITS images read and written without astropy, against astropy as the reference."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from skystack.engine import fitsfile, io

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def _astropy_header(p: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fits.getheader(p, 0)


def _write(p: Path, data: np.ndarray, cards=(), raw_cards=(), **hdr_kw) -> Path:
    """A FITS written by astropy (``cards``: (key, value[, comment]) in order, repeats kept), with
    ``raw_cards`` (80-column text) put in as they are."""
    h = fits.PrimaryHDU(data)
    for k, v in hdr_kw.items():
        h.header[k] = v
    for c in cards:
        h.header.append(c)
    for text in raw_cards:
        h.header.append(fits.Card.fromstring(text))
    h.writeto(p, overwrite=True)
    return p


def test_header_values_equal_astropys(tmp_path):
    """Every valued card as astropy reads it, type and all: strings with quotes and spaces, empty and
    long ones, ints, floats (E and D exponents), logicals, a repeated key (the first wins), COMMENT
    and HISTORY texts in order; and the pixels start where astropy says."""
    p = _write(tmp_path / "a.fits", np.arange(12, dtype=np.uint16).reshape(3, 4),
               cards=[("OBJECT", "  M 94 ", "target"), ("QUOTE", "it's 'x'"), ("EMPTY", ""),
                      ("LONGISH", "y" * 60), ("XBINNING", 2), ("NEGINT", -17), ("EXPTIME", 10.0),
                      ("XPIXSZ", 2.90000009536743), ("TINY", 1.25e-30), ("BIG", -6.5e+22), ("ISCOLOR", True),
                      ("FLIPPED", False), ("XBINNING", 4), ("HISTORY", "first"), ("COMMENT", "a comment"),
                      ("HISTORY", "second   ")],
               raw_cards=["DEXP    =               1.5D+3 / Fortran exponent",
                          "PLUS    =                  +12", "FRAC    =                  .25"],
               BZERO=32768, BAYERPAT="RGGB")
    ref = _astropy_header(p)
    got = fitsfile.read_header(p)
    assert got is not None
    keys = {k for k in ref if k}
    assert keys == set(got)
    for k in keys:
        if k in ("COMMENT", "HISTORY"):
            assert list(got[k]) == [str(v) for v in ref[k]], k
        else:
            assert got[k] == ref[k] and type(got[k]) is type(ref[k]), (k, got[k], ref[k])
    assert got["xbinning"] == 2 and "bayerpat" in got  # case-insensitive, the first of a repeat
    with fits.open(p) as hdul:
        assert got.data_offset == hdul.fileinfo(0)["datLoc"]


@pytest.mark.parametrize("raw", [None, "HIERARCH ESO DET GAIN = 1.5", "UNDEF   =", "CPLX    = (1.0, 2.0)"])
def test_forms_left_to_astropy(tmp_path, raw):
    """Long strings (CONTINUE), HIERARCH keys, undefined and complex values: read_header declines
    (astropy reads the file), and the frame read through astropy is the frame read before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = _write(tmp_path / "f.fits", np.full((4, 6), 7, np.uint16), cards=[("LONGSTR", "a" * 100)] if raw is None
                   else [], raw_cards=[raw] if raw else [], BZERO=32768, BAYERPAT="RGGB", EXPTIME=5.0)
    assert fitsfile.read_header(p) is None
    f = io.read_frame(p)
    assert f.meta.exposure_s == 5.0 and f.meta.pattern == "RGGB" and (f.data == 7).all()


def test_non_fits_and_extension_images_are_declined(tmp_path):
    txt = tmp_path / "x.fits"
    txt.write_text("not a FITS file" * 300)
    assert fitsfile.read_header(txt) is None
    ext = tmp_path / "ext.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 4), np.float32))]).writeto(ext)
    assert fitsfile.read_header(ext) is None  # the image is in an extension: astropy finds it
    assert io.read_frame(ext).data.shape == (4, 4)


def _through_astropy(monkeypatch, p: Path):
    with monkeypatch.context() as m:
        m.setattr(fitsfile, "read_header", lambda path: None)
        return io.read_frame(p), io.read_meta(p)


@pytest.mark.parametrize("kind", ["u16", "i16", "i16neg", "u8", "f32", "f64", "i32", "scaled", "cube"])
def test_read_frame_equals_the_astropy_path(tmp_path, monkeypatch, kind):
    """Pixels, dtype and metadata of every pixel type as the astropy path gives them (BITPIX 32 and -64
    and scaled data go through astropy from the fast header)."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 3000, (6, 10))
    data, kw = {
        "u16": (base.astype(np.uint16), {"BZERO": 32768}), "i16": (base.astype(np.int16), {}),
        "i16neg": ((base - 1500).astype(np.int16), {}), "u8": ((base % 250).astype(np.uint8), {}),
        "f32": (rng.random((6, 10)).astype(np.float32), {}), "f64": (rng.random((6, 10)), {}),
        "i32": (base.astype(np.int32), {}), "scaled": (base.astype(np.int16), {"BSCALE": 2.0}),
        "cube": (rng.integers(0, 200, (3, 6, 10)).astype(np.uint8), {}),
    }[kind]
    p = tmp_path / f"{kind}.fits"
    h = fits.PrimaryHDU(data)
    for k, v in {**kw, "BAYERPAT": "GRBG", "EXPTIME": 30.0, "GAIN": 120, "DATE-OBS": "2024-01-02T03:04:05",
                 "OBJECT": "NGC 7023", "CCD-TEMP": -10.2, "XBAYROFF": 1}.items():
        h.header[k] = v
    h.writeto(p)
    assert fitsfile.read_header(p) is not None
    fast, fast_meta = io.read_frame(p), io.read_meta(p)
    ref, ref_meta = _through_astropy(monkeypatch, p)
    assert fast.data.dtype == ref.data.dtype and np.array_equal(fast.data, ref.data)
    assert fast.meta == ref.meta and fast_meta == ref_meta


def test_real_seestar_frames_read_as_through_astropy(monkeypatch):
    folder = REALDATA / "seestar-m94" / "lights_session1"
    files = sorted(folder.glob("*.fit"))[:3] if folder.is_dir() else []
    if not files:
        pytest.skip("../shared/realdata is absent")
    for p in files:
        fast = io.read_frame(p)
        ref, _ = _through_astropy(monkeypatch, p)
        assert np.array_equal(fast.data, ref.data) and fast.meta == ref.meta


def test_written_images_read_back_through_astropy(tmp_path):
    """write_images: astropy verifies the file and reads back every value, the long string (CONTINUE)
    and the HISTORY text beyond a card, and the float32, int16 and uint8 images with their names."""
    cards = (fitsfile.card("OBJECT", "M 94", "target") + fitsfile.card("EXPTIME", 10.0, "[s]")
             + fitsfile.card("NCOMBINE", 20) + fitsfile.card("TINY", 1.234e-30) + fitsfile.card("FLAG", False)
             + fitsfile.card("QUOTE", "it's") + fitsfile.card("LONGSTR", "x'" * 50 + "end")
             + fitsfile.card("HISTORY", "h" * 150) + fitsfile.card("INTF", 3.0)
             + fitsfile.card("NOTE", "c", "a comment far too long " * 5))
    img = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    cov = np.arange(35, dtype=np.int16).reshape(5, 7)
    land = (cov % 2).astype(np.uint8)
    p = tmp_path / "w.fits"
    fitsfile.write_images(p, [(img, cards, None), (cov, fitsfile.card("NFRAMES", 20), "COVERAGE"),
                              (land, [], "LANDSCAPE")])
    assert p.stat().st_size % 2880 == 0
    with fits.open(p) as hdul:
        hdul.verify("exception")
        h = hdul[0].header
        assert (h["OBJECT"], h["EXPTIME"], h["NCOMBINE"], h["TINY"], h["FLAG"], h["QUOTE"], h["INTF"]) == \
            ("M 94", 10.0, 20, 1.234e-30, False, "it's", 3.0)
        assert h["LONGSTR"] == "x'" * 50 + "end" and "".join(h["HISTORY"]) == "h" * 150
        assert np.array_equal(hdul[0].data, img) and hdul[0].data.dtype.kind == "f"
        assert np.array_equal(hdul["COVERAGE"].data, cov) and hdul["COVERAGE"].header["NFRAMES"] == 20
        assert np.array_equal(hdul["LANDSCAPE"].data, land)
    with pytest.raises(ValueError):
        fitsfile.card("EXPTIME", float("nan"))
    with pytest.raises(ValueError):
        fitsfile.card("lower", 1)


def test_a_session_neither_imports_astropy(tmp_path):
    """Reading plain FITS lights, writing and reading a master and writing the stack's FITS leave
    astropy unimported (its import costs 0.2-0.3 s before the first frame)."""
    light = _write(tmp_path / "l.fits", np.full((8, 12), 1000, np.uint16), BZERO=32768, BAYERPAT="RGGB",
                   EXPTIME=10.0)
    code = f"""
import sys, numpy as np
from skystack.engine import io, output
from skystack.engine.masters import build_master
from skystack.engine.masterfile import read_master, write_master
f = io.read_frame({str(light)!r})
m = build_master("bias", [{str(light)!r}] * 3, use_cache=False)
back = read_master(write_master(m, {str(tmp_path / 'm.fits')!r}).meta.path)
output.write_fits({str(tmp_path / 's.fits')!r}, np.zeros((3, 8, 12), np.float32), {{"NCOMBINE": (3, "frames")}},
                  extensions=[("COVERAGE", np.ones((8, 12), np.int16), {{"NFRAMES": 3}})])
print(json.dumps([float(f.data.mean()), bool(np.array_equal(back.data, m.data)), "astropy" in sys.modules]))
""".replace("print(json", "import json; print(json")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mean, same, imported = json.loads(out.strip().splitlines()[-1])
    assert mean == 1000.0 and same and not imported
    with fits.open(tmp_path / "s.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == 3 and hdul[0].header["ROWORDER"] == "BOTTOM-UP"
