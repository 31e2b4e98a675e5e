"""Frame I/O: RAW (DNG through LibRaw), FITS, TIFF, PNG/JPEG, real data, bad files, ``skystack info``."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from skystack.tools.dng import write_dng
from skystack.engine.errors import FrameReadError, InputNotFound, SkystackError
from skystack.engine.frame import BAYER_PATTERNS
from skystack.engine.io import FRAME_EXTENSIONS, is_frame_file, read_frame, read_meta

DNG_550D = "dng-magiclantern-550d/colorchart.dng"


def _mosaic(rng, h=64, w=96, lo=0, hi=4095):
    return rng.integers(lo, hi + 1, size=(h, w), dtype=np.uint16)


# ----------------------------------------------------------------------------- DNG (LibRaw)


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_dng_round_trip(tmp_path, rng, pattern):
    cfa = _mosaic(rng)
    cfa[0, 0], cfa[-1, -1] = 0, 4095
    black = (100.0, 140.0, 180.0, 220.0)  # distinct per 2x2 position: catches mapping errors
    wb = (2.25, 1.0, 1.5)
    path = tmp_path / f"synth_{pattern}.dng"
    write_dng(path, cfa, pattern=pattern, black_level=black, white_level=4095, wb=wb,
              exif={"exposure_s": 30.0, "iso": 800, "focal_length_mm": 50.0, "f_number": 2.8,
                    "timestamp": "2025-03-01T21:00:00", "make": "Skystack", "model": "SynthCam"})
    f = read_frame(path)
    assert f.data.dtype == np.uint16 and f.data.shape == cfa.shape
    assert np.array_equal(f.data, cfa)
    assert f.is_cfa
    m = f.meta
    assert m.format == "raw"
    assert m.pattern == pattern
    assert m.black_level == black
    assert m.white_level == 4095.0
    assert m.wb == pytest.approx(wb, rel=1e-6)
    assert m.exposure_s == pytest.approx(30.0)
    assert m.iso == 800.0
    assert m.focal_length_mm == pytest.approx(50.0)
    assert m.extra["f_number"] == pytest.approx(2.8)
    assert m.timestamp == "2025-03-01T21:00:00+00:00"
    assert m.camera == "Skystack SynthCam"
    assert read_meta(path) == m
    assert read_frame(path, header_only=True).meta == m  # compatibility keyword


def test_read_meta_layouts_decode_one_raw_of_a_layout(tmp_path, rng, monkeypatch):
    """With ``layouts``, a DNG of a camera and sensor layout already read is not decoded: its
    pattern and levels are the first file's, its EXIF its own; another camera is decoded."""
    from skystack.engine import rawfile

    exif = {"exposure_s": 30.0, "iso": 800, "focal_length_mm": 50.0, "f_number": 2.8,
            "timestamp": "2025-03-01T21:00:00", "make": "Skystack", "model": "SynthCam"}
    a, b, c = (tmp_path / f"{k}.dng" for k in "abc")
    write_dng(a, _mosaic(rng), pattern="RGGB", black_level=(100, 140, 180, 220), white_level=4095, exif=exif)
    write_dng(b, _mosaic(rng), pattern="RGGB", black_level=(100, 140, 180, 220), white_level=4095,
              exif={**exif, "exposure_s": 15.0, "iso": 1600, "f_number": 4.0, "timestamp": "2025-03-01T21:00:40"})
    write_dng(c, _mosaic(rng), pattern="BGGR", black_level=(64, 64, 64, 64), white_level=4095,
              exif={**exif, "model": "OtherCam"})
    decodes = []
    real = rawfile._unpack_guarded
    monkeypatch.setattr(rawfile, "_unpack_guarded", lambda raw, p: (decodes.append(p.name), real(raw, p)))
    layouts: dict = {}
    ma, mb, mc = (read_meta(p, layouts=layouts) for p in (a, b, c))
    assert decodes == ["a.dng", "c.dng"]
    full_b = read_meta(b)  # no layouts: decoded
    assert mb == full_b  # the same metadata, its EXIF its own
    assert (mb.exposure_s, mb.iso, mb.extra["f_number"]) == (15.0, 1600.0, 4.0) != (ma.exposure_s, ma.iso, 2.8)
    assert mb.path == str(b) and mb.timestamp == "2025-03-01T21:00:40+00:00"
    assert mc == read_meta(c) and mc.pattern == "BGGR"


def _dng_with_active_area(path, full, pattern, area, black=(64, 64, 64, 64), white=4095):
    """Minimal DNG with an ActiveArea (tools/dng.py writes none)."""
    import tifffile

    codes = bytes("RGB".index(c) for c in pattern)
    tags = [
        (33421, 3, 2, (2, 2), True), (33422, 1, 4, codes, True),
        (50706, 1, 4, b"\x01\x04\x00\x00", True), (50708, 2, 0, "Test Cam", True),
        (50713, 3, 2, (2, 2), True), (50714, 4, 4, black, True), (50717, 4, 1, white, True),
        (50728, 5, 3, (1, 2, 1, 1, 2, 3), True),
        (50829, 4, 4, area, True),  # ActiveArea: top, left, bottom, right
    ]
    tifffile.imwrite(path, full, photometric="cfa", extratags=tags, metadata=None)


@pytest.mark.parametrize("top,left", [(0, 0), (1, 0), (0, 1), (1, 1), (3, 5)])
def test_dng_pattern_is_relative_to_visible_area(tmp_path, rng, top, left):
    # DNG: CFAPattern's origin is the ActiveArea's top-left. LibRaw may start the
    # visible area further in (it rounds odd margins up); whatever it does, the
    # reported pattern must describe data[0, 0] of what we return.
    full = _mosaic(rng, 53, 71)
    path = tmp_path / "area.dng"
    _dng_with_active_area(path, full, "RGGB", (top, left, top + 48, left + 64))
    f = read_frame(path)
    ot, ol = f.meta.extra["visible_origin"]
    h, w = f.data.shape
    assert ot >= top and ol >= left and ot + h <= top + 48 and ol + w <= left + 64
    assert h >= 46 and w >= 62
    assert np.array_equal(f.data, full[ot:ot + h, ol:ol + w])
    # colour map of the whole sensor per the DNG rule, read at the visible origin
    colours = np.array(list("RGGB")).reshape(2, 2)
    yy, xx = np.mgrid[0:53, 0:71]
    cmap = colours[(yy - top) % 2, (xx - left) % 2]
    expect = "".join(cmap[ot:ot + 2, ol:ol + 2].ravel())
    assert f.meta.pattern == expect


# ----------------------------------------------------------------------------- FITS


def _write_fits(path, data, **cards):
    from astropy.io import fits

    hdu = fits.PrimaryHDU(data=data)
    for k, v in cards.items():
        hdu.header[k.replace("_", "-") if k in ("CCD_TEMP", "DATE_OBS") else k] = v
    hdu.writeto(path)


def test_fits_uint16_bzero_round_trip(tmp_path, rng):
    from astropy.io import fits

    data = rng.integers(0, 65536, size=(40, 50), dtype=np.uint16)
    data[0, 0], data[1, 1] = 0, 65535
    path = tmp_path / "light.fits"
    _write_fits(path, data, BAYERPAT="RGGB", EXPTIME=120.0, GAIN=100, CCD_TEMP=-10.5,
                DATE_OBS="2024-05-06T01:02:03.5", IMAGETYP="Dark Frame", INSTRUME="ZWO ASI533MC Pro",
                FOCALLEN=400.0, XPIXSZ=3.76, OBJECT="M 42")
    hdr = fits.getheader(path)
    assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768  # really stored signed + offset
    f = read_frame(path)
    assert f.data.dtype == np.uint16 and np.array_equal(f.data, data)
    m = f.meta
    assert (m.format, m.shape, m.pattern) == ("fits", (40, 50), "RGGB")
    assert m.white_level == 65535.0 and m.black_level == (0.0,) * 4
    assert m.exposure_s == 120.0 and m.gain == 100.0 and m.temperature_c == -10.5
    assert m.timestamp == "2024-05-06T01:02:03.5"
    assert m.imagetyp == "dark" and m.camera == "ZWO ASI533MC Pro"
    assert m.focal_length_mm == 400.0
    assert m.extra["xpixsz"] == 3.76 and m.extra["object"] == "M 42"
    assert read_meta(path) == m


def test_fits_uint16_read_straight_from_the_file_gives_astropys_numbers(tmp_path, rng):
    """Unsigned 16-bit images are read from the file's bytes (top bit flipped), not through astropy's
    scaling: the same numbers for an image in an extension after an empty primary HDU, and for the
    first three planes of a 4-plane cube."""
    from astropy.io import fits

    mono = rng.integers(0, 65536, size=(33, 47), dtype=np.uint16)
    mono[0, :4] = (0, 1, 32767, 65535)
    p1 = tmp_path / "ext.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data=mono)]).writeto(p1)
    assert np.array_equal(read_frame(p1).data, np.asarray(fits.getdata(p1, ext=1)))
    cube = rng.integers(0, 65536, size=(4, 12, 10), dtype=np.uint16)
    p2 = tmp_path / "rgba.fits"
    fits.PrimaryHDU(data=cube).writeto(p2)
    f = read_frame(p2)
    assert f.data.dtype == np.uint16 and np.array_equal(f.data, cube[:3])


def test_fits_float_int16_and_black(tmp_path, rng):
    unit = rng.random((30, 20), dtype=np.float32)
    p1 = tmp_path / "unit.fit"
    _write_fits(p1, unit, EXPOSURE=5.0, BLKLEVEL=512)
    f = read_frame(p1)
    assert f.data.dtype == np.float32 and np.array_equal(f.data, unit)
    assert f.meta.white_level == 1.0 and f.meta.exposure_s == 5.0
    # BLKLEVEL is 16-bit ADU; the 0..1 data gets it on its own scale (else every black > white level 1)
    assert f.meta.black_level == (512.0 / 65535.0,) * 4 and f.meta.extra["black_level_adu"] == 512.0
    assert f.meta.pattern is None

    adu = (unit * 30000).astype(np.float64)
    p2 = tmp_path / "adu.fits"
    _write_fits(p2, adu, PEDESTAL=-100)
    f = read_frame(p2)
    assert f.data.dtype == np.float32 and np.array_equal(f.data, adu.astype(np.float32))
    assert f.meta.white_level == 65535.0 and f.meta.black_level == (100.0,) * 4
    assert read_meta(p2) == f.meta

    signed = rng.integers(-50, 3000, size=(10, 12)).astype(np.int16)
    p3 = tmp_path / "signed.fits"
    _write_fits(p3, signed)
    f = read_frame(p3)
    assert f.data.dtype == np.float32 and np.array_equal(f.data, signed.astype(np.float32))
    assert f.meta.white_level == 32767.0
    p4 = tmp_path / "positive.fits"
    _write_fits(p4, np.abs(signed))
    f = read_frame(p4)
    assert f.data.dtype == np.uint16 and np.array_equal(f.data, np.abs(signed).astype(np.uint16))


def test_fits_colour_cube(tmp_path, rng):
    cube = rng.random((3, 16, 24), dtype=np.float32)
    path = tmp_path / "rgb.fits"
    _write_fits(path, cube, BAYERPAT="RGGB")  # a leftover BAYERPAT must not make a cube CFA
    f = read_frame(path)
    assert f.data.shape == (3, 16, 24) and np.array_equal(f.data, cube)
    assert f.meta.pattern is None and not f.is_cfa and f.meta.shape == (3, 16, 24)


def _reference_pattern(bayerpat, height, roworder, xoff, yoff):
    """Brute force: colour of every top-down pixel, then read the stored data's 2x2 corner."""
    tile = np.array(list(bayerpat)).reshape(2, 2)
    yy, xx = np.mgrid[0:height, 0:6]
    topdown = tile[(yy + yoff) % 2, (xx + xoff) % 2]
    stored = topdown[::-1] if roworder == "BOTTOM-UP" else topdown
    return "".join(stored[:2, :2].ravel())


@pytest.mark.parametrize("roworder", [None, "TOP-DOWN", "BOTTOM-UP"])
@pytest.mark.parametrize("height", [8, 9])
@pytest.mark.parametrize("bayerpat,xoff,yoff", [("GRBG", 0, 0), ("RGGB", 1, 0), ("BGGR", 0, 1),
                                                 ("GBRG", 1, 1)])
def test_fits_roworder_and_offsets(tmp_path, roworder, height, bayerpat, xoff, yoff):
    cards = {"BAYERPAT": bayerpat, "XBAYROFF": xoff, "YBAYROFF": yoff}
    if roworder:
        cards["ROWORDER"] = roworder
    path = tmp_path / "cfa.fits"
    _write_fits(path, np.zeros((height, 6), dtype=np.uint16), **cards)
    expect = _reference_pattern(bayerpat, height, roworder, xoff, yoff)
    assert read_meta(path).pattern == expect
    if roworder == "BOTTOM-UP" and height % 2 == 0 and (xoff, yoff) == (0, 0):
        assert expect == "BGGR"  # GRBG seen upside down, the case Siril documents


# ----------------------------------------------------------------------------- TIFF, PNG, JPEG


def test_tiff_mono_rgb_float_cfa(tmp_path, rng):
    import tifffile

    mono = rng.integers(0, 65536, size=(20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "mono.tif", mono)
    f = read_frame(tmp_path / "mono.tif")
    assert f.data.dtype == np.uint16 and np.array_equal(f.data, mono)
    assert (f.meta.format, f.meta.shape, f.meta.pattern, f.meta.white_level) == ("tiff", (20, 30), None, 65535.0)

    rgb = rng.integers(0, 65536, size=(20, 30, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    f = read_frame(tmp_path / "rgb.tiff")
    assert f.data.shape == (3, 20, 30) and np.array_equal(f.data, np.moveaxis(rgb, -1, 0))
    assert read_meta(tmp_path / "rgb.tiff") == f.meta

    planar = rng.integers(0, 65536, size=(3, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    assert np.array_equal(read_frame(tmp_path / "planar.tif").data, planar)

    flt = rng.random((3, 10, 12), dtype=np.float32)
    tifffile.imwrite(tmp_path / "float.tif", np.moveaxis(flt, 0, -1), photometric="rgb")
    f = read_frame(tmp_path / "float.tif")
    assert f.data.dtype == np.float32 and np.array_equal(f.data, flt) and f.meta.white_level == 1.0

    cfa = rng.integers(0, 4096, size=(16, 16), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "cfa.tif", cfa, photometric="cfa",
                     extratags=[(33421, 3, 2, (2, 2), True), (33422, 1, 4, bytes([1, 2, 0, 1]), True)])
    f = read_frame(tmp_path / "cfa.tif")
    assert f.meta.pattern == "GBRG" and np.array_equal(f.data, cfa)


def test_png_and_jpeg(tmp_path, rng):
    from PIL import Image
    from PIL.TiffImagePlugin import IFDRational

    rgb = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    f = read_frame(tmp_path / "c.png")
    assert (f.meta.format, f.data.dtype, f.data.shape) == ("image", np.uint8, (3, 24, 32))
    assert np.array_equal(f.data, np.moveaxis(rgb, -1, 0)) and f.meta.white_level == 255.0

    grey = rgb[..., 0].copy()
    Image.fromarray(grey).save(tmp_path / "g.png")
    f = read_frame(tmp_path / "g.png")
    assert f.data.shape == (24, 32) and np.array_equal(f.data, grey)

    deep = rng.integers(0, 65536, size=(24, 32), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    f = read_frame(tmp_path / "d.png")
    assert f.data.dtype == np.uint16 and np.array_equal(f.data, deep) and f.meta.white_level == 65535.0

    # smooth colour ramps survive JPEG within a lossy tolerance
    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.stack([40 + 2 * xx, 60 + 2 * yy, 200 - xx - yy], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Apple", "iPhone 13 Pro"
    sub = exif.get_ifd(0x8769)
    sub[0x829A], sub[0x8827], sub[0x920A] = IFDRational(1, 3), 1600, IFDRational(57, 10)
    sub[0x9003] = "2024:08:12 23:45:01"
    Image.fromarray(smooth).save(tmp_path / "phone.jpg", quality=95, subsampling=0, exif=exif)
    f = read_frame(tmp_path / "phone.jpg")
    err = np.abs(f.data.astype(int) - np.moveaxis(smooth, -1, 0).astype(int))
    assert f.data.shape == (3, 48, 64) and err.mean() < 1.0 and err.max() <= 6
    m = f.meta
    assert m.exposure_s == pytest.approx(1 / 3) and m.iso == 1600.0 and m.focal_length_mm == pytest.approx(5.7)
    assert m.timestamp == "2024-08-12T23:45:01" and m.camera == "Apple iPhone 13 Pro"
    assert read_meta(tmp_path / "phone.jpg") == m


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_seestar_lights(realdata):
    files = sorted((realdata / "seestar-m94").glob("*/*.fit"))
    assert len(files) == 22
    for p in files:
        f = read_frame(p)
        m = f.meta
        assert f.data.shape == (1920, 1080) and f.data.dtype == np.uint16
        assert (m.pattern, m.exposure_s, m.gain, m.white_level) == ("GRBG", 10.0, 80.0, 65535.0)
        assert m.imagetyp == "light" and m.camera == "Seestar S50" and m.focal_length_mm == 250.0
    # first frame against its SOURCE.md row (max 23406 ADU, 25.125 C, DATE-OBS)
    first = read_frame(realdata / "seestar-m94/lights_session1/Light_M_94_10.0s_IRCUT_20250326-212046.fit")
    assert int(first.data.max()) == 23406
    assert first.meta.temperature_c == 25.125
    assert first.meta.timestamp == "2025-03-27T01:20:32.955368"


def _unpack_14bit_msb(buf: bytes, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: n * 14].reshape(n, 14)
    return (bits.astype(np.uint16) << np.arange(13, -1, -1, dtype=np.uint16)).sum(axis=1, dtype=np.uint16)


@pytest.mark.realdata
def test_real_550d_dng(realdata):
    import tifffile

    path = realdata / DNG_550D
    f = read_frame(path)
    m = f.meta
    assert f.data.shape == (1156, 1734) and f.data.dtype == np.uint16
    assert m.pattern == "RGGB"
    assert m.black_level == (2056.0,) * 4 and m.white_level == 15000.0
    assert m.camera == "Canon EOS Kiss X4"
    assert m.exposure_s is None and m.iso is None and m.timestamp is None  # Magic Lantern wrote zeros
    # Ground truth straight from the file: the 14-bit packed strip, cropped to ActiveArea,
    # and the WB implied by AsShotNeutral (multiplier = 1 / neutral, normalised to G).
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        top, left, bottom, right = page.tags["ActiveArea"].value
        neutral = page.tags["AsShotNeutral"].value
        (offset,), (count,) = page.dataoffsets, page.databytecounts
    with open(path, "rb") as fh:
        fh.seek(offset)
        strip = fh.read(count)
    h, w = page.shape
    full = _unpack_14bit_msb(strip, h * w).reshape(h, w)
    assert np.array_equal(f.data, full[top:bottom, left:right])
    assert (int(f.data.min()), int(f.data.max())) == (1958, 12128)  # SOURCE.md
    n_r, n_g, n_b = (a / b for a, b in zip(neutral[::2], neutral[1::2]))
    assert m.wb == pytest.approx((n_g / n_r, 1.0, n_g / n_b), rel=1e-5)
    assert m.wb == pytest.approx((2.477, 1.0, 1.6943), abs=1e-3)


# ----------------------------------------------------------------------------- bad files


def _expect_error(path, exc_type, *needles):
    for fn in (read_frame, read_meta):
        t0 = time.perf_counter()
        with pytest.raises(exc_type) as info:
            fn(path)
        elapsed = time.perf_counter() - t0
        assert elapsed < 5.0, f"{fn.__name__}({path}) took {elapsed:.1f} s"
        msg = str(info.value)
        assert Path(path).name in msg and "\n" not in msg
        for needle in needles:
            assert needle in msg.lower(), msg
    return msg


@pytest.mark.realdata
def test_truncated_real_dng(realdata, tmp_path):
    blob = (realdata / DNG_550D).read_bytes()
    cut = tmp_path / "colorchart_cut.dng"
    cut.write_bytes(blob[: int(len(blob) * 0.6)])
    _expect_error(cut, FrameReadError, "truncated raw file")


def test_bad_files(tmp_path, rng):
    path = tmp_path / "IMG_0001.dng"
    write_dng(path, _mosaic(rng, 128, 160), pattern="RGGB", black_level=(64,) * 4, white_level=4095)
    blob = path.read_bytes()
    for frac in (0.6, 0.95):
        cut = tmp_path / f"IMG_cut{int(frac * 100)}.dng"
        cut.write_bytes(blob[: int(len(blob) * frac)])
        _expect_error(cut, FrameReadError, "truncated raw file")
    header_only = tmp_path / "IMG_header.DNG"
    header_only.write_bytes(blob[:6])
    _expect_error(header_only, FrameReadError)

    empty = tmp_path / "IMG_0002.CR2"
    empty.write_bytes(b"")
    _expect_error(empty, FrameReadError, "empty")
    text = tmp_path / "IMG_0003.CR2"
    text.write_text("this is not a raw file\n" * 50)
    _expect_error(text, FrameReadError, "not a readable raw")
    _expect_error(tmp_path / "missing.dng", InputNotFound, "no such file")
    unknown = tmp_path / "frame.xyz"
    unknown.write_bytes(b"\x00" * 1000)
    _expect_error(unknown, FrameReadError, "unknown frame type")
    _expect_error(tmp_path, FrameReadError, "folder")

    fits_path = tmp_path / "cut.fits"
    _write_fits(fits_path, rng.integers(0, 65535, size=(100, 100), dtype=np.uint16))
    fblob = fits_path.read_bytes()
    fits_path.write_bytes(fblob[: len(fblob) // 2])
    _expect_error(fits_path, FrameReadError, "truncated fits file")

    from PIL import Image

    jpg = tmp_path / "cut.jpg"
    Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:300])
    with pytest.raises(FrameReadError, match="cut.jpg"):
        read_frame(jpg)


def test_truncated_cr3_and_raf_structure(tmp_path):
    # CR3 is ISO-BMFF: an 'mdat' box that claims more bytes than the file holds.
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"crx ", 1, b"crx ")
    mdat = struct.pack(">I4s", 10_000_000, b"mdat") + b"\x00" * 5000
    cr3 = tmp_path / "IMG_0004.CR3"
    cr3.write_bytes(ftyp + mdat)
    _expect_error(cr3, FrameReadError, "truncated raw file", "mdat")
    # RAF: the CFA section named in the header (offset 100/104) runs past the end.
    head = bytearray(b"FUJIFILMCCD-RAW 0201FF383501" + b"X-T4".ljust(32, b"\x00"))
    head += b"\x00" * (108 - len(head))
    head[84:92] = struct.pack(">II", 200, 100)
    head[100:108] = struct.pack(">II", 400, 9_000_000)
    raf = tmp_path / "DSCF0001.RAF"
    raf.write_bytes(bytes(head) + b"\x00" * 2000)
    _expect_error(raf, FrameReadError, "truncated raw file", "cfa")


def test_cr3_and_raf_camera_name_from_container(tmp_path):
    import io

    import tifffile

    from skystack.engine.rawfile import _probe_raw

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((2, 2), np.uint8), extratags=[(271, 2, 0, "Canon", True),
                                                               (272, 2, 0, "Canon EOS R6", True)])
    cmt1 = struct.pack(">I4s", 8 + len(buf.getvalue()), b"CMT1") + buf.getvalue()
    uuid = struct.pack(">I4s", 8 + 16 + len(cmt1), b"uuid") + b"\x85\xc0" * 8 + cmt1
    moov = struct.pack(">I4s", 8 + len(uuid), b"moov") + uuid
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"crx ", 1, b"crx ")
    mdat = struct.pack(">I4s", 8 + 64, b"mdat") + b"\x00" * 64
    cr3 = tmp_path / "IMG_0005.CR3"
    cr3.write_bytes(ftyp + moov + mdat)
    probe = _probe_raw(cr3, cr3.stat().st_size)
    assert probe.truncated is None and (probe.make, probe.model) == ("Canon", "Canon EOS R6")

    head = bytearray(b"FUJIFILMCCD-RAW 0201FF383501" + b"X-T4".ljust(32, b"\x00"))
    head += b"\x00" * (108 - len(head))
    head[100:108] = struct.pack(">II", 200, 100)
    raf = tmp_path / "DSCF0002.RAF"
    raf.write_bytes(bytes(head) + b"\x00" * 300)
    probe = _probe_raw(raf, raf.stat().st_size)
    assert probe.truncated is None and (probe.make, probe.model) == ("FUJIFILM", "X-T4")


def test_errors_are_skystack_errors():
    assert issubclass(FrameReadError, SkystackError) and issubclass(InputNotFound, SkystackError)


# ----------------------------------------------------------------------------- names and CLI


def test_frame_extensions(tmp_path):
    assert {".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".dng", ".fit", ".fits", ".tif",
            ".tiff", ".jpg", ".jpeg", ".png"} <= FRAME_EXTENSIONS
    assert all(s == s.lower() and s.startswith(".") for s in FRAME_EXTENSIONS)
    for name in ("IMG_0001.CR2", "a.dng", "Light_001.FIT", "m42.fits.gz", "x.TIFF", "p.jpeg"):
        assert is_frame_file(name), name
    for name in ("notes.txt", "._IMG_0001.CR2", "IMG_0001.xmp", "README"):
        assert not is_frame_file(name), name
    (tmp_path / "folder.fits").mkdir()
    assert not is_frame_file(tmp_path / "folder.fits")


def test_cli_info(tmp_path, rng, capsys):
    from skystack import cli

    path = tmp_path / "info.dng"
    write_dng(path, _mosaic(rng), pattern="GBRG", black_level=(10, 20, 30, 40), white_level=4095)
    assert cli.main(["info", "--json", "--quiet", str(path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    assert rows[0]["pattern"] == "GBRG" and rows[0]["shape"] == [64, 96]
    assert rows[0]["black_level"] == [10.0, 20.0, 30.0, 40.0]
    assert cli.main(["info", str(tmp_path / "missing.dng")]) == 2
    assert "missing.dng" in capsys.readouterr().err
