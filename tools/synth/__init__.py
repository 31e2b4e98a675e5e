"""Synthetic night simulator: a fixed-tripod session with exact ground truth.

:func:`simulate` writes a whole session (lights, bias, darks, flats, dark
flats as DNG or FITS) plus ``truth.json``/``truth.npz``; :func:`load_truth`
(or :func:`build_truth` for a config, without any file) returns a
:class:`SynthTruth` that re-renders every noise-free component exactly as the
writer used it. Everything is a pure function of :class:`SynthConfig` (seeded
``numpy`` generators, one independent stream per component and per frame).

Sensor model (per pixel ``(y, x)`` of CFA colour ``c``; ADU = raw 14-bit DN)::

    raw = clip(rint(bias(y, x) + band_f(y)
                    + [N_e + read_e * z] / gain), 0, white)
    N_e ~ Poisson(gain * (flat(y, x) * S(y, x) + dark(y, x; t, T)))

* ``bias`` -- :meth:`SynthTruth.bias_pattern`: black level of the 2x2 CFA
  position + fixed column and row patterns (ADU). ``band_f`` is a per-frame,
  zero-mean row banding (``bias_row_noise_adu``); ``z ~ N(0, 1)``.
* ``dark`` -- :meth:`SynthTruth.dark_signal` (ADU above bias): dark current
  ``t * 2**((T - T_ref)/doubling) * (rate * DSNU + hot + amp glow) / gain``.
* ``flat`` -- :meth:`SynthTruth.flat_field` (dimensionless, 1 = perfect):
  vignetting (cos^4 law, 1 at the optical centre) x per-channel CFA response
  (G = 1) x PRNU x dust shadows x cold/dead-pixel response.
* ``S`` -- :meth:`SynthTruth.sky`: the noise-free sky in ADU *as the pixel would
  record it through a perfect flat* (flat = 1: no vignetting, no PRNU, CFA
  response 1), for the frame's exposure: uniform sky background x cloud glow +
  light-pollution gradient + stars (point-sampled Moffat stamps) + trails.
  Flats use ``S = flat_level * flat_color[c] * level_scale``; bias and darks
  ``S = 0``.
* Shot noise is exact Poisson for ``lambda < poisson_threshold_e`` electrons
  and the normal approximation above it, drawn together with the read noise
  as ``lambda + sqrt(lambda + read_e^2) z`` (``poisson_threshold_e = 0``:
  normal approximation everywhere, the fastest setting for big sessions).
* Everything is computed in float32 like the writer does; the float64 arrays
  the truth methods return are those float32 values.

Geometry (fixed tripod): every light is the reference sky rotated about the
celestial pole ``P`` (a point in reference pixels, outside the frame by
default) by ``phi_i = omega * (t_mid_i - t_mid_ref)`` (sidereal rate; the
northern sky turns counter-clockwise on the displayed image), plus a small
drift/jitter ``d_i``::

    sensor_i = P + R(phi_i) (ref - P) + d_i,   R(phi) = [[cos, -sin], [sin, cos]]

The truth transform of light ``i`` is the inverse (frame pixel -> reference
pixel, the convention of :mod:`skystack.engine.frame`: (0, 0) is the centre
of the top-left pixel). The light at ``reference_index`` has the identity.
Stars trail during an exposure; each star is rendered as a Moffat elongated
along its own trail (second moments of the trail matched), centred on its
mid-exposure position, so star centroids follow the transforms exactly.

Modules: :mod:`.config` (:class:`SynthConfig`, random streams), :mod:`.records`
(truth records, calibration frames), :mod:`.specials` (trails, clouds,
shake), :mod:`.camera` (bias, dark current, defects, noise), :mod:`.optics`
(vignetting, flat field), :mod:`.sky` (gradient, clouds, trails),
:mod:`.stamps` (Moffat stamps), :mod:`.truth` (:class:`SynthTruth`) and
:mod:`.session` (writing and loading a session). This package re-exports the
public API; the fixed-tripod scene is :mod:`skystack.tools.synth_scene`.
"""

from skystack.tools.synth.config import SynthConfig
from skystack.tools.synth.records import CalibTruth, LightTruth, TrueStars
from skystack.tools.synth.session import load_truth, simulate
from skystack.tools.synth.stamps import moffat_alpha
from skystack.tools.synth.truth import SynthTruth, build_truth

__all__ = [
    "SynthConfig",
    "SynthTruth",
    "LightTruth",
    "CalibTruth",
    "TrueStars",
    "simulate",
    "build_truth",
    "load_truth",
    "moffat_alpha",
]
