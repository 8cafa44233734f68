"""Multiscale outputs: 2x mean-downsampled levels in y and x, built as level-0 chunks finish.

Level ``k`` halves y and x ``k`` times (z is kept: EM volumes are anisotropic and thin in z). Its
chunks are the level-0 chunks divided by ``2**k`` in y and x, so every finished level-0 chunk maps
onto exactly one chunk of every level: the levels are written with the chunk, by whoever writes the
chunk (the writer thread, a distributed block), never by a second pass over the volume, and an
interrupted run resumes with consistent levels. Each level's voxel is the mean of the level-0 box
it covers, computed from the float values before they are rounded for storage.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCREEN_SIDE = 1024


def n_levels(shape_yx: tuple[int, int], chunk_yx: tuple[int, int], screen: int) -> int:
    """Levels beyond 0 until y and x fit in ``screen`` voxels, as far as the chunks allow.

    Parameters
    ----------
    shape_yx : tuple of int
        Level-0 size in y and x.
    chunk_yx : tuple of int
        Level-0 chunk size in y and x: level ``k`` needs both divisible by ``2**k``.
    screen : int
        The side a whole level should fit in.

    Returns
    -------
    int
        The number of extra levels (0: level 0 only).
    """
    levels = 0
    while max(-(-n // 2**levels) for n in shape_yx) > screen:
        factor = 2 ** (levels + 1)
        if any(c % factor for c in chunk_yx):
            break
        levels += 1
    return levels


def downsample_means(values: Any, levels: int) -> list[Any]:
    """Means over ``2**k`` x ``2**k`` boxes in the last two axes, for ``k = 1 .. levels``.

    Partial boxes at the high edges average the voxels they hold. Sums are cascaded level by level
    with voxel counts, so every level is the exact mean of its level-0 box (up to float32 rounding).
    ``values`` is a NumPy array or a torch tensor (the means are computed where it is, with the same
    float32 additions and divisions, so both give the same bits).
    """
    out = []
    if isinstance(values, np.ndarray):
        sums = np.asarray(values, dtype=np.float32)
        counts = np.ones(sums.shape[-2:], dtype=np.float32)
    else:
        import torch

        sums = values.float()
        counts = torch.ones(sums.shape[-2:], dtype=torch.float32, device=sums.device)
    for _ in range(levels):
        sums = _pair_sum(_pair_sum(sums, -2), -1)
        counts = _pair_sum(_pair_sum(counts, -2), -1)
        out.append(sums / counts)
    return out


def _pair_sum(values: Any, axis: int) -> Any:
    """Sum neighbouring pairs along ``axis`` (an odd last element is kept on its own)."""
    n = values.shape[axis]
    first = _take(values, axis, slice(0, n - 1, 2))
    summed = first + _take(values, axis, slice(1, n, 2))
    if n % 2:
        last = _take(values, axis, slice(n - 1, n))
        if isinstance(values, np.ndarray):
            summed = np.concatenate([summed, last], axis=axis)
        else:
            import torch

            summed = torch.cat([summed, last], dim=axis)
    return summed


def _take(values: Any, axis: int, part: slice) -> Any:
    index = [slice(None)] * values.ndim
    index[axis] = part
    return values[tuple(index)]


def level_transform(
    scale: tuple[float, ...], translation: tuple[float, ...], level: int
) -> tuple[list[float], list[float]]:
    """Scale and translation of ``level`` from level 0's (last two axes are y and x).

    A level-``k`` voxel covers ``2**k`` level-0 voxels per axis; its centre lies half that span
    minus half a voxel beyond the first one's centre.
    """
    factor = 2**level
    new_scale = [float(s) for s in scale]
    new_translation = [float(t) for t in translation]
    for axis in (-2, -1):
        new_translation[axis] += (factor - 1) / 2 * new_scale[axis]
        new_scale[axis] *= factor
    return new_scale, new_translation


class Pyramid:
    """The levels of one output image, level 0 first; indexing reads and writes level 0.

    Parameters
    ----------
    arrays : list of zarr.Array
        Level 0, then the downsampled levels.
    """

    def __init__(self, arrays: list[Any]) -> None:
        self.arrays = arrays
        # zarr compares every chunk it writes with the fill value, to skip those equal to it: a
        # pass over every output (write_wait 1.3-1.7 s -> 0.5-1.0 s of a 9 s run, tile 64x128x128).
        # Values with no nonzero (counted several times faster) go through an array that skips
        # (or removes) chunks of the fill value; every other write through one that does not look.
        self._writes = [array.with_config({"write_empty_chunks": True}) for array in arrays]

    @property
    def shape(self) -> tuple[int, ...]:
        """Level 0's shape."""
        return tuple(self.arrays[0].shape)

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype."""
        return self.arrays[0].dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.arrays[0][key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._write(0, key, np.asarray(value))

    def write_chunk(self, box: tuple[slice, ...], values: Any, store_as) -> None:
        """Write ``values`` (float) at level-0 ``box`` and its means at every level.

        Parameters
        ----------
        box : tuple of slice
            Level-0 slices (all axes); y and x start on a chunk boundary.
        values : numpy.ndarray or torch.Tensor
            The float values of the box (the means are computed where they are).
        store_as : callable
            Converts float values to a host array of the stored dtype.
        """
        write_all(self.chunk_writes(box, values, store_as))

    def chunk_writes(self, box: tuple[slice, ...], values: Any, store_as) -> list[Write]:
        """The writes of :meth:`write_chunk`, for :func:`write_all` to make with others."""
        writes = [self._write_of(0, box, store_as(values))]
        if len(self.arrays) == 1:
            return writes
        for level, means in enumerate(downsample_means(values, len(self.arrays) - 1), start=1):
            factor = 2**level
            lead, (y, x) = box[:-2], box[-2:]
            y0, x0 = y.start // factor, x.start // factor
            target = (*lead, slice(y0, y0 + means.shape[-2]), slice(x0, x0 + means.shape[-1]))
            writes.append(self._write_of(level, target, store_as(means)))
        return writes

    def _write(self, level: int, key: Any, stored: np.ndarray) -> None:
        write_all([self._write_of(level, key, stored)])

    def _write_of(self, level: int, key: Any, stored: np.ndarray) -> Write:
        """Chunks of the fill value (zero) are left out (or removed), as zarr does."""
        if np.count_nonzero(stored) == 0 and not self.arrays[level].fill_value:
            return self.arrays[level], key, stored
        return self._writes[level], key, stored


# An array, where in it, and the stored values.
Write = tuple[Any, Any, np.ndarray]


def write_all(writes: list[Write]) -> None:
    """Make ``writes`` at once, in one call into zarr's event loop.

    Their chunks are compressed and written side by side (blosc and file writes release the GIL)
    instead of one round trip each. The writes must not share a chunk.
    """
    if len(writes) == 1 or not all(hasattr(array, "async_array") for array, _, _ in writes):
        for array, key, stored in writes:  # a zarr without the async view: one at a time
            array[key] = stored
        return
    import asyncio

    from zarr.core.sync import sync

    async def write() -> None:
        await asyncio.gather(*(array.async_array.setitem(key, v) for array, key, v in writes))

    sync(write())
