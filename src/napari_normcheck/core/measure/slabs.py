"""Overlap slabs waiting for their later tile: in memory up to a budget, beyond it on disk.

A tile's predictions on the voxels it shares with a later neighbour are kept until that neighbour
runs. In scan order the neighbours of a whole row (or z-layer) of tiles are pending at once, so
their number grows with the width of the volume; the budget keeps memory bounded whatever the width.
Spilled slabs go to one raw file (:class:`~napari_normcheck.core.io.spill.SpillFile`) and come
back bit for bit, so the mismatch numbers do not depend on the budget. Slabs are NumPy arrays or
torch tensors (on the run's GPU, where the metrics run there); a spilled tensor comes back to its
device.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_normcheck.core.io.spill import SpillFile


class SlabStore:
    """Arrays by key, the least recently stored spilled to ``scratch_dir`` beyond ``max_bytes``.

    Parameters
    ----------
    max_bytes : int or None
        Memory for slabs; ``None`` keeps every slab in memory.
    scratch_dir : path-like or None
        Folder for spilled slabs (created on demand); needed when ``max_bytes`` is set.
    next_use : callable, optional
        ``next_use(key)``: when the slab will be asked for (a tile index). Beyond the budget the
        slab needed last spills (Belady's choice); without it, the least recently stored.
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        scratch_dir: str | Path | None = None,
        next_use: Callable[[tuple[int, int]], int] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.next_use = next_use
        self.scratch_dir = None if scratch_dir is None else Path(scratch_dir)
        self._memory: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._disk = None if self.scratch_dir is None else SpillFile(self.scratch_dir / "slabs.f32")
        # key -> the tensor's device, or None for an array
        self._spilled: dict[tuple[int, int], Any] = {}
        self._bytes = 0
        self.spill_count = 0
        self.spill_seconds = 0.0  # writing and reading spilled slabs

    @property
    def spilled(self) -> list[tuple[int, int]]:
        """Keys of the slabs on disk."""
        return list(self._spilled)

    def put(self, key: tuple[int, int], slab: Any) -> None:
        """Keep a copy of ``slab`` (an array, or a tensor kept on its device) under ``key``."""
        if self._needed_last(key, _nbytes(slab)):
            self._spill(key, slab)  # straight from the caller's view: no copy to drop at once
            return
        if isinstance(slab, np.ndarray):
            copy = np.array(slab, copy=True)
        else:
            import torch

            copy = slab.clone(memory_format=torch.contiguous_format)
        self._memory[key] = copy
        self._bytes += _nbytes(copy)
        while self.max_bytes is not None and self._bytes > self.max_bytes and self._memory:
            if self.next_use is None:
                old_key, old = self._memory.popitem(last=False)
            else:
                old_key = max(self._memory, key=self.next_use)
                old = self._memory.pop(old_key)
            self._bytes -= _nbytes(old)
            self._spill(old_key, old)

    def _needed_last(self, key: tuple[int, int], nbytes: int) -> bool:
        """Whether a new slab would spill as soon as it is stored (it is needed after all others)."""
        if (
            self.max_bytes is None
            or self.next_use is None
            or self._bytes + nbytes <= self.max_bytes
        ):
            return False
        return not self._memory or self.next_use(key) > max(map(self.next_use, self._memory))

    def _spill(self, key: tuple[int, int], slab: Any) -> None:
        t0 = time.perf_counter()
        device = None if isinstance(slab, np.ndarray) else slab.device
        self._disk.write(key, slab if device is None else slab.cpu().numpy())
        self.spill_seconds += time.perf_counter() - t0
        self._spilled[key] = device
        self.spill_count += 1

    def pop(self, key: tuple[int, int]) -> Any:
        """The slab stored under ``key`` (removed), or ``None``."""
        return self.take(key, None, last=True)

    def take(self, key: tuple[int, int], index: tuple[slice, ...] | None, last: bool) -> Any:
        """``slab[index]`` (the whole slab for ``None``) under ``key``, or ``None``; ``last`` removes it.

        One slab can serve several later tiles, each a part of it. A spilled slab is read part by
        part (only the part's bytes come from disk); its space goes with the last part.
        """
        if key in self._memory:
            slab = self._memory[key]
            if last:
                del self._memory[key]
                self._bytes -= _nbytes(slab)
            return slab if index is None else slab[index]
        if key in self._spilled:
            return self._read(key, index, last)
        return None

    def _read(self, key: tuple[int, int], index: tuple[slice, ...] | None, last: bool) -> Any:
        t0 = time.perf_counter()
        device = self._spilled.pop(key) if last else self._spilled[key]
        part = self._disk.read(key, index, keep=not last)
        if device is not None:
            import torch

            part = torch.from_numpy(part).to(device)
        self.spill_seconds += time.perf_counter() - t0
        return part

    def close(self) -> None:
        """Drop every slab and remove the spill file."""
        self._memory.clear()
        self._bytes = 0
        self._spilled.clear()
        if self._disk is not None:
            self._disk.close()


def _nbytes(slab: Any) -> int:
    """Bytes of an array or a tensor."""
    if isinstance(slab, np.ndarray):
        return slab.nbytes
    return slab.numel() * slab.element_size()
