"""Freed memory handed back to the system while tiles run."""

from __future__ import annotations

import numpy as np
import pytest

from napari_normcheck.core.run.heap import HeapTrimmer, resident_bytes

MB = 2**20


def _heap_blocks(n: int) -> list[np.ndarray]:
    """``n`` arrays of 100 kB: under glibc's threshold, so from the heap."""
    return [np.ones(100_000, dtype=np.uint8) for _ in range(n)]


def test_a_trim_hands_back_freed_heap_memory_where_the_memory_grew():
    flush = HeapTrimmer(interval=0.0, growth=0)
    if not flush.available or resident_bytes() is None:
        pytest.skip("this C library has no malloc_trim")
    # What the test process kept of earlier tests goes back first, so the blocks below are new
    # memory (else they reuse it, and the memory does not grow).
    flush.tick()
    trimmer = HeapTrimmer(interval=0.0, growth=100 * MB)
    # The last array kept: glibc cannot shrink the heap past it and keeps the 200 MB freed below.
    blocks = _heap_blocks(2000)
    last = blocks[-1]
    del blocks
    before = resident_bytes()
    trimmer.tick()
    assert trimmer.count == 1 and trimmer.seconds > 0
    assert before - resident_bytes() > 100 * MB
    trimmer.tick()  # no growth since: no trim
    assert trimmer.count == 1
    assert last[0] == 1
    # Within the interval nothing happens, however much the memory grew.
    waiting = HeapTrimmer(interval=3600.0, growth=0)
    waiting.tick()
    assert waiting.count == 0
