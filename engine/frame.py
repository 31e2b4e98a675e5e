"""In-memory frame types shared by every stage.

Conventions (used everywhere in skystack):

* A CFA pattern is a 4-letter string naming the colours of the 2x2 tile in
  row-major order: ``pattern[0]`` is pixel (y=0, x=0), ``pattern[1]`` is
  (0, 1), ``pattern[2]`` is (1, 0), ``pattern[3]`` is (1, 1); e.g. ``"RGGB"``.
* Per-channel black levels follow the same 2x2 order (4 values).
* Raw data is ``(H, W)`` (CFA mosaic or mono) or ``(3, H, W)`` (colour,
  channel-first, R, G, B). Camera RAW and 16-bit files stay ``uint16``; float
  files stay ``float32``.
* Calibrated data is float32 in normalised units: ``(adu - black) / (white - black)``.
* Pixel coordinates: ``(0, 0)`` is the centre of the top-left pixel, ``x`` runs
  right, ``y`` runs down. Transforms are 3x3 float64 matrices mapping a frame's
  ``(x, y, 1)`` to reference-frame pixels, in full-resolution sensor pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The four Bayer patterns skystack supports.
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


@dataclass(frozen=True, kw_only=True)
class FrameMeta:
    """Metadata of one frame, read without debayering.

    Attributes
    ----------
    path : str
        File the frame came from.
    format : str
        ``"raw"`` (rawpy), ``"fits"``, ``"tiff"`` or ``"image"`` (8-bit JPEG/PNG).
    shape : tuple of int
        Shape of :attr:`Frame.data`.
    pattern : str or None
        Bayer pattern (see module docstring); None for mono or colour data.
    black_level : tuple of 4 float
        Black level per 2x2 CFA position (all equal for mono).
    white_level : float
        Saturation level in ADU.
    wb : tuple of 3 float or None
        Camera white-balance multipliers (R, G, B), normalised to G = 1.
    exposure_s, iso, gain, temperature_c, focal_length_mm : float or None
        Acquisition settings where the file records them.
    timestamp : str or None
        ISO-8601 capture time.
    camera : str or None
        Camera make and model (or FITS ``INSTRUME``).
    imagetyp : str or None
        Frame type from the header (``light``, ``dark``...), lower case.
    extra : dict
        Other header values worth reporting (object, aperture, pixel size...).
    """

    path: str
    format: str
    shape: tuple[int, ...]
    pattern: str | None = None
    black_level: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    white_level: float = 65535.0
    wb: tuple[float, float, float] | None = None
    exposure_s: float | None = None
    iso: float | None = None
    gain: float | None = None
    temperature_c: float | None = None
    focal_length_mm: float | None = None
    timestamp: str | None = None
    camera: str | None = None
    imagetyp: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the metadata."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["shape"] = list(self.shape)
        d["black_level"] = list(self.black_level)
        d["wb"] = list(self.wb) if self.wb is not None else None
        return d


@dataclass(frozen=True, kw_only=True)
class Frame:
    """Raw sensor data plus its metadata."""

    data: np.ndarray
    meta: FrameMeta

    @property
    def is_cfa(self) -> bool:
        """True when :attr:`data` is a Bayer mosaic."""
        return self.meta.pattern is not None and self.data.ndim == 2
