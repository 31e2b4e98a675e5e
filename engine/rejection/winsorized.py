"""``"winsorized"``: winsorized sigma clipping (kernel ``winsorized_clip_mean``).

Winsorized sigma clipping, like Siril's but from a robust start. Per
round: ``c = median(kept)``; the robust sigma starts at
``sigma = MAD-sigma(kept)`` (stop if it is 0; Siril starts from the std,
which an outlier inflates) and repeats (at most
:data:`WINSOR_MAX_ITER` times) ``L = max(L, c - 1.5 sigma)``,
``U = min(U, c + 1.5 sigma)`` (``L, U`` start at -inf, +inf),
``w = clip(kept, L, U)``, ``sigma' = 1.134 * std1(w)``, until
``|sigma' - sigma| <= 0.0005 * sigma``; ``std1`` divides by ``n - 1``
like Siril's (with ``n`` it would average 0.94 sigma on 20 Gaussian
values instead of 0.98). Siril winsorizes its working copy cumulatively,
which is the running ``L``/``U``; 1.134 corrects the std of Gaussian data
winsorized at 1.5 sigma (0.882 sigma) back to sigma. Then the *original*
kept values below ``c - kl*sigma'`` or above ``c + kh*sigma'`` are
dropped. Rounds repeat like ``"sigma"``. (Siril has no cap on the inner
loop; the cap stops a pixel whose sigma shrinks geometrically towards 0,
e.g. four equal values and one other, from running into subnormal numbers.)
"""

from __future__ import annotations

import numpy as np

from skystack.engine.rejection.base import ClipResult, RejectionMethod, _robust_clip_mean


def _winsorized_clip_mean_numpy(cube: np.ndarray, kappa_low: np.float32, kappa_high: np.float32,
                                max_iter: int, scale: np.ndarray, offset: np.ndarray,
                                weights: np.ndarray) -> ClipResult:
    """NumPy twin of the ``winsorized_clip_mean`` kernel."""
    return _robust_clip_mean(True, cube, kappa_low, kappa_high, max_iter, scale, offset, weights)


METHOD = RejectionMethod("winsorized", (3.0, 3.0), "standard deviations", "winsorized_clip_mean",
                         _winsorized_clip_mean_numpy)
