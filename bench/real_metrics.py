"""Quality of stacked real frames without a truth: the same boxes, stars and scales for every tool.

Real sessions (``../shared/realdata``) have no simulator truth, so two
stacks of the same lights, both on the first light's grid, are compared to
each other:

* **star mask**: every star either image's detection finds, masked to a
  radius growing with its flux, plus NaN borders; the same mask for both;
* **photometric scale** per channel: the median ratio of aperture fluxes
  (radius 4 FWHM of the softer image, so both hold their stars' whole light;
  annulus median) of bright isolated stars found in both, against the first
  image (so noise is compared in the same units);
* **noise** at 1x1 and 4x4 binning, and **colour noise** (``R - G`` and
  ``B - G`` after the scales), as robust sigmas in the same star-free boxes
  as :func:`skystack.tools.bench.truth_quality` uses;
* **FWHM**: median of the detected stars'.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skystack.tools.bench.quality import box_stats, colour_noise


def _stars(image: np.ndarray):
    from skystack.engine.detect import DetectConfig, detect_stars

    return detect_stars(np.nan_to_num(image, nan=0.0), config=DetectConfig(max_stars=10 ** 6, max_measured=10 ** 6))


def star_mask(images: list[np.ndarray], stars: list, *, box: int = 24) -> np.ndarray:
    """``(H, W)`` bool, True where no star of any image lies (and every image has data).

    ``stars``: each image's detections (:func:`_stars`).
    """
    h, w = images[0].shape[-2:]
    free = np.ones((h, w), dtype=bool)
    for img, st in zip(images, stars):
        free &= np.isfinite(img).all(axis=0) if img.ndim == 3 else np.isfinite(img)
        ref = float(np.median(st.flux)) if len(st.flux) else 1.0
        for x, y, f, fw in zip(st.x, st.y, st.flux, st.fwhm):
            r = 2.5 * max(float(fw), 2.0) * (1.0 + 0.5 * math.log10(max(float(f) / max(ref, 1e-12), 1.0)))
            x0, x1 = max(0, int(x - r)), min(w, int(x + r) + 2)
            y0, y1 = max(0, int(y - r)), min(h, int(y + r) + 2)
            if x0 < x1 and y0 < y1:
                yy, xx = np.ogrid[y0:y1, x0:x1]
                free[y0:y1, x0:x1] &= (xx - x) ** 2 + (yy - y) ** 2 > r * r
    edge = box // 2
    free[:edge] = free[-edge:] = False
    free[:, :edge] = free[:, -edge:] = False
    return free


def boxes_of(mask: np.ndarray, box: int = 24, min_free: float = 0.6) -> np.ndarray:
    """Top-left corners of the ``box``-square tiles at least ``min_free`` star-free."""
    h, w = mask.shape
    out = [(y, x) for y in range(0, h - box + 1, box) for x in range(0, w - box + 1, box)
           if mask[y:y + box, x:x + box].mean() >= min_free]
    return np.asarray(out, dtype=np.intp).reshape(-1, 2)


def relative_scale(image: np.ndarray, reference: np.ndarray, *, stars=None, ref_stars=None,
                   max_stars: int = 200) -> np.ndarray:
    """Per channel: median aperture-flux ratio ``image / reference`` over bright isolated common stars.

    ``stars`` and ``ref_stars``: the two images' detections when already made (:func:`_stars`).
    """
    from scipy.spatial import cKDTree

    st = _stars(reference) if ref_stars is None else ref_stars
    other = _stars(image) if stars is None else stars
    img = image if image.ndim == 3 else image[None]
    ref = reference if reference.ndim == 3 else reference[None]
    h, w = ref.shape[-2:]
    fw = max(float(np.median(s.fwhm)) if len(s.fwhm) else 3.0 for s in (st, other))
    r_ap, r_in, r_out = 4.0 * fw, 4.0 * fw + 3.0, 4.0 * fw + 9.0  # the softer image's stars, whole
    xy = np.column_stack([st.x, st.y])
    d, _ = cKDTree(np.column_stack([other.x, other.y])).query(xy) if len(other.x) else (np.full(len(xy), np.inf), 0)
    tree = cKDTree(xy)
    order = np.argsort(-st.flux)
    keep = []
    for i in order[len(order) // 50:]:  # skip the brightest 2 % (saturation)
        x, y = xy[i]
        if d[i] > 1.5 or not (r_out + 2 < x < w - r_out - 3 and r_out + 2 < y < h - r_out - 3):
            continue
        if any(j != i and st.flux[j] > 0.1 * st.flux[i] for j in tree.query_ball_point(xy[i], r_out + 2 * fw)):
            continue
        keep.append(i)
        if len(keep) >= max_stars:
            break
    R = int(math.ceil(r_out)) + 1
    oy, ox = np.mgrid[-R:R + 1, -R:R + 1]
    ratios: list[list[float]] = [[] for _ in range(ref.shape[0])]
    for i in keep:
        x, y = xy[i]
        ix, iy = int(round(x)), int(round(y))
        dd = np.hypot(ox + ix - x, oy + iy - y)
        ap, ann = dd <= r_ap, (dd >= r_in) & (dd <= r_out)
        sl = (slice(None), slice(iy - R, iy + R + 1), slice(ix - R, ix + R + 1))
        for ch in range(ref.shape[0]):
            a, b = img[sl][ch], ref[sl][ch]
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                continue
            fa = float(a[ap].sum() - ap.sum() * np.median(a[ann]))
            fb = float(b[ap].sum() - ap.sum() * np.median(b[ann]))
            if fb > 0:
                ratios[ch].append(fa / fb)
    return np.array([np.median(r) if len(r) >= 5 else np.nan for r in ratios])


class Scorer:
    """Scores images against a reference image, in fixed star-free boxes (see the module docstring).

    Parameters
    ----------
    images : dict
        Name -> ``(C, H, W)`` stack on the same grid; the first is the reference
        (its units are the others' units), and every image's stars are masked.
    box : int
        Side of the star-free boxes.
    """

    def __init__(self, images: dict[str, np.ndarray], *, box: int = 24) -> None:
        self.stars = {name: _stars(img) for name, img in images.items()}
        self.reference = next(iter(images))
        self.ref_image = images[self.reference]
        self.box = box
        self.mask = star_mask(list(images.values()), list(self.stars.values()), box=box)
        self.boxes = boxes_of(self.mask, box)

    def score(self, img: np.ndarray, *, name: str | None = None) -> dict[str, Any]:
        """Noise (1x1, 4x4), colour noise and FWHM of ``img`` in the reference's photometric units."""
        from skystack.engine.detect import measure_quality

        st = self.stars[name] if name in self.stars else _stars(img)
        if name == self.reference:
            scale = np.ones(img.shape[0] if img.ndim == 3 else 1)
        else:
            scale = relative_scale(img, self.ref_image, stars=st, ref_stars=self.stars[self.reference])
        sig, sigb = box_stats(img, self.mask, self.boxes, self.box)
        noise = [float(np.nanmedian(sig[:, c]) / scale[c]) for c in range(sig.shape[1])]
        noise_b = [float(np.nanmedian(sigb[:, c]) / scale[c]) for c in range(sigb.shape[1])]
        q = measure_quality(st)
        return {"noise": noise, "noise_mean": float(np.mean(noise)), "noise_binned": noise_b,
                "noise_binned_mean": float(np.mean(noise_b)), "scale": [float(s) for s in scale],
                "colour_noise": list(colour_noise(img, scale, self.mask, self.boxes, self.box)),
                "fwhm_px": float(q.fwhm_px), "n_stars": int(q.n_stars), "n_boxes": int(len(self.boxes))}

