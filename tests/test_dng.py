"""DNG writer: rawpy/LibRaw must read back exactly what was written."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import rawpy
import tifffile

from skystack.tools.dng import write_dng
from skystack.engine.errors import OutputError, SkystackError
from skystack.engine.frame import BAYER_PATTERNS

BLACK = (2046, 2048, 2049, 2051)  # all different, so a wrong 2x2 order shows
EXIF = {
    "exposure_s": 20.0, "iso": 1600, "focal_length_mm": 24.0, "f_number": 2.8,
    "timestamp": "2025-03-01T21:00:05Z", "make": "Skystack", "model": "SynthCam 14", "temperature_c": 15.5,
}


def _mosaic(rng, h=120, w=162):
    return rng.integers(0, 16384, size=(h, w), dtype=np.uint16)


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_rawpy_reads_back_bit_exact(tmp_path, rng, pattern):
    cfa = _mosaic(rng)
    cfa[0, 0], cfa[-1, -1] = 0, 16383  # extremes survive
    path = tmp_path / f"x_{pattern}.dng"
    write_dng(path, cfa, pattern=pattern, black_level=BLACK, white_level=16383, wb=(2.0, 1.0, 1.5), exif=EXIF)
    with rawpy.imread(str(path)) as raw:
        assert raw.raw_image_visible.shape == cfa.shape
        assert raw.raw_image_visible.dtype == np.uint16
        np.testing.assert_array_equal(raw.raw_image_visible, cfa)
        assert raw.white_level == 16383
        assert raw.color_desc == b"RGBG"
        letters = "RGBG"
        pat = raw.raw_pattern
        got = "".join(letters[pat[i, j]] for i in (0, 1) for j in (0, 1))
        assert got == pattern
        # black level of each 2x2 position, looked up through LibRaw's colour index
        per_pos = [raw.black_level_per_channel[pat[i, j]] for i in (0, 1) for j in (0, 1)]
        assert per_pos == list(BLACK)
        assert raw.camera_whitebalance[:3] == pytest.approx([2.0, 1.0, 1.5], rel=1e-6)
        other = raw.other
        assert other.iso_speed == 1600
        assert other.shutter_speed == pytest.approx(20.0)
        assert other.focal_length == pytest.approx(24.0)


def test_tags_and_exif_for_tifffile(tmp_path, rng):
    cfa = _mosaic(rng)
    path = tmp_path / "t.dng"
    write_dng(path, cfa, pattern="GRBG", black_level=BLACK, white_level=16383, exif=EXIF)
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == 1
        page = tf.pages[0]
        tags = page.tags
        assert tags["NewSubfileType"].value == 0  # not a thumbnail
        assert tags["PhotometricInterpretation"].value == 32803
        assert tags["CFARepeatPatternDim"].value == (2, 2)
        assert bytes(tags["CFAPattern"].value) == bytes([1, 0, 2, 1])
        assert bytes(tags["DNGVersion"].value) == bytes([1, 4, 0, 0])
        assert tags["BlackLevelRepeatDim"].value == (2, 2)
        assert tuple(tags["BlackLevel"].value) == BLACK
        assert tags["WhiteLevel"].value == 16383
        assert tags["Make"].value == "Skystack"
        assert tags["Model"].value == "SynthCam 14"
        assert tags["UniqueCameraModel"].value == "Skystack SynthCam 14"
        cm = np.array(tags["ColorMatrix1"].value, dtype=float).reshape(9, 2)
        assert cm[0, 0] / cm[0, 1] == pytest.approx(0.6941)
        exif = tags["ExifTag"].value
        for d in (exif, {t.name: t.value for t in tags.values()}):  # sub-IFD and IFD0 copies
            assert d["ExposureTime"] == (20, 1)
            assert d["ISOSpeedRatings"] == 1600
            assert d["FocalLength"] == (24, 1)
            assert d["DateTimeOriginal"] == "2025:03:01 21:00:05"
            assert d["Temperature"] == (1550, 100)
        assert exif["FNumber"] == (14, 5)
        np.testing.assert_array_equal(page.asarray(), cfa)


def test_fractional_exposure_and_datetime(tmp_path, rng):
    path = tmp_path / "b.dng"
    ts = dt.datetime(2025, 3, 1, 23, 30, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    write_dng(path, _mosaic(rng), pattern="RGGB", black_level=BLACK, white_level=16383,
              exif={"exposure_s": 1 / 4000, "timestamp": ts})
    with tifffile.TiffFile(path) as tf:
        exif = tf.pages[0].tags["ExifTag"].value
    assert exif["ExposureTime"] == (1, 4000)
    assert exif["DateTimeOriginal"] == "2025:03:01 21:30:00"  # converted to UTC
    with rawpy.imread(str(path)) as raw:
        assert raw.other.shutter_speed == pytest.approx(1 / 4000)


def test_atomic_replace_and_no_leftovers(tmp_path, rng):
    path = tmp_path / "a.dng"
    path.write_bytes(b"old")
    cfa = _mosaic(rng)
    write_dng(path, cfa, pattern="BGGR", black_level=BLACK, white_level=16383)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dng"]
    with rawpy.imread(str(path)) as raw:
        np.testing.assert_array_equal(raw.raw_image_visible, cfa)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cfa": np.zeros((10, 10), np.float32)},
        {"cfa": np.zeros((2, 10, 10), np.uint16)},
        {"pattern": "RGBG"},
        {"black_level": (1, 2, 3)},
        {"black_level": (0, 0, 0, 20000)},
        {"white_level": 70000},
        {"exif": {"timestamp": "yesterday"}},
    ],
)
def test_bad_input_raises_skystack_error(tmp_path, kwargs):
    args = {"cfa": np.zeros((10, 10), np.uint16), "pattern": "RGGB", "black_level": BLACK, "white_level": 16383}
    args.update(kwargs)
    cfa = args.pop("cfa")
    with pytest.raises(OutputError) as exc:
        write_dng(tmp_path / "bad.dng", cfa, **args)
    assert isinstance(exc.value, SkystackError)
    assert "bad.dng" in str(exc.value)
    assert not any(tmp_path.iterdir())
