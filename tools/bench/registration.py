"""Registration error against the simulator's truth: of estimated transforms, or measured on
frames already resampled into the reference grid (pipelines that keep no transforms)."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from skystack.engine.robust import MAD_TO_SIGMA


def registration_error(transforms: dict[int, Any], truth, ref_index: int) -> dict[str, Any]:
    """Grid RMS (px) of estimated frame -> ``ref_index`` transforms against the truth.

    ``transforms`` maps light index to a 3x3 frame -> reference-grid matrix
    (skystack's report convention). Returns ``rms_px`` (RMS over frames),
    ``max_px``, ``per_frame`` and ``n``; the reference itself is left out.
    """
    from skystack.engine.match import grid_rms

    tr = truth.transforms()
    inv_ref = np.linalg.inv(tr[ref_index])
    errs = {}
    for i, t in transforms.items():
        i = int(i)
        if i == ref_index or t is None:
            continue
        expected = inv_ref @ tr[i]
        errs[i] = grid_rms(np.asarray(t, dtype=np.float64), expected, truth.shape)
    v = np.array(list(errs.values()))
    return {"rms_px": float(np.sqrt(np.mean(v ** 2))) if v.size else float("nan"),
            "max_px": float(v.max()) if v.size else float("nan"), "n": int(v.size),
            "per_frame": {str(k): float(e) for k, e in sorted(errs.items())}, "method": "transforms"}


def measured_registration_error(images: Iterable[tuple[int, np.ndarray]], truth, ref_index: int,
                                *, match_radius: float = 1.5) -> dict[str, Any]:
    """Registration error of frames already resampled into the ``ref_index`` grid.

    For each ``(light index, image)`` the detected stars are paired with the
    truth star positions of the reference grid (nearest within
    ``match_radius`` px), a similarity is fitted from detected to truth
    positions, and its grid RMS displacement from the identity is the
    frame's error (for pipelines that keep registered frames but not their
    transforms, e.g. Siril 1.0's ``r_`` sequence). ``floor_px`` is the
    value measured on the reference frame itself (which needs no
    registration): the method's own noise floor.
    """
    from scipy.spatial import cKDTree

    from skystack.engine.detect import detect_stars
    from skystack.engine.match import estimate_transform, grid_rms

    ref_xy = truth.project_stars(ref_index)
    tree = cKDTree(ref_xy)
    errs: dict[int, float] = {}
    pairs: dict[int, int] = {}
    for i, img in images:
        st = detect_stars(np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0))
        xy = st.xy
        if len(xy) < 3:
            continue
        d, j = tree.query(xy)
        ok = d <= match_radius
        if ok.sum() < 6:
            continue
        src, dst = xy[ok], ref_xy[j[ok]]
        t = estimate_transform(src, dst, "similarity")
        # one pass of outlier removal (blends, hot pixels)
        res = np.hypot(*(src @ t[:2, :2].T + t[:2, 2] - dst).T)
        good = res <= max(3.0 * MAD_TO_SIGMA * np.median(res), 0.2)
        if good.sum() >= 6:
            t = estimate_transform(src[good], dst[good], "similarity")
        errs[int(i)] = grid_rms(t, np.eye(3), truth.shape)
        pairs[int(i)] = int(good.sum())
    v = np.array([e for k, e in errs.items() if k != ref_index])
    return {"rms_px": float(np.sqrt(np.mean(v ** 2))) if v.size else float("nan"),
            "max_px": float(v.max()) if v.size else float("nan"), "n": int(v.size),
            "floor_px": float(errs[ref_index]) if ref_index in errs else None,
            "per_frame": {str(k): float(e) for k, e in sorted(errs.items())},
            "stars_matched": {str(k): n for k, n in sorted(pairs.items())}, "method": "registered frames"}
