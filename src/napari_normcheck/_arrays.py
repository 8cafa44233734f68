"""Array-likes napari slices for the result layers: a store's output read lazily, slice by slice.

No Qt and no napari: :class:`LiveChannel` is handed to napari as layer data; the GUI decides
when its slices are read off-thread (:meth:`LiveChannel.read_ahead`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np


class FollowingArray:
    """A zarr array of a store that may move while it is read: the path of a run being written.

    A run that overwrites an earlier output writes ``OUT.zarr.inprogress`` and renames it to
    ``OUT.zarr`` when it completes; a layer shown during the run must keep working afterwards. Reads
    go to the first of ``paths`` that holds the array, and are retried there when the folder moved
    (or a chunk was read while being written).

    Parameters
    ----------
    paths : list of path-like
        Store folders to try, in order.
    component : str
        The array inside the store, e.g. ``"pred_eval/0"``.
    """

    def __init__(self, paths: list[Path], component: str) -> None:
        self.paths = [Path(p) for p in paths]
        self.component = component
        self.array = self._open()
        self.shape = tuple(self.array.shape)
        self.dtype = self.array.dtype
        self.ndim = len(self.shape)
        self.chunks = tuple(self.array.chunks)

    def _open(self) -> Any:
        import zarr

        for path in self.paths:
            if (path / self.component).exists():
                self.opened = path / self.component
                return zarr.open_array(str(self.opened), mode="r")
        raise FileNotFoundError(f"{self.component} is in none of {[str(p) for p in self.paths]}")

    def __getitem__(self, key: Any) -> np.ndarray:
        if not self.opened.exists():
            # Moved away: zarr would read the missing chunks as fill values, not fail.
            with contextlib.suppress(FileNotFoundError):
                self.array = self._open()
        for attempt in range(_READ_ATTEMPTS):
            try:
                return np.asarray(self.array[key])
            except Exception:
                if attempt == _READ_ATTEMPTS - 1:
                    raise
                # The store was swapped in place (or a chunk was half written): look again.
                time.sleep(0.05 * (attempt + 1))
                with contextlib.suppress(FileNotFoundError):
                    self.array = self._open()
        raise AssertionError("unreachable")


_READ_ATTEMPTS = 4


#: Largest slice (in bytes) read ahead off the GUI thread; larger views (3D rendering of a big
#: volume) are read by napari itself when it slices.
PREFETCH_BYTES = 256 * 2**20


def _key_id(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """A hashable form of an indexing key (slices are not hashable before Python 3.12)."""
    return tuple(
        ("s", k.start, k.stop, k.step) if isinstance(k, slice) else ("e",) if k is Ellipsis else k
        for k in key
    )


class LiveChannel:
    """One channel of a store output, as an array napari slices; reads can be prepared off-thread.

    napari reads the displayed slice on the GUI thread when it re-slices a layer. While a run writes
    the store, :meth:`read_ahead` (any thread) reads the slice napari asked for last and
    :meth:`use` hands the result over, so the following ``layer.refresh()`` on the GUI thread
    finds it in memory instead of waiting on zarr (and on the GIL the engine holds). Any other
    slice (the user moved a slider) is read directly, as napari does with lazy data.

    Parameters
    ----------
    source : FollowingArray
        The output's level ``0``, ``(C, Z, Y, X)``.
    channel : int
        The channel shown.
    """

    def __init__(self, source: FollowingArray, channel: int) -> None:
        self.source = source
        self.channel = channel
        self.shape = tuple(source.shape[1:])
        # Unsigned integers hold 0..1 scaled to their range (uint8 probabilities): napari gets the
        # values in their meaning's units, so its status bar, colour bar and contrast read 0..1.
        self.divisor = unit_divisor(source.dtype)
        self.dtype = np.dtype(np.float32) if self.divisor else np.dtype(source.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(source.chunks[1:])
        self.size = int(np.prod(self.shape))
        self.last_key: tuple[Any, ...] | None = None
        self._prepared: dict[tuple[Any, ...], np.ndarray] = {}

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        prepared = self._prepared.get(_key_id(key))
        if prepared is not None:
            return prepared
        self.last_key = key
        return self.read_unit(key)

    def read_unit(self, key: tuple[Any, ...]) -> np.ndarray:
        """The stored values at ``key`` in their meaning's units (0..1 for stored integers)."""
        return to_unit(self.source[(self.channel, *key)], self.divisor)

    def with_channel(self, channel: int) -> LiveChannel:
        """The same level showing another channel (no store is opened)."""
        return LiveChannel(self.source, channel)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = to_unit(self.source[self.channel], self.divisor)
        return array if dtype is None else array.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.shape[0]

    def read_ahead(self) -> dict[tuple[Any, ...], np.ndarray]:
        """Read the slice napari asked for last (any thread); pass the result to :meth:`use`."""
        key = self.last_key
        if key is None:
            return {}
        try:
            # A zero-stride view: the slice's size without allocating the volume.
            view = np.broadcast_to(np.empty((), dtype=bool), self.shape)[key]
            expected = view.size * self.dtype.itemsize
        except (IndexError, TypeError, ValueError):
            return {}
        if expected > PREFETCH_BYTES:
            return {}
        return {_key_id(key): self.read_unit(key)}

    def value_range(self) -> tuple[float, float]:
        """Finite min and max of the slice napari shows (the middle plane if none yet); any thread.

        Contrast limits of outputs without a fixed range (logits), without scanning the volume.
        """
        key = self.last_key if self.last_key is not None else (self.shape[0] // 2,)
        values = np.asarray(self.read_unit(key), dtype=float)
        values = values[np.isfinite(values)]
        if not values.size:
            return (0.0, 1.0)
        low, high = float(values.min()), float(values.max())
        return (low, high if high > low else low + 1.0)

    def use(self, prepared: dict[tuple[Any, ...], np.ndarray]) -> None:
        """Serve these slices from memory until the next call (an empty dict: read the store)."""
        self._prepared = prepared


def unit_divisor(dtype: Any) -> float | None:
    """What stored values of ``dtype`` are divided by to read 0..1: an unsigned integer's maximum."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind == "u" else None


def to_unit(values: Any, divisor: float | None) -> np.ndarray:
    """``values`` divided by ``divisor`` as float32 (unchanged when ``divisor`` is ``None``)."""
    if divisor is None:
        return np.asarray(values)
    return np.multiply(values, np.float32(1.0 / divisor), dtype=np.float32)


def output_sources(
    path: str | Path,
    name: str,
    level_paths: list[str] | tuple[str, ...] = ("0",),
    fallback: str | Path | None = None,
) -> list[FollowingArray]:
    """Every level of output ``name`` as a :class:`FollowingArray` ``(C, Z, Y, X)``, finest first.

    Parameters
    ----------
    path : path-like
        The store.
    name : str
        The output group.
    level_paths : sequence of str
        The levels' array paths inside the group (its OME-Zarr ``datasets``).
    fallback : path-like, optional
        Where the store ends up when ``path`` is a run's ``.inprogress`` folder.
    """
    paths = [Path(path)] + ([Path(fallback)] if fallback is not None else [])
    return [FollowingArray(paths, f"{name}/{level}") for level in level_paths]


def channel_pyramid(sources: list[FollowingArray], channel: int) -> list[LiveChannel]:
    """One channel of every level: the data of a (multiscale) napari image layer."""
    return [LiveChannel(source, channel) for source in sources]


def live_channels(
    path: str | Path, name: str, fallback: str | Path | None = None
) -> list[LiveChannel]:
    """Every channel of output ``name`` (level ``0``) as a :class:`LiveChannel`."""
    (source,) = output_sources(path, name, ("0",), fallback)
    return [LiveChannel(source, channel) for channel in range(source.shape[0])]


class EmptyChannel:
    """An all-zero stand-in with an output's shape, shown until the run's store exists.

    Parameters
    ----------
    shape : tuple of int
        ``(Z, Y, X)``.
    dtype : str or numpy.dtype
        The output's data type.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.last_key: tuple[Any, ...] | None = None  # what napari shows (read ahead on repoint)

    def __getitem__(self, key: Any) -> np.ndarray:
        self.last_key = key if isinstance(key, tuple) else (key,)
        view = np.broadcast_to(np.zeros((), dtype=self.dtype), self.shape)[key]
        return np.zeros(np.shape(view), dtype=self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.zeros(self.shape, dtype=dtype or self.dtype)

    def __len__(self) -> int:
        return self.shape[0]


class TileCellMap:
    """One channel of a per-tile grid drawn over the region: each tile's cell at its own voxels.

    The stored grids hold one cell per tile; drawn with a uniform scale they would not line up
    with the tiles (the last tile is flush with the region's edge, its start off the regular step).
    Here cell ``(iz, iy, ix)`` covers, per axis, the voxels from its tile's write start to the
    next tile's start (the last cell to the region's edge): its left and top edges lie on the tile
    outlines. Values come from the grid in memory; nothing is read when napari slices.

    Parameters
    ----------
    grid : numpy.ndarray
        ``(C, tz, ty, tx)``, in the values' units (0..1 for a disparity).
    channel : int
        The channel shown.
    cell_index : tuple of numpy.ndarray
        Per axis, the cell of each voxel of this level (``searchsorted`` of the tiles' starts).
    """

    def __init__(self, grid: np.ndarray, channel: int, cell_index: tuple[np.ndarray, ...]) -> None:
        self.grid = grid
        self.channel = min(max(int(channel), 0), grid.shape[0] - 1)
        self.values = np.ascontiguousarray(grid[self.channel], dtype=np.float32)
        self.cell_index = cell_index
        self.shape = tuple(len(index) for index in cell_index)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))

    def with_channel(self, channel: int) -> TileCellMap:
        """The same map showing another channel of the grid."""
        return TileCellMap(self.grid, channel, self.cell_index)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = (*key[:at], *(slice(None),) * (self.ndim - len(key) + 1), *key[at + 1 :])
        key = (*key, *(slice(None),) * (self.ndim - len(key)))
        picked = [np.atleast_1d(index[k]) for index, k in zip(self.cell_index, key)]
        cells = self.values[np.ix_(*picked)]
        scalar_axes = tuple(
            d for d, k in enumerate(key) if np.ndim(k) == 0 and not isinstance(k, slice)
        )
        return cells.reshape([n for d, n in enumerate(cells.shape) if d not in scalar_axes])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self[(slice(None),) * self.ndim]
        return array if dtype is None else array.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.shape[0]

    def top(self) -> float:
        """The largest finite value of the channel (0 when none)."""
        finite = self.values[np.isfinite(self.values)]
        return float(finite.max()) if finite.size else 0.0


def cell_index(starts: np.ndarray, size: int, factor: int = 1) -> np.ndarray:
    """Per voxel of an axis downsampled by ``factor``, the cell whose start is the last at or before it.

    Parameters
    ----------
    starts : numpy.ndarray
        The cells' first voxels along the axis (at full resolution, from the region's start),
        increasing.
    size : int
        The axis' length at full resolution.
    factor : int
        The level's downsampling: voxel ``j`` stands for voxels ``j * factor ...``, read at its
        centre.
    """
    centres = np.arange(-(-size // factor)) * factor + (factor - 1) / 2
    index = np.searchsorted(np.asarray(starts, dtype=float), centres, side="right") - 1
    return np.clip(index, 0, len(starts) - 1)


class TileCellStack:
    """Every channel of a per-tile grid drawn over the region: ``(C, Z, Y, X)``, channel first.

    The reader's form of :class:`TileCellMap` (napari shows the channel as a slider).

    Parameters
    ----------
    grid : numpy.ndarray
        ``(C, tz, ty, tx)`` in the values' units.
    cell_index : tuple of numpy.ndarray
        As :class:`TileCellMap`'s.
    """

    def __init__(self, grid: np.ndarray, cell_index: tuple[np.ndarray, ...]) -> None:
        self.maps = [TileCellMap(grid, c, cell_index) for c in range(grid.shape[0])]
        self.shape = (grid.shape[0], *self.maps[0].shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if first is Ellipsis:
            first, rest = slice(None), key
        if isinstance(first, (int, np.integer)):
            return self.maps[int(first)][rest]
        return np.stack([self.maps[c][rest] for c in range(len(self.maps))[first]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self[(slice(None),)]
        return array if dtype is None else array.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.shape[0]
