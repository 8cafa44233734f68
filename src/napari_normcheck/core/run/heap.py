"""Freed memory handed back to the system while tiles run (glibc's ``malloc_trim``).

A run allocates and frees large arrays all the time (tile windows, predictions, chunk sums,
spilled chunks read back). glibc keeps much of what is freed in its heaps for later allocations,
fragmented, so a process's resident memory grows with the volume's width long after the memory in
use has stopped growing (64x1024x1024 voxels, tile 32x256x256: 1.0 GB in use, 1.5-1.7 GB
resident). ``malloc_trim(0)`` gives the free pages back. Measured there: a trim after every tile
costs 10-15% of the run's time (the trims, and the pages faulted in again), resident 1.2 GB; every
0.5 s, no time measurable, resident 1.3 GB.

A trim also hands back what the model's next forward would have reused (its activations), which
that forward then faults in again. So a trim runs only where the resident memory has grown by
:data:`TRIM_GROWTH_BYTES` since the last one: the growth is bounded, and a run whose memory stays
put is not trimmed. A model whose working set alone swings by more (a BasicUNet on CPU, tile
16x96x96: 21 trims in a 29 s run, 0.4 s) still pays for them; waiting longer after trims whose
memory came straight back kept that to 6 trims, but also let the volume's runs keep 100-300 MB
more (16x: 1.1-1.3 GB instead of 0.96-1.02), so the bound won. The cost shows in CPU forwards:
``benchmarks/bench_engine.py --only speed`` spent 31.5-32.6 s in forwards with trims and 30.0 s
without (bare 27-30 s; noisy). Trusting the highest memory seen instead of the last trim's let the
16x run keep 1.45-1.51 GB. On a GPU the activations are not on the host. Where the C library has no
``malloc_trim`` (macOS, Windows, musl), nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable

#: Seconds between two looks at the resident memory at least.
TRIM_INTERVAL_S = 0.5
#: Growth of the resident memory since the last trim that calls for the next.
TRIM_GROWTH_BYTES = 128 * 2**20


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux), or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` from :meth:`tick` where the resident memory has grown enough.

    Parameters
    ----------
    interval : float
        Seconds between two looks at the resident memory at least.
    growth : int
        Bytes the resident memory must have grown since the last trim (or the start) for a trim.
    """

    _trim = _malloc_trim()

    def __init__(self, interval: float = TRIM_INTERVAL_S, growth: int = TRIM_GROWTH_BYTES) -> None:
        self.interval = interval
        self.growth = growth
        self.seconds = 0.0  # spent looking and trimming
        self.count = 0
        self._last = time.perf_counter()
        self._floor = resident_bytes() or 0

    @property
    def available(self) -> bool:
        """Whether this C library can trim its heaps."""
        return self._trim is not None

    def tick(self) -> None:
        """Trim the heaps if ``interval`` has passed and the memory grew by ``growth``."""
        now = time.perf_counter()
        if self._trim is None or now - self._last < self.interval:
            return
        resident = resident_bytes()
        if resident is None or resident - self._floor >= self.growth:
            self._trim(0)
            self.count += 1
            self._floor = resident_bytes() or 0
        self._last = time.perf_counter()
        self.seconds += self._last - now
