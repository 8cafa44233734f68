"""Boxes of a lazy volume read from its decoded blocks, each block read once while it is in use.

A volume's dask blocks are its stored chunks (:mod:`~napari_normcheck.core.io.lazy_array`). Tile
windows overlap each other and cut across chunks, so reading each window from the store decodes
most chunks several times: 2-3 times with 3D tiles at overlap 0.25, and 16 times for 2D tiles
(one plane) over chunks 16 planes deep, where the reader then takes more CPU than the rest of the
run. :class:`BlockCache` keeps the decoded blocks, the least recently used dropped beyond a byte
budget, and copies each window out of them: the same values, bit for bit.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections import OrderedDict
from typing import Any

import numpy as np

from napari_normcheck.core.io.lazy_array import SYNCHRONOUS

#: Decoded blocks kept at most (bytes): a z-row of 1 MB chunks across a 1024x1024 plane uses 16.
DEFAULT_CACHE_BYTES = 64 * 2**20
#: Blocks larger than this share of the budget are not cached (a merged or contiguous source's
#: blocks of tens of MB): their windows are sliced from the source as before.
_LARGEST_SHARE = 1 / 16


class BlockCache:
    """Read boxes of a dask array through its decoded blocks, kept up to ``max_bytes``.

    Parameters
    ----------
    data : dask.array.Array
        The volume's lazy data.
    max_bytes : int
        Memory for decoded blocks.
    """

    def __init__(self, data: Any, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.data = data
        self.max_bytes = max_bytes
        self._starts = [np.concatenate([[0], np.cumsum(c)]).tolist() for c in data.chunks]
        self._blocks: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self.reads = 0  # blocks decoded

    @classmethod
    def for_volume(cls, data: Any, max_bytes: int = DEFAULT_CACHE_BYTES) -> BlockCache | None:
        """A cache for ``data``, or ``None`` where its blocks are too large to keep (or unknown)."""
        chunks = getattr(data, "chunks", None)
        if chunks is None or not hasattr(data, "blocks"):
            return None
        largest = np.dtype(data.dtype).itemsize * int(np.prod([max(c) for c in chunks]))
        if largest > max_bytes * _LARGEST_SHARE:
            return None
        return cls(data, max_bytes)

    def read(self, box: tuple[slice, ...]) -> np.ndarray:
        """The values of ``data[box]`` (slices with start and stop, step 1) as a NumPy array."""
        out = np.empty(tuple(s.stop - s.start for s in box), dtype=self.data.dtype)
        spans = [
            range(bisect_right(starts, s.start) - 1, bisect_right(starts, s.stop - 1))
            for s, starts in zip(box, self._starts)
        ]
        for index in itertools.product(*spans):
            block = self._block(index)
            source, target = [], []
            for axis, i in enumerate(index):
                first = self._starts[axis][i]
                lo = max(box[axis].start, first)
                hi = min(box[axis].stop, self._starts[axis][i + 1])
                source.append(slice(lo - first, hi - first))
                target.append(slice(lo - box[axis].start, hi - box[axis].start))
            out[tuple(target)] = block[tuple(source)]
        return out

    def _block(self, index: tuple[int, ...]) -> np.ndarray:
        block = self._blocks.get(index)
        if block is not None:
            self._blocks.move_to_end(index)
            return block
        block = np.asarray(self.data.blocks[index].compute(scheduler=SYNCHRONOUS))
        self.reads += 1
        self._blocks[index] = block
        self._bytes += block.nbytes
        while self._bytes > self.max_bytes and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._bytes -= old.nbytes
        return block
