"""Lazy dask arrays over zarr and contiguous sources, chunked so that nothing is read twice.

Zarr arrays keep their stored chunks (merged when there are too many); contiguous arrays
(memory-mapped ``.npy``, in-memory NumPy) are cut into contiguous runs of bytes and sliced chunk
by chunk, never copied whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

# Contiguous sources (.npy, in-memory arrays) are cut into chunks of about this many bytes.
_CONTIGUOUS_CHUNK_BYTES = 64 * 2**20
# Above this many native zarr chunks the dask graph gets slow to slice, so chunks are merged.
_MAX_DASK_BLOCKS = 100_000


def _zarr_dask_chunks(array: zarr.Array) -> tuple[int, ...]:
    """Dask chunks matching the stored chunks (whole shards when sharded), merged if too many."""
    native = tuple(getattr(array, "shards", None) or array.chunks)
    n_blocks = math.prod(math.ceil(n / c) for n, c in zip(array.shape, native, strict=True))
    if n_blocks <= _MAX_DASK_BLOCKS:
        return native
    # Merged chunks stay multiples of the stored ones so that no stored chunk is read twice.
    merged = da.core.normalize_chunks(
        "auto", array.shape, dtype=array.dtype, previous_chunks=native
    )
    return tuple(axis_chunks[0] for axis_chunks in merged)


class _NoCopySlicer:
    """Slicing-only view of an array, so that ``da.from_array`` reads it chunk by chunk.

    dask >= 2024.12 copies any array-like with a ``copy`` method inside ``from_array``
    (dask/dask#11524), which reads a whole memory-mapped ``.npy`` into memory (dask/dask#11850).
    This wrapper has no ``copy``; each chunk is sliced from the original when it is computed.
    """

    def __init__(self, array: Any) -> None:
        self._array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array[key])


def _from_contiguous(array: Any) -> da.Array:
    """Wrap a C- or Fortran-ordered array (memmap, ndarray) in chunks that are contiguous runs."""
    shape = tuple(int(n) for n in array.shape)
    flags = getattr(array, "flags", None)
    fortran = bool(flags is not None and flags.f_contiguous and not flags.c_contiguous)
    itemsize = np.dtype(array.dtype).itemsize
    chunks = _contiguous_chunks(shape[::-1] if fortran else shape, itemsize)
    meta = np.empty((0,) * len(shape), dtype=array.dtype)
    # name=False: no hashing of the whole array for a deterministic key.
    return da.from_array(
        _NoCopySlicer(array),
        chunks=chunks[::-1] if fortran else chunks,
        name=False,
        meta=meta,
    )


def _contiguous_chunks(
    shape: Sequence[int], itemsize: int, target_bytes: int = _CONTIGUOUS_CHUNK_BYTES
) -> tuple[int, ...]:
    """Chunks for a C-ordered array: whole trailing axes, cut along the leading ones.

    Parameters
    ----------
    shape : sequence of int
        Array shape.
    itemsize : int
        Bytes per element.
    target_bytes : int
        Approximate chunk size in bytes; a single trailing row may exceed it.

    Returns
    -------
    tuple of int
        One chunk length per axis, so every chunk is one contiguous run of bytes on disk.
    """
    chunks = [1] * len(shape)
    inner_bytes = itemsize
    for axis in reversed(range(len(shape))):
        if inner_bytes * shape[axis] <= target_bytes or axis == len(shape) - 1:
            chunks[axis] = max(1, shape[axis])
            inner_bytes *= max(1, shape[axis])
        else:
            chunks[axis] = max(1, min(shape[axis], target_bytes // inner_bytes))
            break
    return tuple(chunks)
