"""One memory plan per stack: how ``--memory-limit`` is shared between the stages.

The limit bounds the whole process above the interpreter's own baseline (the
modules imported), not only the frame store. It is split once, from the frame
sizes, into:

* the frame store: in RAM when it takes at most half of the limit (as float32,
  or as the spill's float16 when only that fits), else spilled to disk
  (:class:`~skystack.engine.framestore.FrameStore`, :func:`store_layout`);
* the frames in flight: each frame being calibrated, debayered or warped needs
  about :data:`FRAME_WORK_BPP` bytes per mosaic pixel, each decoded frame
  waiting in the queue :data:`DECODED_BPP`; the threads and the queue shrink
  until they fit beside the store;
* the combine's tiles and the masters' bands (``tile_bytes``), beside the
  output image and its count and coverage maps (:data:`OUTPUT_BPP`).

Without a limit the plan keeps the speed settings asked for, and holds the
default peak within a small multiple of a streaming stacker's: the store stays
in RAM only up to :data:`DEFAULT_STORE_RAM` (more spills to disk, where the
page cache keeps it without counting as the process's memory) and, on the CPU,
tiles and bands are at most :data:`DEFAULT_TILE_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MiB = 1 << 20

#: Peak working memory of one frame in flight, bytes per pixel of its mosaic:
#: tracemalloc peaks on a 2 MP frame were 55 (calibrate -> RCD debayer, the
#: float mosaic, its calibrated copy and the RGB result included), 47 (warp:
#: input, output and Lanczos temporaries) and 51 (normalisation statistics);
#: the rest is the allocator's slack.
FRAME_WORK_BPP = 64
#: A decoded frame waiting in the queue (uint16 mosaic and the reader's copy).
DECODED_BPP = 4
#: The combine's output, bytes per output pixel per channel: the float32 image,
#: plus the count (int32) and coverage (int16) maps and the reference frame the
#: normalisation keeps (float32), shared over the channels.
OUTPUT_BPP = 12
#: Without ``--memory-limit``: the most RAM the frame store may take before it spills (a quarter of
#: the available RAM at most), as float16 frames; float32 frames only up to half of it (the same
#: noise at half the size: RESULTS.md). A spill file is RAM too until the kernel writes it back, and
#: the page cache's fresh pages cost more than the process's own: 80 frames of 1 MP (a 440 MiB
#: float16 store) stacked in 8.9 s against 9.6 s spilled at 256 MiB, system time 0.7 against 1.6 s,
#: for a peak of 650 against 207 MB (Siril: 415 MB). Larger stores spill.
DEFAULT_STORE_RAM = 512 * MiB
#: The largest combine tile or master band (bigger ones are no faster).
DEFAULT_TILE_BYTES = 64 * MiB
#: The smallest tile budget a plan gives (a tile is at least one row anyway).
MIN_TILE_BYTES = 4 * MiB


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """How one stack spends its memory.

    Attributes
    ----------
    limit : int or None
        ``--memory-limit`` in bytes (None: no limit given).
    store_ram : int
        Bytes the frame store may hold in RAM; a larger store spills to disk.
    float32_ram : int or None
        Bytes of float32 frames the store may hold in RAM (None: ``store_ram``); a larger
        store is held as its spill type (float16) in ``store_ram``.
    threads : int
        Frames processed at once (calibration, warp, normalisation).
    queue_size : int
        Decoded frames that may wait for a thread.
    tile_bytes : int
        Working memory of one combine tile or master band, temporaries included.
    """

    limit: int | None
    store_ram: int
    threads: int
    queue_size: int
    tile_bytes: int
    float32_ram: int | None = None

    def __post_init__(self) -> None:
        from skystack.engine.errors import SkystackError

        if self.threads < 1 or self.queue_size < 1 or self.tile_bytes < 1 or self.store_ram < 0:
            raise SkystackError(f"invalid memory plan {self}")


def store_layout(float32_bytes: int, ram_budget: int | None, dtype: str = "float16",
                 float32_budget: int | None = None) -> tuple[str, bool]:
    """How a host frame store of ``float32_bytes`` (its frames in float32) holds them.

    In RAM as float32 when that fits in ``float32_budget`` (None: ``ram_budget``;
    never more than it) and ``ram_budget`` (None: no budget); else in RAM as
    ``dtype`` (the spill's type) when that fits in ``ram_budget`` (a float32
    ``dtype`` in the float32 budget); else spilled to disk as ``dtype``. The RAM the store takes never
    exceeds the budget either way; float16 in RAM costs the same rounding as
    the float16 spill it replaces, without writing the frames through the page
    cache and reading them back.

    Returns
    -------
    (str, bool)
        The stored dtype and whether the store spills to disk.
    """
    if ram_budget is None:
        return "float32", False
    f32 = ram_budget if float32_budget is None else min(float32_budget, ram_budget)
    if float32_bytes <= f32:
        return "float32", False
    held = np.dtype(dtype)
    return str(dtype), float32_bytes // 4 * held.itemsize > (f32 if held == np.float32 else ram_budget)


def plan_memory(limit: int | None, *, available: int, frame_px: int, store_bytes: int, out_px: int,
                channels: int, threads: int, queue_size: int, gpu: bool = False,
                store_dtype: str = "float16") -> MemoryPlan:
    """Share ``limit`` (or, without one, the defaults) between the stages of a stack.

    Parameters
    ----------
    limit : int or None
        ``--memory-limit`` in bytes.
    available : int
        Bytes of RAM available now; half of it is the ceiling of any plan.
    frame_px : int
        Pixels of one decoded mosaic.
    store_bytes : int
        Bytes of the registered frames in float32 (the frame store).
    out_px : int
        Pixels of the output image (per channel).
    channels : int
        Colour channels of the output.
    threads : int
        Threads asked for (frames processed at once).
    queue_size : int
        Decoded frames asked to wait in the queue.
    gpu : bool
        The stack runs on a GPU: without a limit its tiles stay as large as
        the host allows (a GPU wants large launches; the device budget bounds
        them too).
    store_dtype : str
        The frame store's spill type (what it holds in RAM when float32 does not fit).

    Returns
    -------
    MemoryPlan
    """
    ceiling = max(1, available // 2)
    if limit is None:
        store_ram = min(ceiling // 2, DEFAULT_STORE_RAM)
        return MemoryPlan(limit=None, store_ram=store_ram, float32_ram=store_ram // 2, threads=threads,
                          queue_size=queue_size,
                          tile_bytes=ceiling if gpu else max(MIN_TILE_BYTES, min(ceiling // 4, DEFAULT_TILE_BYTES)))
    budget = min(int(limit), ceiling)
    store_ram = budget // 2
    held, on_disk = store_layout(store_bytes, store_ram, store_dtype)
    free = budget - (0 if on_disk else store_bytes // 4 * np.dtype(held).itemsize)
    free -= out_px * OUTPUT_BPP * channels
    per_frame = frame_px * (FRAME_WORK_BPP + 2 * DECODED_BPP)
    fit = max(1, min(threads, free // max(1, per_frame)))
    tile = min(DEFAULT_TILE_BYTES, max(MIN_TILE_BYTES, free // 2))
    return MemoryPlan(limit=int(limit), store_ram=store_ram, threads=int(fit),
                      queue_size=max(1, min(queue_size, int(fit))), tile_bytes=int(tile))


#: Allocations at least this large go straight to the OS under a memory limit (see :func:`return_freed_memory`).
MMAP_THRESHOLD = 4 * 2**20
#: Without a limit, allocations below this come from glibc's heap (its largest allowed threshold: 32 MiB).
KEEP_THRESHOLD = 32 * 2**20
#: Without a limit, freed heap memory above this is handed back to the OS (the default is 128 KiB-64 MiB).
KEEP_TRIM = 2**30
#: glibc's own trim threshold (set again under a limit, after a stack without one raised it).
DEFAULT_TRIM = 128 * 2**10
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's ``mallopt`` for each ``(parameter, value)``; True when glibc took them all."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all([bool(libc.mallopt(k, v)) for k, v in settings])
    except (OSError, AttributeError):  # not glibc
        return False


def return_freed_memory() -> bool:
    """Make glibc hand freed image-sized buffers back to the OS at once (for ``--memory-limit``).

    By default glibc raises its mmap threshold after the first large buffer is
    freed, so later ones come from its heaps and stay resident after they are
    freed: the peak then counts memory no stage is using. A fixed threshold of
    :data:`MMAP_THRESHOLD` (set once, for the whole process) maps every large
    buffer and unmaps it when it is freed. It costs page faults (about 1 s of
    system time on 20 frames of 2 MP), so it is only used under a limit.

    Returns
    -------
    bool
        True when glibc took the setting (False elsewhere: nothing changes).
    """
    return _mallopt((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, DEFAULT_TRIM))


def keep_freed_memory() -> bool:
    """Make glibc reuse freed image-sized buffers instead of mapping fresh memory (no ``--memory-limit``).

    Every frame's steps allocate and free frame-sized buffers (decoding, raw
    conversion, sep's pixel stack, debayer bands, store reads, combine tiles):
    about 2.3 GB on 20 frames of 2 MP. glibc gives each busy thread an arena of
    its own, whose extra heaps (64 MiB each) are unmapped as soon as they are
    empty, and it maps buffers above its threshold afresh each time: all of that
    memory is faulted in and zeroed by the kernel again. One arena (the main
    heap, which grows without a size cap), buffers up to :data:`KEEP_THRESHOLD`
    from it and no trimming below :data:`KEEP_TRIM` reuse the same pages
    instead. Set for the whole process; it takes effect for threads started
    afterwards.

    Returns
    -------
    bool
        True when glibc took the settings (False elsewhere: nothing changes).
    """
    return _mallopt((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, KEEP_THRESHOLD), (_M_TRIM_THRESHOLD, KEEP_TRIM))
