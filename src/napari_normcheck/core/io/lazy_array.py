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
import dask.local
import dask.threaded
import numpy as np
import zarr

# dask's schedulers by function: a scheduler given by name (or none) makes dask import
# dask.distributed (0.1 s of every run's start-up) to look for a client.
SYNCHRONOUS = dask.local.get_sync
THREADS = dask.threaded.get

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


def failing_box(
    data: Any, strides: Sequence[int] | None = None, origin: Sequence[int] | None = None
) -> list[tuple[int, int]] | None:
    """The box of the first block of dask ``data`` that fails to read, in volume coordinates.

    Called after a read failed, to name the damaged chunk rather than the whole region read.

    Parameters
    ----------
    data : dask.array.Array
        The data read (or a strided view of it); other arrays give ``None``.
    strides : sequence of int, optional
        Steps of a strided view per axis (its voxels map back to ``index * stride``).
    origin : sequence of int, optional
        Where ``data`` starts in the volume per axis.

    Returns
    -------
    list of (int, int) or None
        ``(start, stop)`` per axis, or ``None`` when every block reads.
    """
    if not hasattr(data, "blocks"):
        return None
    strides = list(strides or [1] * data.ndim)
    origin = list(origin or [0] * data.ndim)
    starts = [np.concatenate([[0], np.cumsum(c)]) for c in data.chunks]
    for index in np.ndindex(*data.numblocks):
        try:
            data.blocks[index].compute(scheduler=SYNCHRONOUS)
        except Exception:
            return [
                (o + int(s[i]) * st, o + (int(s[i + 1]) - 1) * st + 1)
                for s, i, st, o in zip(starts, index, strides, origin)
            ]
    return None


def stored_chunk_box(data: Any, box: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The chunk of dask ``data`` (the whole volume) that holds the start of ``box``."""
    if not hasattr(data, "chunks"):
        return list(box)
    chunk = []
    for (start, _stop), sizes in zip(box, data.chunks):
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        i = int(np.searchsorted(bounds, start, side="right")) - 1
        chunk.append((int(bounds[i]), int(bounds[min(i + 1, len(bounds) - 1)])))
    return chunk


def describe_box(box: Sequence[tuple[int, int]]) -> str:
    """``z a:b, y c:d, x e:f`` of a ``(C, Z, Y, X)`` box (channels left out)."""
    names = "czyx"[-len(box) :]
    return ", ".join(f"{n} {a}:{b}" for n, (a, b) in zip(names, box) if n != "c")
