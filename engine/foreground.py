"""Sky and landscape: find the still part of a fixed-tripod scene and stack it apart from the sky.

On a fixed tripod the stars move across the sensor while the ground does
not. Registering on the stars smears the landscape; stacking unregistered
trails the stars. So skystack stacks both: the landscape *unregistered*
(with rejection), the sky *registered*, and blends them along the horizon
with a feathered seam in the reference frame's geometry.

Detection (:func:`detect_foreground`) works on small, high-passed luminance
images of up to :data:`N_FRAMES` calibrated lights (block-averaged by
``bin``; a 24 MP frame is about 300 x 200):

1. two predictions of each small frame ``F_k``: the *static* one ``U``, the
   median of all small frames as recorded (what does not move), and the
   *sky* one ``S_k``, the median of all small frames registered on the stars
   (their transforms and the session's lens) mapped back into frame ``k``;
2. motion evidence ``E = mean_k (|F_k - S_k| - |F_k - U|) / noise_k``:
   positive where the static model explains the pixels better (tree tops,
   roofs, lit windows), negative where the stars' motion does (stars);
3. the star-bearing region: every sky star detected in every frame (static
   sources excluded), as a smoothed density on the sensor. Where it is close
   to zero while the rest of the frame has stars, something hides the sky;
4. the horizon ``y = b(x)`` with the landscape below it that minimises, over
   all columns at once, the motion evidence on the wrong side, the starless
   (or star-bearing) rows on the wrong side, minus a reward for lying on a
   strong edge of ``U`` (the silhouette), plus a price per row of jump
   between neighbouring columns: dynamic programming (Viterbi with an L1
   distance transform). A horizontal horizon moving sideways with the sky
   has no motion evidence of its own: the starless region finds it, the edge
   places it.

A session whose sky does not move across the sensor (a tracking mount) has
nothing to separate and is left alone; so is one where the detector finds
no still region (less than :data:`MIN_FRACTION` of the frame).

A user's mask (PNG, white or nonzero = landscape, the lights' size) replaces
detection (``--foreground MASK.png``), and ``--save-mask`` writes the one
found, so it can be corrected and passed back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from skystack.engine.errors import SkystackError
from skystack.engine.lens import RadialLens
from skystack.engine.match import transform_points
from skystack.engine.robust import mad_sigma, moving_median, nanmedian_last
from skystack.engine.workers import map_threads

#: Small frames used by the detector (spread over the session).
N_FRAMES = 12
#: Largest small-image size (pixels) the detector works on.
SMALL_PIXELS = 65_000
#: Sky motion (full-resolution px) below which there is nothing to separate.
MIN_MOTION_PX = 12.0
#: Smallest landscape, as a fraction of the frame.
MIN_FRACTION = 0.005
#: Largest star density below a horizon, relative to the sky's, that still counts as ground
#: (tripod nights: ~0; amplifier glow left by a session without darks: ~1).
MAX_STARS_BELOW = 0.25
#: Steps of the still image smaller than this (noise units) are not edges.
EDGE_FLOOR = 3.0
#: A horizon lies on an edge of the still image: median strength above the floor along it.
MIN_EDGE = 1.0


@dataclass(frozen=True, kw_only=True)
class Foreground:
    """The landscape of a session, in the reference frame's sensor pixels.

    Attributes
    ----------
    mask : ndarray (H, W) bool or None
        Landscape pixels; None when there is none.
    horizon : ndarray (W,) float or None
        Row of the horizon per column (the landscape is below), where detected.
    source : str
        ``"auto"``, ``"mask"`` or ``"none"``.
    message : str
        One line for the summary and the report.
    """

    mask: np.ndarray | None
    horizon: np.ndarray | None
    source: str
    message: str

    @property
    def found(self) -> bool:
        """True when there is a landscape to stack apart."""
        return self.mask is not None and bool(self.mask.any())


def none(message: str) -> Foreground:
    """No landscape, with the reason."""
    return Foreground(mask=None, horizon=None, source="none", message=message)


def block_mean(img, b: int):
    """``(H // b, W // b)`` float32 means of ``b x b`` blocks of a ``(H, W)`` or ``(C, H, W)`` image
    (channels averaged; NaN ignored; all-NaN blocks are NaN). Runs where the image is (NumPy or CuPy),
    so only the small result need cross to the host."""
    from skystack.engine.backend import array_module

    xp = array_module(img)
    if img.ndim == 3:
        img = img.mean(axis=0)
    h, w = img.shape[0] // b * b, img.shape[1] // b * b
    blocks = img[:h, :w].reshape(h // b, b, w // b, b)
    if xp is not np:
        with np.errstate(invalid="ignore"), _quiet():
            return xp.nanmean(blocks, axis=(1, 3)).astype(xp.float32)
    # NumPy's nanmean step by step (its numbers), without its "Mean of empty slice" warning: the
    # warnings filters of catch_warnings are one global state, which threads binning at once garble
    nan = np.isnan(blocks)
    tot = np.where(nan, np.float32(0.0), blocks).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.divide(tot, (~nan).sum(axis=(1, 3), dtype=np.intp), out=tot, casting="unsafe")


def small_frames(get, indices: list[int], b: int) -> dict[int, np.ndarray]:
    """``{i: block_mean(get(i), b)}`` on the host, the frames read on the cores.

    At most :data:`N_FRAMES` frames of at most :data:`SMALL_PIXELS` each cross
    from a device per session, whatever the frame count and size."""
    from skystack.engine.backend import to_host

    return dict(zip(indices, map_threads(lambda i: to_host(block_mean(get(i), b)), indices)))


class _quiet:
    """Silence NumPy's all-NaN RuntimeWarnings inside a block."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc) -> None:
        self._w.__exit__(*exc)


def small_bin(shape: tuple[int, int]) -> int:
    """Block size that brings a frame under :data:`SMALL_PIXELS` (at least 2)."""
    h, w = shape
    return max(2, int(math.ceil(math.sqrt(h * w / SMALL_PIXELS))))


def _highpass(img: np.ndarray) -> np.ndarray:
    fill = np.where(np.isfinite(img), img, np.nanmedian(img))
    return (img - moving_median(fill, 7)).astype(np.float32)


def _noise(img: np.ndarray) -> float:
    v = img[np.isfinite(img)]
    if v.size < 10:
        return 1.0
    return max(mad_sigma(v), 1e-12)


def _sample(small: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples of a small image at ``(N, 2)`` small-pixel positions (NaN outside)."""
    from scipy.ndimage import map_coordinates

    fin = np.isfinite(xy).all(axis=1)
    out = np.full(len(xy), np.nan, dtype=np.float32)
    if fin.any():
        filled = np.where(np.isfinite(small), small, 0.0)
        valid = map_coordinates(np.isfinite(small).astype(np.float32), [xy[fin, 1], xy[fin, 0]], order=0,
                                mode="constant", cval=0.0)
        vals = map_coordinates(filled, [xy[fin, 1], xy[fin, 0]], order=1, mode="constant", cval=np.nan)
        out[fin] = np.where(valid > 0.5, vals, np.nan)
    return out


def detect_foreground(small: dict[int, np.ndarray], transforms: dict[int, np.ndarray], shape: tuple[int, int],
                      b: int, *, lens: RadialLens | None = None, motion_px: float = 0.0,
                      star_xy: np.ndarray | None = None) -> Foreground:
    """Find the landscape (see the module docstring).

    Parameters
    ----------
    small : dict
        Frame index -> block-mean luminance ``(H // b, W // b)`` of the
        calibrated frame (sensor geometry); the reference frame among them.
    transforms : dict
        Frame index -> frame -> reference transform (ideal pixels with ``lens``).
    shape : tuple of int
        Full-resolution ``(H, W)``.
    b : int
        Block size of ``small``.
    lens : RadialLens, optional
    motion_px : float
        Largest sky motion over the frame, full-resolution px.
    star_xy : ndarray (N, 2), optional
        Sensor positions of the sky stars of all frames (static sources excluded).
    """
    if motion_px < MIN_MOTION_PX:
        return none(f"none: the sky moves at most {motion_px:.1f} px across the sensor (tracked), "
                    "nothing to separate")
    keys = [k for k in small if k in transforms]
    if len(keys) < 3:
        return none("none: too few frames to tell the landscape from the sky")
    hp = dict(zip(keys, map_threads(_highpass, [small[k] for k in keys])))
    hs, ws = next(iter(hp.values())).shape
    ev = _evidence(hp, {k: transforms[k] for k in keys}, (hs, ws), b, lens)
    absent = _absence(star_xy, (hs, ws), b) if star_xy is not None and len(star_xy) else np.zeros((hs, ws))
    still = nanmedian_last(np.stack([small[k] for k in keys], axis=-1))
    edges = _edges(still)
    bnd = horizon_dp(ev, absent=absent, edge=edges)
    rows_land = (hs - bnd).clip(0)
    on = np.flatnonzero((bnd > 0) & (bnd < hs))
    if rows_land.sum() < MIN_FRACTION * hs * ws or not on.size or np.median(edges[bnd[on], on]) < MIN_EDGE:
        return none("auto: no still landscape found (the whole scene moves with the stars)")
    horizon = _to_full(bnd, b, shape)
    mask = np.arange(shape[0])[:, None] >= horizon[None, :]
    frac = float(mask.mean())
    seen = _star_density_ratio(star_xy, mask)
    if seen > MAX_STARS_BELOW:
        return none(f"auto: no landscape (the still region below rows {horizon.min():.0f}-{min(horizon.max(), shape[0]):.0f} "
                    f"shows {100 * seen:.0f} % of the sky's star density: stars, not ground)")
    return Foreground(mask=mask, horizon=horizon, source="auto",
                      message=f"auto: landscape below a horizon at rows {horizon.min():.0f}-"
                              f"{min(horizon.max(), shape[0]):.0f} ({100 * frac:.0f} % of the frame), "
                              "stacked unregistered")


def _star_density_ratio(star_xy: np.ndarray | None, mask: np.ndarray, margin: int = 12) -> float:
    """Density of sky stars inside ``mask`` over their density outside (0 when it cannot be told).

    Uncorrected amplifier glow or a band of hot pixels is still in the sensor
    frame like a landscape, but stars keep passing through it; ground hides them.
    Stars within ``margin`` px of the frame's edge (where detection avoids) do not count.
    """
    if star_xy is None or len(star_xy) < 50:
        return 0.0
    h, w = mask.shape
    xy = np.asarray(star_xy, dtype=np.float64).reshape(-1, 2)
    inner = (xy[:, 0] >= margin) & (xy[:, 0] < w - margin) & (xy[:, 1] >= margin) & (xy[:, 1] < h - margin)
    ij = np.rint(xy[inner]).astype(int)
    below = mask[ij[:, 1], ij[:, 0]]
    area = np.zeros_like(mask)
    area[margin:h - margin, margin:w - margin] = True
    a_land, a_sky = float((mask & area).sum()), float((~mask & area).sum())
    if a_land < 1 or a_sky < 1 or not (~below).any():
        return 0.0
    return float(below.sum() / a_land) / float((~below).sum() / a_sky)


def _grid(hs: int, ws: int, b: int) -> np.ndarray:
    """Full-resolution positions ``(hs * ws, 2)`` of the small pixels' centres."""
    yy, xx = np.mgrid[0:hs, 0:ws]
    return np.column_stack([xx.ravel() * b + (b - 1) / 2.0, yy.ravel() * b + (b - 1) / 2.0]).astype(np.float64)


def _to_small(xy: np.ndarray, b: int) -> np.ndarray:
    return (xy - (b - 1) / 2.0) / b


def _evidence(hp: dict[int, np.ndarray], trans: dict[int, np.ndarray], small_shape: tuple[int, int], b: int,
              lens: RadialLens | None) -> np.ndarray:
    """Mean normalised evidence (static minus sky residuals) per small pixel, smoothed 3x3."""
    from scipy.ndimage import uniform_filter

    hs, ws = small_shape
    grid = _grid(hs, ws, b)
    ideal = grid if lens is None else lens.undistort(grid)  # reference ideal pixels of the small grid

    def on_reference(k: int) -> np.ndarray:  # frame k on the reference's ideal grid
        src = transform_points(np.linalg.inv(trans[k]), ideal)
        src = src if lens is None else lens.distort(src)
        return _sample(hp[k], _to_small(src, b)).reshape(hs, ws)

    # the frames' medians per pixel (numpy's nanmedian of 12 values goes through masked arrays: 3x the time)
    sky = nanmedian_last(np.stack(map_threads(on_reference, list(hp)), axis=-1))
    static = nanmedian_last(np.stack(list(hp.values()), axis=-1))

    def residual(k: int) -> np.ndarray:  # the sky prediction mapped back into frame k, against the still one
        q = transform_points(trans[k], ideal)
        q = q if lens is None else lens.distort(q)
        pred = _sample(sky, _to_small(q, b)).reshape(hs, ws)
        img = hp[k]
        return (np.abs(img - pred) - np.abs(img - static)) / _noise(img)

    acc = np.zeros((hs, ws), dtype=np.float64)
    cnt = np.zeros((hs, ws), dtype=np.float64)
    for d in map_threads(residual, list(hp)):  # the frames on the cores, summed in their order
        ok = np.isfinite(d)
        acc[ok] += d[ok]
        cnt[ok] += 1
    ev = np.where(cnt > 0, acc / np.maximum(cnt, 1), 0.0)
    return uniform_filter(ev, size=3, mode="nearest")


def _absence(star_xy: np.ndarray, small_shape: tuple[int, int], b: int) -> np.ndarray:
    """1 where no sky star was ever seen although the frame has them elsewhere, 0 where they are common.

    The density is smoothed over a scale that holds about 12 stars at the
    frame's mean density (at least 4 small pixels), normalised at the borders
    (no star is detected right at an edge, which is no evidence of anything).
    """
    from scipy.ndimage import gaussian_filter

    hs, ws = small_shape
    xy = _to_small(np.asarray(star_xy, dtype=np.float64).reshape(-1, 2), b)
    hist, _, _ = np.histogram2d(xy[:, 1], xy[:, 0], bins=(hs, ws), range=((-0.5, hs - 0.5), (-0.5, ws - 0.5)))
    rho = max(float(hist.sum()) / (hs * ws), 1e-9)
    sigma = max(4.0, math.sqrt(12.0 / (2.0 * math.pi * rho)))
    edge = max(1, int(round(8.0 / b)))  # detections avoid the outer ~8 px
    support = np.zeros((hs, ws))
    support[edge:hs - edge, edge:ws - edge] = 1.0
    dens = gaussian_filter(hist, sigma, mode="constant") / np.maximum(
        gaussian_filter(support, sigma, mode="constant"), 0.05)
    ref = float(np.percentile(dens, 75))
    if ref <= 0:
        return np.zeros((hs, ws))
    return np.clip(1.0 - dens / (0.1 * ref), 0.0, 1.0)


def _edges(still: np.ndarray) -> np.ndarray:
    """Strength (noise units, at most 10) of the edge between rows ``y - 1`` and ``y`` of the still image.

    The first :data:`EDGE_FLOOR` units are taken off: a noise-sized step is no edge.
    """
    d = np.abs(np.diff(np.nan_to_num(still), axis=0)) / _noise(_highpass(still))
    out = np.zeros((still.shape[0] + 1, still.shape[1]))
    out[1:-1] = np.clip(d - EDGE_FLOOR, 0.0, 10.0)
    return out


def horizon_dp(ev: np.ndarray, *, absent: np.ndarray | None = None, edge: np.ndarray | None = None,
               tau: float = 0.3, region_cost: float = 0.5, edge_reward: float = 3.0,
               jump_cost: float = 0.5) -> np.ndarray:
    """Per column the first landscape row ``b(x)`` (``H``: none), minimising the cost of the module docstring.

    Parameters
    ----------
    ev : ndarray (H, W)
        Motion evidence: positive = still (landscape), negative = moving (sky).
    absent : ndarray (H, W), optional
        Star absence in [0, 1] (1 = no sky star ever seen there).
    edge : ndarray (H + 1, W), optional
        Edge strength between rows ``b - 1`` and ``b`` of the still image.
    tau : float
        Motion evidence below this magnitude counts as none.
    region_cost : float
        Price per row of a starless row called sky or a star-bearing row called landscape.
    edge_reward : float
        Reward per unit of edge strength for a horizon on that edge.
    jump_cost : float
        Price per row of difference between neighbouring columns' horizons.
    """
    h, w = ev.shape
    a = np.zeros((h, w)) if absent is None else absent
    pos = np.maximum(ev - tau, 0.0) + region_cost * a  # cost of a landscape-looking row called sky
    neg = np.maximum(-ev - tau, 0.0) + region_cost * (1.0 - a)  # cost of a sky row called landscape
    zero = np.zeros((1, w))
    above = np.concatenate([zero, np.cumsum(pos, axis=0)])  # rows < b are sky
    below = np.concatenate([np.cumsum(neg[::-1], axis=0)[::-1], zero])  # rows >= b are landscape
    cost = above + below
    if edge is not None:
        cost = cost - edge_reward * edge
    acc = cost[:, 0].copy()
    back = np.zeros((h + 1, w), dtype=np.int64)
    for x in range(1, w):
        prev, arg = _l1_transform(acc, jump_cost)
        back[:, x] = arg
        acc = prev + cost[:, x]
    out = np.zeros(w, dtype=np.int64)
    out[-1] = int(np.argmin(acc))
    for x in range(w - 1, 0, -1):
        out[x - 1] = back[out[x], x]
    return out


def _l1_transform(f: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``g[i] = min_j f[j] + lam |i - j|`` and its argmin (two passes)."""
    n = len(f)
    g = f.copy()
    arg = np.arange(n)
    for i in range(1, n):
        if g[i - 1] + lam < g[i]:
            g[i], arg[i] = g[i - 1] + lam, arg[i - 1]
    for i in range(n - 2, -1, -1):
        if g[i + 1] + lam < g[i]:
            g[i], arg[i] = g[i + 1] + lam, arg[i + 1]
    return g, arg


def _to_full(bnd: np.ndarray, b: int, shape: tuple[int, int]) -> np.ndarray:
    """Small-grid horizon rows -> full-resolution rows per column (top edge of the first landscape block)."""
    h, w = shape
    xs_small = np.arange(len(bnd)) * b + (b - 1) / 2.0
    rows = np.where(bnd * b >= (h // b) * b, float(h), bnd * b - 0.5)
    return np.interp(np.arange(w), xs_small, rows)


def load_mask(path: str | Path, shape: tuple[int, int]) -> Foreground:
    """A user's landscape mask: PNG/TIFF, nonzero = landscape, the lights' ``(H, W)``."""
    from PIL import Image

    p = Path(path)
    try:
        with Image.open(p) as im:
            m = np.asarray(im.convert("L")) > 127
    except (OSError, ValueError) as exc:
        raise SkystackError(f"{p}: cannot read the foreground mask ({exc}); pass a PNG, white = landscape") from None
    if m.shape != tuple(shape):
        raise SkystackError(f"{p}: mask is {m.shape[1]}x{m.shape[0]} but the lights are {shape[1]}x{shape[0]}; "
                            "draw it on a light of this session")
    return Foreground(mask=m, horizon=None, source="mask",
                      message=f"mask {p.name}: {100 * m.mean():.0f} % of the frame stacked unregistered")


def save_mask(path: str | Path, fg: Foreground, shape: tuple[int, int], inputs=()) -> Path:
    """Write the landscape mask as an 8-bit PNG (white = landscape), atomically."""
    from skystack.engine.output import write_preview

    m = fg.mask if fg.mask is not None else np.zeros(shape, dtype=bool)
    return write_preview(path, m.astype(np.float32), inputs=inputs)


def blend_weight(mask: np.ndarray, margin: float, feather: float) -> np.ndarray:
    """Landscape weight (H, W) float32: 1 inside the mask and up to ``margin`` px from it, 0 beyond
    ``margin + feather``, linear between (distance to the mask)."""
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(~mask)
    return np.clip((margin + feather - d) / max(feather, 1e-6), 0.0, 1.0).astype(np.float32)


def sky_exclusion(mask: np.ndarray, margin: float) -> np.ndarray:
    """Pixels of a frame kept out of the sky stack: the landscape and ``margin`` px around it."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask) <= margin

