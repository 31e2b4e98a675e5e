"""Session registration: one reference, one transform model and one lens for every light.

:func:`register_frames` turns per-frame star lists into frame -> reference
transforms, for any session from a tracked telescope to a phone on a tripod
for an hour:

1. **Provisional matches.** Every frame is matched to a provisional reference
   (the best-scoring frame, or ``--reference``), in time order: refined from
   the last matched frame's transform (:func:`~skystack.engine.match.refine_from`)
   when that holds at least half as many stars, otherwise by
   :func:`~skystack.engine.match.match_stars` (triangles, RANSAC, homography
   refinement).
2. **Sky stars only.** A source found at the same *sensor* position in other
   frames although the sky moved there by more than a few pixels does not
   move with the stars: a lit window, a lamp, a hot pixel, landscape texture.
   Such static sources are removed from every list (and reported).
3. **Reference from the majority, in the middle.** Each frame's pose (where
   its centre lands, its rotation) is known from step 1. The medoid pose
   (smallest summed pose distance to all frames) is the middle of a drifting
   session and lies inside the majority when a few frames are rotated; the
   reference is the best-scoring frame within 2 % of the frame diagonal of
   the medoid. A session that hardly moves keeps the best-scoring frame.
4. **Chaining.** A frame that does not match the reference directly (too
   little overlap after an hour of drift) is matched to its nearest
   registered neighbours in time and composed, then refined directly
   against the reference from that guess.
5. **Model by validated residuals** (``model="auto"``). On up to
   :data:`N_VALIDATE` frames (the ones that moved most) the matched pairs are
   split in two halves; each model is fitted on one half and measured on
   the other (2-fold cross-validation, RMS in reference pixels). The
   simplest model within 5 % (+ 0.002 px) of the best held-out RMS wins:
   similarity < affine < homography < homography + radial lens. The lens
   (:class:`~skystack.engine.lens.RadialLens`) is one model for the whole
   night, fitted jointly over those frames (variable projection: for given
   ``k1, k2`` every frame's homography is a least-squares fit in ideal
   pixels; ``k1, k2`` minimise the reprojection error of all of them).
6. **Final transforms.** Without a lens: each frame refined against the
   reference with the chosen model from its provisional transform (the
   matcher's result from a guess; :func:`match_stars` when that fails).
   With a lens: homographies refined in ideal pixels; the warp applies the lens
   (:func:`skystack.engine.warp.warp`, ``lens=``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from skystack.engine.errors import RegistrationError
from skystack.engine.lens import RadialLens
from skystack.engine.neighbours import PointIndex
from skystack.engine.match import (ERR_FLOOR_PX, MatchConfig, estimate_transform, match_stars, refine_from,
                                   transform_points)

#: Transform models, simplest first ("auto" picks one by held-out residuals).
MODELS = ("similarity", "affine", "homography", "homography+radial")
#: The reference is the best-scoring frame within this fraction of the frame diagonal of the medoid pose.
NEAR_MEDOID = 0.02
#: Frames used to choose the model and fit the lens.
N_VALIDATE = 10
#: A source is static when found at the same sensor position (px) ...
STATIC_TOL_PX = 1.5
#: ... in frames where the sky moved by more than this there (px).
STATIC_MOTION_PX = 4.0


@dataclass(kw_only=True)
class SessionRegistration:
    """Outcome of :func:`register_frames`.

    Attributes
    ----------
    ref : int
        Reference frame (a key of the star lists).
    transforms : dict
        Frame -> reference transform (3x3) of every registered frame; in ideal
        (undistorted) pixels when :attr:`lens` is set.
    residuals : dict
        RMS of matched stars per frame, reference px.
    failures : dict
        Frame -> reason, for frames that could not be registered.
    model : str
        Model used (one of :data:`MODELS`).
    lens : RadialLens or None
        The session's lens when the model has one.
    heldout_rms : dict
        Held-out RMS (px) of each model tried (``model="auto"`` only).
    chained : list of int
        Frames registered through a neighbour.
    static : dict
        Frame -> ``(K, 2)`` sensor positions of its static sources.
    sky_stars : dict
        Frame -> ``(N, 2)`` sensor positions of its other (sky) sources.
    motion_px : float
        Largest displacement of the sky over the frame, relative to the reference, px.
    reference_reason : str
        Why this reference.
    """

    ref: int
    transforms: dict[int, np.ndarray]
    residuals: dict[int, float]
    failures: dict[int, str]
    model: str
    lens: RadialLens | None = None
    heldout_rms: dict[str, float] = field(default_factory=dict)
    chained: list[int] = field(default_factory=list)
    static: dict[int, np.ndarray] = field(default_factory=dict)
    motion_px: float = 0.0
    reference_reason: str = ""
    sky_stars: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class _Stars:
    """Positions and 1-sigma errors of one frame's stars (brightest first); a star list the matcher takes."""

    xy: np.ndarray
    pos_err: np.ndarray


def _as_stars(st: Any) -> _Stars:
    xy = np.asarray(st.xy, dtype=np.float64).reshape(-1, 2)
    err = np.asarray(getattr(st, "pos_err", np.full(len(xy), 0.1)), dtype=np.float64)
    return _Stars(xy, np.where(np.isfinite(err), err, 1.0))


def register_frames(stars: dict[int, Any], scores: dict[int, float], shape: tuple[int, int], *,
                    model: str = "auto", provisional: int, fixed_reference: bool = False,
                    on_frame: Callable[[], None] | None = None,
                    timed: Callable[[str], Any] | None = None) -> SessionRegistration:
    """Register every frame of a session (see the module docstring).

    Parameters
    ----------
    stars : dict
        Frame index -> :class:`~skystack.engine.detect.StarList` (or anything
        with ``xy`` and ``pos_err``), in full-resolution sensor pixels.
    scores : dict
        Frame index -> quality score (higher is better).
    shape : tuple of int
        ``(H, W)`` of the frames.
    model : str
        ``"auto"`` or one of :data:`MODELS`.
    provisional : int
        First reference (the best-scoring frame, or the user's ``--reference``).
    fixed_reference : bool
        Keep ``provisional`` as the reference (``--reference`` given).
    on_frame : callable, optional
        Called once per frame as its final transform is settled (progress).
    timed : callable, optional
        ``timed(name)``: a context manager timing the frames' matches and final transforms as
        ``"register"``, and the model's choice and the lens (steps 5: at most :data:`N_VALIDATE`
        frames, a step per session) as ``"model"``.

    Returns
    -------
    SessionRegistration
    """
    if model != "auto" and model not in MODELS:
        raise ValueError(f"unknown transform model {model!r}; choose auto or one of {', '.join(MODELS)}")
    time = timed or (lambda name: contextlib.nullcontext())
    with time("register"):
        lists = {i: _as_stars(s) for i, s in stars.items()}
        hcfg = MatchConfig(model="homography")
        trans, fails = _match_all(lists, provisional, hcfg)
        static = _flag_static(lists, trans, provisional)
        if any(m.any() for m in static.values()):
            lists = {i: _Stars(s.xy[~static[i]], s.pos_err[~static[i]]) for i, s in lists.items()}
            trans, fails = _match_all(lists, provisional, hcfg)
        ref, reason = provisional, "--reference" if fixed_reference else "best-scoring frame"
        if not fixed_reference:
            ref, reason = _choose_reference(trans, scores, shape, provisional)
        if ref != provisional:
            inv = np.linalg.inv(trans[ref])
            trans = {i: _norm(inv @ t) for i, t in trans.items()}
            trans[ref] = np.eye(3)
        chained = _chain(lists, trans, fails, ref, hcfg)
    with time("model"):
        model, lens, heldout = _choose_model_and_lens(lists, trans, ref, shape, model)
    with time("register"):
        reg = SessionRegistration(ref=ref, transforms={}, residuals={}, failures=dict(fails), model=model,
                                  heldout_rms=heldout, chained=chained, motion_px=_max_motion(trans, shape),
                                  reference_reason=reason,
                                  static={i: stars[i].xy[m] if hasattr(stars[i], "xy") else np.zeros((0, 2))
                                          for i, m in static.items() if m.any()},
                                  sky_stars={i: s.xy for i, s in lists.items()})
        tick = on_frame or (lambda: None)
        if model == "homography+radial" and lens is not None and not lens.is_identity:
            reg.lens = lens
            _final_with_lens(reg, lists, trans, lens, tick)
        else:
            reg.model = "homography" if model == "homography+radial" else model
            _final_plain(reg, lists, trans, chained, tick)
        for _ in fails:  # frames that never registered are done too
            tick()
    return reg


def _choose_model_and_lens(lists: dict[int, _Stars], trans: dict[int, np.ndarray], ref: int,
                           shape: tuple[int, int], model: str) -> tuple[str, RadialLens | None, dict[str, float]]:
    """Step 5: ``(model, lens, held-out RMS per model)`` from the validation frames' matched pairs
    (``model`` as given unless "auto"; the lens for "auto" and "homography+radial")."""
    heldout: dict[str, float] = {}
    lens = None
    if model in ("auto", "homography+radial"):
        pairs = _pairs(lists, trans, ref, _validation_frames(trans, ref, shape))
        lens = fit_lens(pairs, shape) if pairs else None
        if lens is not None:
            pairs = _pairs(lists, trans, ref, [p[3] for p in pairs], lens=lens)
        if model == "auto":
            heldout = {m: heldout_rms(m, pairs, shape) for m in MODELS} if pairs else {}
            model = choose_model(heldout) if heldout else "similarity"
    return model, lens, heldout


def _norm(t: np.ndarray) -> np.ndarray:
    return t / t[2, 2] if abs(t[2, 2]) > 1e-12 else t


#: A frame refined from its predecessor's transform keeps the result when at least this fraction
#: of the predecessor's agreeing stars agree (else it is matched from scratch).
NEIGHBOUR_AGREEMENT = 0.5


def _match_all(lists: dict[int, _Stars], ref: int, cfg: MatchConfig) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Match every frame to ``ref``; return transforms and failure reasons.

    Frames go in index (time) order. Neighbours in time see nearly the same sky,
    so each frame is first refined from the last matched frame's transform
    (no triangle search) and keeps that result when at least
    :data:`NEIGHBOUR_AGREEMENT` as many stars agree as agreed for that frame;
    otherwise (the first frame, a dither jump, clouds) it is matched from scratch.
    """
    trans: dict[int, np.ndarray] = {ref: np.eye(3)}
    fails: dict[int, str] = {}
    r = lists[ref]
    guess, agreed = None, 0
    for i in sorted(lists):
        if i == ref:
            continue
        s = lists[i]
        res = None
        if guess is not None:
            try:
                res = refine_from(guess, s, r, config=cfg)
            except RegistrationError:
                res = None
            if res is not None and res.src_idx.size < max(cfg.min_inliers, NEIGHBOUR_AGREEMENT * agreed):
                res = None
        try:
            res = res if res is not None else match_stars(s, r, config=cfg)
        except RegistrationError as exc:
            fails[i] = str(exc)
            continue
        trans[i], guess, agreed = res.transform, res.transform, int(res.src_idx.size)
    return trans, fails


def _spread(items: list[int], k: int) -> list[int]:
    """Up to ``k`` items evenly spread over ``items`` (in order)."""
    if len(items) <= k:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[j] for j in idx]


def _flag_static(lists: dict[int, _Stars], trans: dict[int, np.ndarray], ref: int) -> dict[int, np.ndarray]:
    """Per frame, a bool mask of sources that stay put on the sensor while the sky moves."""
    reg = sorted(trans)
    sample = [j for j in _spread(reg, 9) if len(lists[j].xy)]
    # the sample frames' sources in one index, each labelled with its frame's place in the sample
    index = PointIndex(np.concatenate([lists[j].xy for j in sample]) if sample else np.zeros((0, 2)))
    label = np.repeat(np.arange(len(sample)), [len(lists[j].xy) for j in sample])
    out = {i: np.zeros(len(s.xy), dtype=bool) for i, s in lists.items()}
    for i in reg:
        p = lists[i].xy
        if not len(p):
            continue
        near = np.zeros((len(sample), len(p)), dtype=bool)  # a source of frame j within the tolerance
        qi, pj = index.pairs_within(p, STATIC_TOL_PX)
        near[label[pj], qi] = True
        found = np.zeros(len(p), dtype=int)
        moved = np.zeros(len(p), dtype=int)
        for k, j in enumerate(sample):
            if j == i:
                continue
            q = transform_points(np.linalg.inv(trans[j]) @ trans[i], p)  # where the sky of p is in frame j
            mv = np.hypot(*(q - p).T) > STATIC_MOTION_PX
            moved += mv
            found += mv & near[k]
        out[i] = (moved >= 2) & (found >= np.maximum(2, 0.5 * moved))
    return out


def _pose(t: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    h, w = shape
    c = transform_points(t, np.array([[(w - 1) / 2.0, (h - 1) / 2.0]]))[0]
    a = t[:2, :2]
    return c, math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1])


def _choose_reference(trans: dict[int, np.ndarray], scores: dict[int, float], shape: tuple[int, int],
                      provisional: int) -> tuple[int, str]:
    """The best-scoring frame near the medoid pose (see the module docstring)."""
    idx = sorted(trans)
    if len(idx) < 3:
        return provisional, "best-scoring frame"
    poses = [_pose(trans[i], shape) for i in idx]
    c = np.array([p[0] for p in poses])
    ang = np.unwrap(np.array([p[1] for p in poses]))
    radius = 0.5 * math.hypot(*shape)
    d = np.hypot(c[:, None, 0] - c[None, :, 0], c[:, None, 1] - c[None, :, 1])
    d += radius * np.abs(ang[:, None] - ang[None, :])
    med = int(np.argmin(d.sum(axis=0)))
    near = [idx[k] for k in np.flatnonzero(d[med] <= NEAR_MEDOID * 2 * radius)]
    best = max(near, key=lambda i: (scores.get(i, 0.0), -i))
    if best == provisional:
        return best, "best-scoring frame"
    return best, "best-scoring frame near the middle of the session's motion (majority pose)"


def _chain(lists: dict[int, _Stars], trans: dict[int, np.ndarray], fails: dict[int, str], ref: int,
           cfg: MatchConfig) -> list[int]:
    """Register failed frames through their nearest registered neighbours; updates ``trans``/``fails``."""
    chained: list[int] = []
    progress = True
    while fails and progress:
        progress = False
        for f in sorted(fails):
            s = lists[f]
            for g in sorted(trans, key=lambda j: (abs(j - f), j))[:3]:
                try:
                    t_fg = match_stars(s, lists[g], config=cfg).transform
                except RegistrationError:
                    continue
                guess = _norm(trans[g] @ t_fg)
                try:
                    t = refine_from(guess, s.xy, lists[ref].xy, config=cfg).transform
                except RegistrationError:
                    t = guess
                trans[f] = t
                chained.append(f)
                del fails[f]
                progress = True
                break
    return chained


def _max_motion(trans: dict[int, np.ndarray], shape: tuple[int, int]) -> float:
    h, w = shape
    g = np.array([[x, y] for x in (0, w - 1) for y in (0, h - 1)] + [[(w - 1) / 2, (h - 1) / 2]], dtype=float)
    return max((float(np.max(np.hypot(*(transform_points(t, g) - g).T))) for t in trans.values()), default=0.0)


def _validation_frames(trans: dict[int, np.ndarray], ref: int, shape: tuple[int, int]) -> list[int]:
    """Up to :data:`N_VALIDATE` frames, those that moved most first, spread over the session."""
    others = [i for i in sorted(trans) if i != ref]
    if len(others) <= N_VALIDATE:
        return others
    motion = {i: _max_motion({i: trans[i]}, shape) for i in others}
    far = sorted(others, key=lambda i: -motion[i])[: 2 * N_VALIDATE]
    return _spread(sorted(far), N_VALIDATE)


def _undistort(lens: RadialLens | None, xy: np.ndarray) -> np.ndarray:
    return xy if lens is None else lens.undistort(xy)


def _pairs(lists: dict[int, _Stars], trans: dict[int, np.ndarray], ref: int, frames: list[int],
           lens: RadialLens | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Matched star pairs ``(src_xy, dst_xy, weight, frame)`` (recorded pixels) of ``frames``."""
    r = lists[ref]
    rd = _undistort(lens, r.xy)
    out = []
    for i in frames:
        s = lists[i]
        best = _refine_ideal(trans[i], _Stars(_undistort(lens, s.xy), s.pos_err), _Stars(rd, r.pos_err))
        if best is None:
            continue
        res = best[2]
        w = 1.0 / (s.pos_err[res.src_idx] ** 2 + r.pos_err[res.dst_idx] ** 2 + ERR_FLOOR_PX ** 2)
        out.append((s.xy[res.src_idx], r.xy[res.dst_idx], w, i))
    return out


def _predict(t: np.ndarray, src: np.ndarray, lens: RadialLens | None) -> np.ndarray:
    return _predict_ideal(t, _undistort(lens, src), lens)


def _predict_ideal(t: np.ndarray, ideal: np.ndarray, lens: RadialLens | None) -> np.ndarray:
    """Recorded reference pixels of the ideal (undistorted) source pixels ``ideal`` under ``t``."""
    p = transform_points(t, ideal)
    return p if lens is None else lens.distort(p)


def fit_lens(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]], shape: tuple[int, int]) -> RadialLens | None:
    """Jointly fitted radial lens ``(k1, k2)`` of matched pairs from several frames (None: too few stars).

    For given ``k1, k2`` each frame's homography is its weighted least-squares
    fit in ideal pixels; ``k1, k2`` minimise the weighted reprojection error
    (reference pixels) of all frames together (:func:`_least_squares_box`).
    """
    pairs = [p for p in pairs if len(p[0]) >= 10]
    if not pairs:
        return None
    recorded = np.concatenate([np.concatenate([s, d]) for s, d, _, _ in pairs])
    ends = np.cumsum([2 * len(s) for s, _, _, _ in pairs])[:-1]

    def resid(k: np.ndarray) -> np.ndarray:
        lens = RadialLens.for_shape(shape, k1=float(k[0]), k2=float(k[1]))
        # every star undistorted in one call (point by point: each the number of a call of its own)
        ideal = np.split(lens.undistort(recorded), ends)
        out = []
        for (s, d, w, _), sd in zip(pairs, ideal):
            us, ud = sd[: len(s)], sd[len(s):]
            try:
                r = _predict_ideal(estimate_transform(us, ud, "homography", w), us, lens) - d
            except (np.linalg.LinAlgError, RegistrationError, ValueError):
                r = np.full_like(s, 10.0)
            out.append((np.nan_to_num(r, nan=10.0) * np.sqrt(w)[:, None]).ravel())
        return np.concatenate(out)

    k = _least_squares_box(resid, np.zeros(2), -0.5, 0.5, diff_step=1e-4, max_nfev=60)
    return RadialLens.for_shape(shape, k1=float(k[0]), k2=float(k[1]))


def _least_squares_box(fun: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, lo: float, hi: float, *,
                       diff_step: float, max_nfev: int, tol: float = 1e-8) -> np.ndarray:
    """``x`` in the box ``[lo, hi]`` minimising ``|fun(x)|^2``: Levenberg-Marquardt with forward-difference
    derivatives (a step of ``diff_step`` times ``max(1, |x|)``, backwards at the upper bound) and Marquardt's
    scaling; a parameter on a bound that the descent pushes against stays there, the others' steps are
    clipped to the box. Stops when a step, or the cost's decrease (predicted, or made), is
    below ``tol`` (relative), or after ``max_nfev`` calls of ``fun``. (A few parameters and cheap calls: SciPy's ``least_squares``
    did this, but importing ``scipy.optimize`` took longer than the fit.)
    """
    x = np.clip(np.asarray(x0, dtype=np.float64), lo, hi)
    r = fun(x)
    cost, nfev, lam = float(r @ r), 1, 1e-6
    while nfev + x.size < max_nfev:
        jac = np.empty((r.size, x.size))
        for j in range(x.size):
            h = diff_step * max(1.0, abs(x[j]))
            h = -h if x[j] + h > hi else h
            xj = x.copy()
            xj[j] += h
            jac[:, j] = (fun(xj) - r) / h
        nfev += x.size
        a, g = jac.T @ jac, jac.T @ r
        free = ~(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)))  # a bound the descent pushes against holds
        a, g = a * np.outer(free, free) + np.diag(~free), g * free
        damp = np.diag(np.maximum(np.diag(a), 1e-300))
        while nfev < max_nfev:
            xn = np.clip(x - np.linalg.solve(a + lam * damp, g), lo, hi)
            step = xn - x
            if np.all(np.abs(step) <= tol * (tol + np.abs(x))) or -(2.0 * g @ step + step @ a @ step) <= tol * cost:
                return x  # at the minimum, to the derivatives' precision
            rn = fun(xn)
            nfev += 1
            cn = float(rn @ rn)
            if cn < cost:
                break
            lam *= 10.0
        else:  # no step lowered the cost before the calls ran out
            return x
        if cost - cn <= tol * cost:
            return xn
        x, r, cost, lam = xn, rn, cn, max(lam / 10.0, 1e-12)
    return x


#: Frames with fewer matched pairs than this do not vote on the model (a homography on a half of
#: fewer than 8 stars extrapolates wildly).
MIN_PAIRS_VALIDATE = 16


def heldout_rms(model: str, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]],
                shape: tuple[int, int], seed: int = 0) -> float:
    """2-fold cross-validated RMS (reference px) of ``model``: the median over frames of each frame's
    held-out RMS, on frames with at least :data:`MIN_PAIRS_VALIDATE` matched pairs."""
    rng = np.random.default_rng(seed)
    pairs = [p for p in pairs if len(p[0]) >= MIN_PAIRS_VALIDATE]
    halves = []
    for s, d, w, _ in pairs:
        perm = rng.permutation(len(s))
        halves.append((perm[: len(s) // 2], perm[len(s) // 2:]))
    sq = np.zeros(len(pairs))
    n = np.zeros(len(pairs))
    for fit_k, test_k in ((0, 1), (1, 0)):
        fit = [(s[h[fit_k]], d[h[fit_k]], w[h[fit_k]], i) for (s, d, w, i), h in zip(pairs, halves)]
        lens = fit_lens(fit, shape) if model == "homography+radial" else None
        for k, ((s, d, w, _), (fs, fd, fw, _), h) in enumerate(zip(pairs, fit, halves)):
            t = _fit_model(model, fs, fd, fw, lens)
            if t is None:
                continue
            tk = h[test_k]
            r = _predict(t, s[tk], lens) - d[tk]
            sq[k] += float(np.nansum(r * r))
            n[k] += len(tk)
    ok = n > 0
    return float(np.median(np.sqrt(sq[ok] / n[ok]))) if ok.any() else float("inf")


def _fit_model(model: str, s: np.ndarray, d: np.ndarray, w: np.ndarray, lens: RadialLens | None):
    base = "homography" if model == "homography+radial" else model
    try:
        return estimate_transform(_undistort(lens, s), _undistort(lens, d), base, w)
    except (RegistrationError, np.linalg.LinAlgError, ValueError):
        return None


def choose_model(heldout: dict[str, float], rel: float = 0.05, abs_px: float = 0.002) -> str:
    """The simplest model whose held-out RMS is within ``rel`` (+ ``abs_px``) of the best."""
    best = min(heldout.values())
    for m in MODELS:
        if m in heldout and heldout[m] <= best * (1.0 + rel) + abs_px:
            return m
    return "similarity"


def _final_plain(reg: SessionRegistration, lists: dict[int, _Stars], trans: dict[int, np.ndarray],
                 chained: list[int], tick: Callable[[], None]) -> None:
    """Transforms of the chosen lens-less model against the reference, refined from the provisional ones.

    The provisional homographies (matched to the provisional reference, then
    composed onto the final one) put every star within the association radius,
    so no triangle search is needed again; a frame whose refinement fails is
    matched from scratch, and a chained frame keeps its chained guess.
    """
    cfg = MatchConfig(model=reg.model)
    r = lists[reg.ref]
    for i in sorted(trans):
        tick()
        if i == reg.ref:
            reg.transforms[i], reg.residuals[i] = np.eye(3), 0.0
            continue
        s = lists[i]
        try:
            try:
                res = refine_from(trans[i], s, r, config=cfg)
            except RegistrationError:
                if i in chained:
                    raise
                res = match_stars(s, r, config=cfg)
        except RegistrationError as exc:
            reg.failures[i] = f"registration failed: {exc}"
            continue
        reg.transforms[i] = np.asarray(res.transform, dtype=np.float64)
        reg.residuals[i] = float(res.residual_rms_px)


def _final_with_lens(reg: SessionRegistration, lists: dict[int, _Stars], trans: dict[int, np.ndarray],
                     lens: RadialLens, tick: Callable[[], None]) -> None:
    """Homographies in ideal pixels, refined from the provisional transforms (nearest the reference first).

    A frame whose direct refinement is poor (too few stars for a homography,
    or an RMS above :data:`MAX_RMS_PX`) is chained: matched to an already
    registered neighbour in time, composed, and refined against the
    reference from that guess.
    """
    ideal = {i: _Stars(lens.undistort(s.xy), s.pos_err) for i, s in lists.items()}
    ref = reg.ref
    reg.transforms[ref], reg.residuals[ref] = np.eye(3), 0.0
    tick()
    for i in sorted((i for i in trans if i != ref), key=lambda i: (abs(i - ref), i)):
        tick()
        best = _refine_ideal(trans[i], ideal[i], ideal[ref])
        if best is None or best[1] > MAX_RMS_PX:
            for g in sorted(reg.transforms, key=lambda j: (abs(j - i), j))[:3]:
                t_ig = _refine_ideal(None, ideal[i], ideal[g])
                if t_ig is None:
                    continue
                cand = _refine_ideal(_norm(reg.transforms[g] @ t_ig[0]), ideal[i], ideal[ref])
                if cand is not None and (best is None or cand[1] < best[1]):
                    best = cand
                    if i not in reg.chained:
                        reg.chained.append(i)
                if best is not None and best[1] <= MAX_RMS_PX:
                    break
        if best is None:
            reg.failures[i] = "registration failed: too few stars agree with a homography through the lens model"
            continue
        t, _, res = best
        reg.transforms[i] = t
        pred = _predict(t, lists[i].xy[res.src_idx], lens) - lists[ref].xy[res.dst_idx]
        reg.residuals[i] = float(np.sqrt(np.nanmean(np.sum(pred * pred, axis=1))))


#: A registration with a larger RMS (reference px, ideal) is retried through a neighbour.
MAX_RMS_PX = 0.8


def _refine_ideal(guess: np.ndarray | None, src: _Stars, dst: _Stars):
    """``(transform, rms, MatchResult)`` of a homography in ideal pixels, or None.

    From a guess: refined with a 6 px association radius, then 3 px. Without
    one: the triangle matcher. Results that fell back to a similarity (too
    few stars for a homography) count as failures.
    """
    try:
        if guess is None:
            res = match_stars(src, dst, config=MatchConfig(model="homography"))
        else:
            res = refine_from(guess, src, dst, config=MatchConfig(model="homography", ransac_threshold_px=6.0))
            res = refine_from(res.transform, src, dst, config=MatchConfig(model="homography"))
    except RegistrationError:
        return None
    if res.model != "homography":
        return None
    return res.transform, res.residual_rms_px, res


def describe(reg: SessionRegistration) -> dict[str, Any]:
    """JSON-serialisable summary for the report."""
    return {
        "model": reg.model, "lens": None if reg.lens is None else reg.lens.to_dict(),
        "heldout_rms_px": {k: round(v, 4) for k, v in reg.heldout_rms.items()},
        "chained_frames": len(reg.chained), "static_sources": int(sum(len(v) for v in reg.static.values())),
        "max_sky_motion_px": round(reg.motion_px, 1), "reference_reason": reg.reference_reason,
    }

