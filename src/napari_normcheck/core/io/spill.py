"""Raw arrays moved to disk and back (spilled work in progress), bit for bit.

A :class:`SpillFile` keeps the arrays of one store (unfinished chunks, overlap slabs) in one
scratch file and reuses the space of those read back. Spilling comes in cycles (a z-layer's
chunks go out and come back, then the next layer's), and writing into a file's cached pages again
is faster than writing new files, which the kernel must give new pages and the file system new
blocks (measured here: 8 GB/s into the pages already there, 1-2 GB/s into new files, 0.5 GB/s
for a process's first writes).

Written through the file object rather than ``ndarray.tofile``: a full disk then raises
``OSError(ENOSPC)``, which the run reports as "no space left", instead of ``tofile``'s errno-less
"N requested and 0 written".
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import BinaryIO

import numpy as np


class SpillFile:
    """Arrays by key in one file, the space of each array read back reused for the next.

    Parameters
    ----------
    path : path-like
        The file (its folder is created on the first write; the file is removed by :meth:`close`).

    Notes
    -----
    Space read back is reused for the next arrays: the smallest free space that holds an array
    (what is left of it stays free), and free neighbours merged. Reused only by size, the overlap
    slabs of 64x1024x1024 voxels (faces of several shapes) grew their file to 864 MB for 1065 MB
    written, and writing into new file pages is several times slower than into cached ones. One
    thread uses a file at a time.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: BinaryIO | None = None
        self._end = 0
        self._free: dict[int, int] = {}  # offset -> bytes of free space there (no two adjacent)
        self._entries: dict[Hashable, tuple[int, tuple[int, ...], np.dtype]] = {}
        self._staging: np.ndarray | None = None  # strided arrays are made contiguous here

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        """Keys of the arrays on disk."""
        return list(self._entries)

    def write(self, key: Hashable, array: np.ndarray) -> None:
        """Write ``array``'s values in C order under ``key`` (shape and dtype kept in memory).

        A strided view (an overlap slab cut from a tile's box) is first copied into memory kept
        for that from write to write: a new array each time cost more in page faults than the
        write itself (slabs went out at 0.5 GB/s against 1.8 GB/s for contiguous chunks).
        """
        values = array if array.flags.c_contiguous else self._staged(array)
        data = memoryview(values).cast("B")
        offset = self._allocate(data.nbytes)
        try:
            file = self._open()
            file.seek(offset)
            done = 0
            while done < data.nbytes:
                done += file.write(data[done:])
        except BaseException:
            self._release(offset, data.nbytes)
            raise
        self._entries[key] = (offset, values.shape, values.dtype)

    def read(
        self, key: Hashable, index: tuple[slice, ...] | None = None, keep: bool = False
    ) -> np.ndarray:
        """The array under ``key`` (or its part ``index``); its space is freed unless ``keep``.

        A part is read through a memory map: only its pages come from disk.
        """
        offset, shape, dtype = self._entries[key]
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if index is None:
            values = np.empty(shape, dtype=dtype)
            buffer = memoryview(values).cast("B")
            file = self._open()
            file.seek(offset)
            done = 0
            while done < nbytes:
                got = file.readinto(buffer[done:])
                if not got:
                    raise OSError(f"spill file {self.path} ended early")
                done += got
        else:
            mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
            values = np.array(mapped[index])
            del mapped
        if not keep:
            del self._entries[key]
            self._release(offset, nbytes)
        return values

    def close(self) -> None:
        """Close and remove the file; every array in it is dropped."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
        self._entries.clear()
        self._free.clear()
        self._end = 0
        self._staging = None

    def _staged(self, array: np.ndarray) -> np.ndarray:
        """``array``'s values, C-contiguous, in the staging memory (grown when too small)."""
        if self._staging is None or self._staging.nbytes < array.nbytes:
            self._staging = None  # the old memory goes before the larger is allocated
            self._staging = np.empty(array.nbytes, dtype=np.uint8)
        staged = self._staging[: array.nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(staged, array)
        return staged

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w+b", buffering=0)  # noqa: SIM115 (closed by close())
        return self._file

    def _allocate(self, nbytes: int) -> int:
        fits = [(size, offset) for offset, size in self._free.items() if size >= nbytes > 0]
        if fits:
            size, offset = min(fits)
            del self._free[offset]
            if size > nbytes:
                self._free[offset + nbytes] = size - nbytes
            return offset
        offset = self._end
        self._end += nbytes
        return offset

    def _release(self, offset: int, nbytes: int) -> None:
        if nbytes == 0:
            return
        end = offset + nbytes + self._free.pop(offset + nbytes, 0)
        before = next((o for o, size in self._free.items() if o + size == offset), None)
        if before is not None:
            offset = before
            del self._free[before]
        if end == self._end:
            self._end = offset  # free space at the end: the next array goes there
        else:
            self._free[offset] = end - offset
