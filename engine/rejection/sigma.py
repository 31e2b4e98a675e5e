"""``"sigma"``: robust kappa-sigma clipping (kernel ``sigma_clip_mean``).

Robust kappa-sigma clipping: repeat (at most ``max_iter`` rounds, until
nothing changes) ``c = median(kept)``; ``sigma = MAD-sigma(kept)`` in the
first round, then ``std(kept)`` (ddof 0; stop if sigma is 0); ``kept`` =
the valid values in ``[c - kl*sigma, c + kh*sigma]`` -- all of them, so a
value the MAD's own noise dropped comes back once the efficient std takes
over (the MAD-sigma of 8 values scatters by ~30 %: clipping with it every
round drops ~4 % of pure noise and costs ~4 % of the stack's noise).
"""

from __future__ import annotations

import numpy as np

from skystack.engine.rejection.base import ClipResult, RejectionMethod, _robust_clip_mean


def _sigma_clip_mean_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                           max_iter: int, scale: np.ndarray, offset: np.ndarray,
                           weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``sigma_clip_mean`` kernel: vectorised over pixels, same float32 ops."""
    return _robust_clip_mean(False, cube, kappa_low, kappa_high, max_iter, scale, offset, weights)


METHOD = RejectionMethod("sigma", (3.0, 3.0), "standard deviations", "sigma_clip_mean", _sigma_clip_mean_numpy)
