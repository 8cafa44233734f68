"""Freed memory handed back to the system while tiles run."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_normcheck.core.run.heap import HeapTrimmer


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_trim_hands_freed_heap_memory_back_at_most_every_interval():
    trimmer = HeapTrimmer(interval=3600.0)
    if not trimmer.available or not os.path.exists("/proc/self/statm"):
        pytest.skip("this C library has no malloc_trim")
    # 2000 arrays of 100 kB (under glibc's threshold: from the heap), the last one kept: glibc
    # cannot shrink the heap past it and keeps the 200 MB freed below it.
    blocks = [np.ones(100_000, dtype=np.uint8) for _ in range(2000)]
    last = blocks[-1]
    del blocks
    trimmer.tick()  # within the interval: nothing
    assert trimmer.count == 0
    before = _resident_bytes()
    trimmer.interval = 0.0
    trimmer.tick()
    assert trimmer.count == 1 and trimmer.seconds > 0
    assert before - _resident_bytes() > 100e6
    assert last[0] == 1
