"""Noise power by frequency band of stacks of one simulated session: which noise is resolution, which is not.

Usage::

    python bench/siril_compare.py --frames 20 --megapixels 2 --no-peer --keep --workdir DIR
    python bench/noise_spectrum.py SESSION DIR [NAME=IMAGE.npy ...]

``SESSION`` is the simulated session (with ``truth.json``) that
``siril_compare`` stacked; ``DIR`` its ``--workdir`` (``skystack.npy`` and
``siril/result.fit``); more stacks of the same session on light 0's grid can be
added as ``NAME=PATH.npy``. Each image is scaled to light ADU by truth-star
photometry, the noise-free truth background is subtracted, and the residual's
power is averaged per radial frequency band in star-free tiles
(:func:`skystack.tools.bench.noise_spectrum`). Printed: each image's power
(mean of R, G, B) and chroma power (``R - G``, ``B - G``) per band, and their
ratios to Siril's. A resampling kernel's blur shows at high frequencies; at
low frequencies any difference is noise no kernel trades away (calibration,
rejection, weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from astropy.io import fits

    from skystack.tools.bench import noise_spectrum, star_free_mask
    from skystack.tools.synth import load_truth

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("session", type=Path)
    p.add_argument("workdir", type=Path)
    p.add_argument("extra", nargs="*", help="NAME=PATH.npy: more stacks of the same session")
    args = p.parse_args(argv)
    truth = load_truth(args.session)
    images = {"skystack": np.load(args.workdir / "skystack.npy"),
              "siril": np.asarray(fits.getdata(args.workdir / "siril" / "result.fit"), dtype=np.float32)}
    images.update((name, np.load(path)) for name, path in (e.split("=", 1) for e in args.extra))
    mask = star_free_mask(truth, 0)
    background = truth.sky(0, stars=False, trail=False)
    spectra = {k: noise_spectrum(v, truth, 0, mask=mask, background=background) for k, v in images.items()}
    ref = spectra["siril"]
    print(f"{ref.n_boxes} tiles; power in ADU^2 of one light (channels | chroma), ratio to Siril's")
    print("band (cyc/px) | " + " | ".join(spectra))
    for i, (lo, hi) in enumerate(ref.bands):
        cells = [f"{s.power[i]:7.1f} {s.chroma[i]:7.1f} "
                 f"({s.power[i] / ref.power[i]:.3f} {s.chroma[i] / ref.chroma[i]:.3f})" for s in spectra.values()]
        print(f"{lo:.2f}-{hi:.2f} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
