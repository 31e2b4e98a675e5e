"""``"mean"``: the weighted mean of every valid value, no rejection.

Sigma's kernel (``sigma_clip_mean``) and twin with ``max_iter`` fixed at 0: no
clipping round runs, so the kappas (0 here: the method takes none) are unused.
"""

from __future__ import annotations

from skystack.engine.rejection.base import RejectionMethod
from skystack.engine.rejection.sigma import _sigma_clip_mean_numpy

METHOD = RejectionMethod("mean", (3.0, 3.0), "", "sigma_clip_mean", _sigma_clip_mean_numpy, max_iter=0)
