"""Plan the tiles of a run: pure NumPy, deterministic, no data and no model.

Two kinds of plan share one description (:class:`TilePlan`):

- ``constant`` / ``gaussian`` blending: the scan positions of MONAI's ``sliding_window_inference`` for the
  same tile and overlap, on the region of interest padded symmetrically to at least one tile, as MONAI
  pads. Every tile's prediction is weighted by an importance map and averaged where tiles overlap.
- ``crop``: a regular grid of inner blocks of ``tile`` voxels; the model sees each block with ``halo``
  voxels of real context on each side (reflect padding only beyond the volume border) and only the inner
  block is written, without blending.

Coordinates are volume voxel coordinates ``(z, y, x)``; a 2D model runs on tiles of one z-plane.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from napari_normcheck.core.base.errors import NormcheckError

BlendMode = Literal["constant", "gaussian", "crop"]
Box = tuple[tuple[int, int, int], tuple[int, int, int]]


@dataclass(frozen=True)
class Tile:
    """One tile of a plan.

    Attributes
    ----------
    index : int
        Position in the scan order (the order in which tiles are predicted and blended).
    grid : tuple of int
        ``(iz, iy, ix)`` position in the tile grid.
    window_start : tuple of int
        First voxel of the model's input window (may lie outside the volume: padded).
    write_start, write_stop : tuple of int
        The box of output voxels this tile contributes to, inside the region of interest.
    """

    index: int
    grid: tuple[int, int, int]
    window_start: tuple[int, int, int]
    write_start: tuple[int, int, int]
    write_stop: tuple[int, int, int]


@dataclass(frozen=True)
class TilePlan:
    """Where every tile of a run lies, and how outputs are chunked.

    Attributes
    ----------
    volume_shape : tuple of int
        Spatial shape ``(Z, Y, X)`` of the whole volume.
    roi_start, roi_stop : tuple of int
        The region of interest; outputs cover exactly this box.
    tile : tuple of int
        Tile shape (blend modes: the model's window; crop mode: the inner block).
    window_shape : tuple of int
        Shape of the model input: ``tile`` in blend modes, ``tile + 2 * halo`` in crop mode.
    halo : tuple of int
        Context on each side in crop mode; zeros in blend modes.
    overlap : float
        Fraction of a tile shared with its neighbour (blend modes).
    blend : {"constant", "gaussian", "crop"}
        How tiles are combined.
    grid_shape : tuple of int
        Number of tiles along ``(z, y, x)``.
    window_starts : numpy.ndarray
        ``(n_tiles, 3)`` window starts in scan order (z slowest, as MONAI).
    chunk_shape : tuple of int
        Spatial chunk shape of the outputs, following the tile grid.
    """

    volume_shape: tuple[int, int, int]
    roi_start: tuple[int, int, int]
    roi_stop: tuple[int, int, int]
    tile: tuple[int, int, int]
    window_shape: tuple[int, int, int]
    halo: tuple[int, int, int]
    overlap: float
    blend: BlendMode
    grid_shape: tuple[int, int, int]
    window_starts: np.ndarray
    grid_positions: np.ndarray
    chunk_shape: tuple[int, int, int]

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return len(self.window_starts)

    @property
    def roi_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the region of interest (and of the outputs)."""
        return tuple(b - a for a, b in zip(self.roi_start, self.roi_stop))  # type: ignore[return-value]

    @property
    def chunk_grid(self) -> tuple[int, int, int]:
        """Number of output chunks along ``(z, y, x)``."""
        return tuple(-(-s // c) for s, c in zip(self.roi_shape, self.chunk_shape))  # type: ignore[return-value]

    def get_tile(self, index: int) -> Tile:
        """Return tile ``index`` with its window and write box."""
        start = tuple(int(v) for v in self.window_starts[index])
        if self.blend == "crop":
            inner = tuple(s + h for s, h in zip(start, self.halo))
            write_start = inner
            write_stop = tuple(min(a + t, r) for a, t, r in zip(inner, self.tile, self.roi_stop))
        else:
            write_start = tuple(max(s, r) for s, r in zip(start, self.roi_start))
            write_stop = tuple(
                min(s + w, r) for s, w, r in zip(start, self.window_shape, self.roi_stop)
            )
        return Tile(
            index=index,
            grid=tuple(int(v) for v in self.grid_positions[index]),  # type: ignore[arg-type]
            window_start=start,  # type: ignore[arg-type]
            write_start=write_start,  # type: ignore[arg-type]
            write_stop=write_stop,  # type: ignore[arg-type]
        )

    def tiles(self) -> list[Tile]:
        """All tiles in scan order."""
        return [self.get_tile(i) for i in range(self.n_tiles)]

    def chunk_range(self, tile: Tile) -> tuple[tuple[int, int], ...]:
        """Output chunk index range ``[lo, hi)`` per axis that ``tile``'s write box touches."""
        return tuple(
            ((a - r) // c, (b - 1 - r) // c + 1)
            for a, b, r, c in zip(
                tile.write_start, tile.write_stop, self.roi_start, self.chunk_shape
            )
        )

    def chunk_contributors(self, tiles: list[int] | None = None) -> np.ndarray:
        """Count, for every output chunk, the tiles that write into it (shape :attr:`chunk_grid`).

        With ``tiles`` only those tiles are counted (a block's task counts the tiles it runs, which
        include every contributor of the block's own chunks).
        """
        counts = np.zeros(self.chunk_grid, dtype=np.int64)
        chosen = range(self.n_tiles) if tiles is None else tiles
        for tile in (self.get_tile(i) for i in chosen):
            (z0, z1), (y0, y1), (x0, x1) = self.chunk_range(tile)
            counts[z0:z1, y0:y1, x0:x1] += 1
        return counts

    def to_dict(self) -> dict:
        """A JSON-ready description (stored with the outputs)."""
        return {
            "volume_shape": list(self.volume_shape),
            "roi_start": list(self.roi_start),
            "roi_stop": list(self.roi_stop),
            "tile": list(self.tile),
            "window_shape": list(self.window_shape),
            "halo": list(self.halo),
            "overlap": self.overlap,
            "blend": self.blend,
            "grid_shape": list(self.grid_shape),
            "n_tiles": self.n_tiles,
            "chunk_shape": list(self.chunk_shape),
        }


def monai_scan_starts(image_size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis, exactly as MONAI's ``dense_patch_slices`` places them.

    Parameters
    ----------
    image_size : int
        Axis length after padding to at least ``roi``.
    roi : int
        Tile length along the axis.
    overlap : float
        Overlap fraction in ``[0, 1)``.

    Returns
    -------
    list of int
        Starts in scan order.
    """
    interval = roi if roi == image_size else max(int(roi * (1 - overlap)), 1)
    count = math.ceil(image_size / interval)
    n_scan = next((d + 1 for d in range(count) if d * interval + roi >= image_size), 1)
    return [i * interval - max(i * interval + roi - image_size, 0) for i in range(n_scan)]


def scan_interval(image_size: int, roi: int, overlap: float) -> int:
    """MONAI's scan interval along one axis (``_get_scan_interval``)."""
    return roi if roi == image_size else max(int(roi * (1 - overlap)), 1)


def plan_tiles(
    volume_shape: tuple[int, int, int],
    tile: tuple[int, int, int],
    *,
    overlap: float = 0.25,
    blend: BlendMode = "gaussian",
    halo: tuple[int, int, int] = (0, 0, 0),
    roi: tuple[tuple[int, int], ...] | None = None,
) -> TilePlan:
    """Plan the tiles of a run over ``volume_shape``.

    Parameters
    ----------
    volume_shape : tuple of int
        Spatial shape ``(Z, Y, X)`` of the volume.
    tile : tuple of int
        Tile shape ``(tz, ty, tx)``: the model window in blend modes, the inner block in crop mode.
        A 2D model uses ``tz = 1``.
    overlap : float
        Overlap fraction between neighbouring tiles, in ``[0, 1)`` (blend modes; ignored in crop mode).
    blend : {"constant", "gaussian", "crop"}
        Stitching mode.
    halo : tuple of int
        Context voxels on each side of a tile in crop mode.
    roi : tuple of (start, stop) pairs, optional
        Region of interest per axis; the whole volume by default.

    Returns
    -------
    TilePlan
        The deterministic plan.

    Raises
    ------
    NormcheckError
        For an empty or out-of-volume ROI, a tile below one voxel, or an overlap outside ``[0, 1)``.
    """
    volume_shape = tuple(int(s) for s in volume_shape)
    tile = tuple(int(t) for t in tile)
    halo = tuple(int(h) for h in halo)
    if len(tile) != 3 or len(halo) != 3:
        raise NormcheckError(f"tile and halo need 3 values (z, y, x); got tile={tile}, halo={halo}")
    if min(tile) < 1:
        raise NormcheckError(f"tile {tile} has a side below one voxel; give positive sides")
    if min(halo) < 0:
        raise NormcheckError(f"halo {halo} is negative; give sides >= 0")
    if not 0 <= overlap < 1:
        raise NormcheckError(f"overlap {overlap} is outside [0, 1); use e.g. --overlap 0.25")
    if blend not in ("constant", "gaussian", "crop"):
        raise NormcheckError(f"unknown blend mode {blend!r}; use constant, gaussian or crop")
    roi_start, roi_stop = _check_roi(volume_shape, roi)
    roi_shape = tuple(b - a for a, b in zip(roi_start, roi_stop))

    if blend == "crop":
        axis_starts = [
            [r + k * t - h for k in range(math.ceil(n / t))]
            for r, n, t, h in zip(roi_start, roi_shape, tile, halo)
        ]
        window_shape = tuple(t + 2 * h for t, h in zip(tile, halo))
        chunk_shape = tuple(min(t, n) for t, n in zip(tile, roi_shape))
    else:
        halo = (0, 0, 0)
        window_shape = tile
        axis_starts = []
        chunk_shape_list = []
        for r, n, t in zip(roi_start, roi_shape, tile):
            image_size = max(n, t)
            pad_lo = (image_size - n) // 2
            axis_starts.append([r - pad_lo + s for s in monai_scan_starts(image_size, t, overlap)])
            chunk_shape_list.append(min(scan_interval(image_size, t, overlap), n))
        chunk_shape = tuple(chunk_shape_list)

    grids = np.meshgrid(*[np.arange(len(s)) for s in axis_starts], indexing="ij")
    grid_positions = np.stack([g.ravel() for g in grids], axis=1)
    window_starts = np.stack(
        [np.asarray(axis_starts[d])[grid_positions[:, d]] for d in range(3)], axis=1
    )
    return TilePlan(
        volume_shape=volume_shape,  # type: ignore[arg-type]
        roi_start=roi_start,
        roi_stop=roi_stop,
        tile=tile,  # type: ignore[arg-type]
        window_shape=window_shape,  # type: ignore[arg-type]
        halo=halo,  # type: ignore[arg-type]
        overlap=float(overlap),
        blend=blend,
        grid_shape=tuple(len(s) for s in axis_starts),  # type: ignore[arg-type]
        window_starts=window_starts.astype(np.int64),
        grid_positions=grid_positions.astype(np.int64),
        chunk_shape=chunk_shape,  # type: ignore[arg-type]
    )


def _check_roi(
    volume_shape: tuple[int, ...], roi: tuple[tuple[int, int], ...] | None
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    if roi is None:
        return (0, 0, 0), tuple(volume_shape)  # type: ignore[return-value]
    if len(roi) != 3:
        raise NormcheckError(f"ROI needs 3 ranges z0:z1,y0:y1,x0:x1; got {len(roi)}")
    starts, stops = [], []
    for axis, ((a, b), n) in enumerate(zip(roi, volume_shape)):
        name = "zyx"[axis]
        if a < 0 or b > n or a >= b:
            raise NormcheckError(
                f"ROI {name} range {a}:{b} is empty or outside the volume (0:{n} along {name}); "
                "give start < stop inside the volume"
            )
        starts.append(int(a))
        stops.append(int(b))
    return tuple(starts), tuple(stops)  # type: ignore[return-value]


def parse_roi(text: str) -> tuple[tuple[int, int], ...]:
    """Parse ``"z0:z1,y0:y1,x0:x1"`` (a 2D ``"y0:y1,x0:x1"`` gets the whole z range 0:1 only for 2D data).

    Parameters
    ----------
    text : str
        Comma-separated ``start:stop`` ranges.

    Returns
    -------
    tuple of (int, int)
        One pair per axis given.
    """
    pairs = []
    for part in text.split(","):
        try:
            a, b = part.split(":")
            pairs.append((int(a), int(b)))
        except ValueError:
            raise NormcheckError(
                f"cannot read ROI {text!r}; write it as z0:z1,y0:y1,x0:x1, e.g. 0:32,100:356,100:356"
            ) from None
    return tuple(pairs)
