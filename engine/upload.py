"""Staged uploads: the decoder threads send each decoded light to the device themselves.

On the GPU path a light's raw mosaic is its only full-size upload. A plain
``cupy.asarray`` of a decoded (pageable) array blocks the compute thread while
the driver copies it through its own staging memory. Instead, each decoder
thread copies its frame into a page-locked (pinned) buffer of its own, reused
from frame to frame, and sends it up on a copy stream of its own with
``ndarray.set(..., stream=...)``: the copy engine moves it while the compute
thread calibrates and measures the frame before. The decoder thread waits for
its copy to finish (so its buffer is free for the next frame) and hands the
compute thread a device array that is ready to use. The copy first waits for the
work already queued on the null stream (an event): CuPy's memory pool may give
the new array a block the compute thread has just freed while its kernels still
read it. Later work of the compute thread overlaps the copy.

Decoded lights then wait in the queue on the device: at most the producer's
bound of them, each its raw size (2 bytes a pixel). A frame whose share would
exceed :data:`QUEUE_SHARE` of the device's free memory stays on the host and is
uploaded by the compute thread as before, as is any frame whose upload fails.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from skystack.engine.frame import Frame

__all__ = ["QUEUE_SHARE", "StagedUploader"]

log = logging.getLogger(__name__)

#: Share of the device's free memory (when the stage starts) that queued raw frames may take;
#: the frame store sizes itself from half of it (:meth:`Backend.memory_budget`).
QUEUE_SHARE = 0.25


class StagedUploader:
    """Wraps a frame reader so that a decoder thread uploads what it decodes (see the module's text).

    Parameters
    ----------
    xp : module
        CuPy (or the tests' simulated device).
    reader : callable
        ``reader(path) -> Frame``, the decoding itself.
    bound : int
        Most decoded frames alive at once (:attr:`FrameProducer.bound`).
    free_bytes : int
        The device's free memory now.
    timed : callable, optional
        ``timed(name)``: a context manager timing the copy into the pinned buffer and the
        upload (the stage ``upload``).
    """

    def __init__(self, xp: Any, reader: Callable[[Any], Frame], *, bound: int, free_bytes: int,
                 timed: Callable[[str], Any] | None = None) -> None:
        self.xp, self._reader, self._timed = xp, reader, timed
        self.max_frame_bytes = int(QUEUE_SHARE * max(0, free_bytes)) // max(1, bound)
        self._local = threading.local()  # each decoder thread's pinned buffer and copy stream

    def __call__(self, path: Any) -> Frame:
        frame = self._reader(path)
        data = frame.data
        if not isinstance(data, np.ndarray) or data.dtype.kind not in "uif" or data.nbytes > self.max_frame_bytes:
            return frame
        try:
            if self._timed is None:
                dev = self.upload(data)
            else:
                with self._timed("upload"):
                    dev = self.upload(data)
        except Exception as exc:  # out of device memory, say: the compute thread uploads it as before
            log.debug("staged upload of %s failed (%s); uploading it from the compute thread", path, exc)
            return frame
        return replace(frame, data=dev)

    def upload(self, data: np.ndarray) -> Any:
        """``data`` on the device, sent from this thread's pinned buffer on its copy stream."""
        local, xp = self._local, self.xp
        dtype = data.dtype.newbyteorder("=")
        if getattr(local, "nbytes", 0) < data.nbytes:
            local.mem = xp.cuda.alloc_pinned_memory(data.nbytes)
            local.nbytes = data.nbytes
            local.stream = getattr(local, "stream", None) or xp.cuda.Stream(non_blocking=True)
        staged = np.frombuffer(local.mem, dtype=dtype, count=data.size).reshape(data.shape)
        np.copyto(staged, data)
        dev = xp.empty(data.shape, dtype=dtype)
        # CuPy's pool may hand out a block the compute thread freed while its kernels on the null
        # stream still read it; the copy stream is not ordered after them unless told to be
        local.stream.wait_event(xp.cuda.Stream.null.record())
        dev.set(staged, stream=local.stream)
        local.stream.synchronize()  # the buffer is free for this thread's next frame
        return dev
