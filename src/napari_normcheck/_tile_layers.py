"""The tiles of a run as napari data: the plan from the store, outlines, edge colours (no Qt).

A ``tiles`` Shapes layer outlines each tile's write box on every z-plane the box spans (napari shows
a shape only on its own plane), in the input's world coordinates; its ``features`` hold, per
outline, the tile index, the plane, the grid position, the hard disparity and whether it is judged,
and each outline's edge colour follows the verdict's rule: the tile's hard disparity on a fixed scale
(:data:`TILE_COLOR_SCALE`, with a legend) where the shown channel is judged (enough foreground),
:data:`NOT_JUDGED_COLOR` where it is not, :data:`UNKNOWN_TILE_COLOR` while the tile has not run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_normcheck.core.base.tiling import Tile, TilePlan

LayerDataTuple = tuple[Any, dict, str]


def plan_from_attrs(attrs: dict[str, Any]) -> TilePlan | None:
    """Rebuild the run's :class:`~napari_normcheck.core.base.tiling.TilePlan` from the root attributes."""
    from napari_normcheck.core.base.tiling import plan_tiles

    plan = attrs.get("plan")
    if not plan:
        return None
    roi = tuple(zip(plan["roi_start"], plan["roi_stop"]))
    return plan_tiles(
        tuple(plan["volume_shape"]),
        tuple(plan["tile"]),
        overlap=plan["overlap"],
        blend=plan["blend"],
        halo=tuple(plan["halo"]),
        roi=roi,  # type: ignore[arg-type]
    )


def input_translation(
    plan: TilePlan, scale: tuple[float, ...], roi_translation: tuple[float, ...]
) -> tuple[float, ...]:
    """World position of the input volume's voxel ``(0, 0, 0)`` from the outputs' (ROI) origin."""
    return tuple(t - r * s for t, r, s in zip(roi_translation, plan.roi_start, scale))


def tile_box(tile: Tile, z: int | None = None) -> np.ndarray:
    """The write box of ``tile`` as a rectangle ``(4, 3)`` on plane ``z``, in voxel coordinates.

    Edges lie on voxel borders (half a voxel outside the centres), so neighbouring boxes touch.
    The plane is the box's centre plane when ``z`` is not given.
    """
    if z is None:
        z = (tile.write_start[0] + tile.write_stop[0] - 1) // 2
    y0, x0 = tile.write_start[1] - 0.5, tile.write_start[2] - 0.5
    y1, x1 = tile.write_stop[1] - 0.5, tile.write_stop[2] - 0.5
    return np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], dtype=float)


#: Most outlines in a tiles layer (napari builds about 2000 a second, off the GUI thread). A plan
#: with more tiles x planes outlines each tile on every k-th plane of its box (and its centre).
MAX_OUTLINES = 20_000


def outline_planes(plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
    """The tile and the z-plane of every outline: each tile on every plane its write box spans.

    Returns
    -------
    tuple of numpy.ndarray
        ``(tile_index, z)``, one entry per outline, tiles in scan order.
    """
    tiles = plan.tiles()
    total = sum(t.write_stop[0] - t.write_start[0] for t in tiles)
    step = max(1, int(np.ceil(total / MAX_OUTLINES)))
    index, planes = [], []
    for tile in tiles:
        z0, z1 = tile.write_start[0], tile.write_stop[0]
        zs = set(range(z0, z1, step)) | {(z0 + z1 - 1) // 2}
        index.extend([tile.index] * len(zs))
        planes.extend(sorted(zs))
    return np.asarray(index, dtype=int), np.asarray(planes, dtype=int)


def tile_center(tile: Tile) -> tuple[float, float, float]:
    """Centre of the tile's write box in voxel coordinates ``(z, y, x)``."""
    z = (tile.write_start[0] + tile.write_stop[0] - 1) // 2
    return (
        float(z),
        (tile.write_start[1] + tile.write_stop[1] - 1) / 2,
        (tile.write_start[2] + tile.write_stop[2] - 1) / 2,
    )


def to_world(
    voxel: tuple[float, ...], scale: tuple[float, ...], translate: tuple[float, ...]
) -> tuple[float, ...]:
    """Voxel coordinates to world coordinates."""
    return tuple(t + v * s for v, s, t in zip(voxel, scale, translate))


def tile_features(
    plan: TilePlan, disparity: np.ndarray | None = None, judged: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Feature table of the outlines: tile index, plane, grid position, hard disparity, judged.

    ``disparity`` is NaN where unknown or not judged; ``judged`` is ``True`` unless the tile's
    shown channel has too little foreground (:func:`tile_edge_colors`).
    """
    index, planes = outline_planes(plan)
    tiles = plan.tiles()
    values = np.full(len(tiles), np.nan) if disparity is None else np.asarray(disparity, float)
    flags = np.ones(len(tiles), dtype=bool)
    if judged is not None and len(judged) == len(tiles):
        flags = np.asarray(judged, dtype=bool)
    grid = np.asarray([t.grid for t in tiles], dtype=int).reshape(len(tiles), 3)
    return {
        "tile": index,
        "z": planes,
        "grid_z": grid[index, 0],
        "grid_y": grid[index, 1],
        "grid_x": grid[index, 2],
        "disparity": values[index] if len(values) == len(tiles) else np.full(len(index), np.nan),
        "judged": flags[index],
    }


def outline_edge_colors(
    plan: TilePlan, disparity: np.ndarray | None, judged: np.ndarray | None = None
) -> np.ndarray:
    """RGBA edge colour per outline (its tile's colour, :func:`tile_edge_colors`)."""
    index, _planes = outline_planes(plan)
    return tile_edge_colors(disparity, plan.n_tiles, judged)[index]


#: Edge colour of a tile that has not run yet: a faint light blue, unlike any colour of the scale.
UNKNOWN_TILE_COLOR = (0.6, 0.85, 1.0, 0.45)
#: Edge colour of a tile whose shown channel has too little foreground to judge.
NOT_JUDGED_COLOR = (0.62, 0.62, 0.62, 1.0)
#: The outlines' fixed scale of hard disparity (the verdict's basis): ``(lowest value, colour,
#: legend text)``, the verdict's thresholds (low below 0.02, high from 0.1), the same in every run.
TILE_COLOR_SCALE = (
    (0.0, (1.0, 1.0, 0.0, 1.0), "below 0.02 (low)"),
    (0.02, (1.0, 0.55, 0.0, 1.0), "0.02 to 0.1 (moderate)"),
    (0.1, (1.0, 0.0, 0.0, 1.0), "0.1 and above (high)"),
)


def tile_color_legend() -> list[tuple[tuple[float, ...], str]]:
    """``(colour, text)`` of every outline colour: the fixed scale, not judged, not run yet."""
    return [
        *((color, text) for _low, color, text in TILE_COLOR_SCALE),
        (NOT_JUDGED_COLOR, "not judged (too little foreground)"),
        (UNKNOWN_TILE_COLOR, "not run yet"),
    ]


def tile_edge_colors(
    disparity: np.ndarray | None,
    n_tiles: int | None = None,
    judged: np.ndarray | None = None,
) -> np.ndarray:
    """RGBA edge colour per tile: its hard disparity on the fixed scale :data:`TILE_COLOR_SCALE`.

    Parameters
    ----------
    disparity : numpy.ndarray, optional
        One hard disparity per tile; NaN where not known yet (drawn :data:`UNKNOWN_TILE_COLOR`).
    n_tiles : int, optional
        The number of tiles when ``disparity`` is not given.
    judged : numpy.ndarray of bool, optional
        Per tile, whether its shown channel is judged; ``False`` is drawn in
        :data:`NOT_JUDGED_COLOR` whatever its value (the verdict ignores it too).

    Returns
    -------
    numpy.ndarray
        ``(n_tiles, 4)`` colours in 0..1.
    """
    values = (
        np.full(int(n_tiles or 0), np.nan) if disparity is None else np.asarray(disparity, float)
    )
    colors = np.tile(np.asarray(UNKNOWN_TILE_COLOR), (len(values), 1))
    for low, color, _text in TILE_COLOR_SCALE:
        colors[np.isfinite(values) & (values >= low)] = color
    if judged is not None and len(judged) == len(values):
        colors[~np.asarray(judged, dtype=bool)] = NOT_JUDGED_COLOR
    return colors


def tile_shapes_layer(
    plan: TilePlan,
    scale: tuple[float, ...],
    translate: tuple[float, ...],
    name: str = "tiles",
    disparity: np.ndarray | None = None,
    judged: np.ndarray | None = None,
) -> LayerDataTuple:
    """A Shapes layer data tuple outlining every tile's write box on each plane it spans.

    Parameters
    ----------
    plan : TilePlan
        The run's tiles.
    scale, translate : tuple of float
        The input volume's voxel size and origin ``(z, y, x)``.
    name : str
        Layer name.
    disparity : numpy.ndarray, optional
        One hard disparity per tile (scan order) for the ``disparity`` feature and the colours.
    judged : numpy.ndarray of bool, optional
        Per tile, whether its hard disparity is judged (all are when not given).

    Returns
    -------
    tuple
        ``(rectangles, kwargs, "shapes")``; outline ``k`` belongs to tile
        ``kwargs["features"]["tile"][k]``.
    """
    index, planes = outline_planes(plan)
    tiles = plan.tiles()
    rectangles = [tile_box(tiles[i], z) for i, z in zip(index, planes)]
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": outline_edge_colors(plan, disparity, judged),
        "face_color": "transparent",
        "edge_width": 1,
        "scale": scale,
        "translate": translate,
        "features": tile_features(plan, disparity, judged),
        "metadata": {"normcheck_output": "tiles"},
        "opacity": 0.7,
    }
    return (rectangles, kwargs, "shapes")


def outline_at(features: Any, tile_index: int, z: int) -> int | None:
    """The outline of tile ``tile_index`` on plane ``z`` (or its nearest plane), by feature table."""
    tiles = np.asarray(features["tile"])
    planes = np.asarray(features["z"])
    mine = np.flatnonzero(tiles == tile_index)
    if not mine.size:
        return None
    return int(mine[np.argmin(np.abs(planes[mine] - z))])


#: Widest plane (voxels) of a tile map's level drawn without a coarser one beside it.
CELL_LEVEL_SIDE = 1024


def cell_starts(plan: TilePlan) -> tuple[np.ndarray, ...]:
    """Per axis, the write start of each grid position's tiles, from the region's start.

    A per-tile map draws cell ``k`` of an axis from ``starts[k]`` to ``starts[k + 1]`` (the last
    to the region's edge), so its edges fall on the tile outlines.
    """
    window = np.asarray(plan.window_starts, dtype=np.int64).reshape(-1, 3)
    if plan.blend == "crop":
        write = window + np.asarray(plan.halo, dtype=np.int64)
    else:
        write = np.maximum(window, np.asarray(plan.roi_start, dtype=np.int64))
    grid = np.asarray(plan.grid_positions, dtype=np.int64).reshape(-1, 3)
    starts = []
    for axis in range(3):
        first = np.full(plan.grid_shape[axis], np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, grid[:, axis], write[:, axis])
        starts.append(first - plan.roi_start[axis])
    return tuple(starts)


def cell_level_factors(roi_shape: tuple[int, ...]) -> list[int]:
    """Downsampling in y and x of each level of a tile map: 1, 2, 4, ... down to one screen."""
    factors = [1]
    while max(roi_shape[-2:]) / factors[-1] > CELL_LEVEL_SIDE:
        factors.append(factors[-1] * 2)
    return factors


def cell_indices(plan: TilePlan) -> list[tuple[np.ndarray, ...]]:
    """Per level of a tile map (:func:`cell_level_factors`), each axis' cell of every voxel."""
    from napari_normcheck._arrays import cell_index

    starts = cell_starts(plan)
    shape = plan.roi_shape
    z_index = cell_index(starts[0], shape[0])
    return [
        (z_index, cell_index(starts[1], shape[1], f), cell_index(starts[2], shape[2], f))
        for f in cell_level_factors(shape)
    ]


def tile_cell_stack(grid: np.ndarray, plan: TilePlan) -> list[Any]:
    """Every channel of a per-tile grid, region-sized, channel first: the reader's levels."""
    from napari_normcheck._arrays import TileCellStack

    return [TileCellStack(grid, index) for index in cell_indices(plan)]


def tile_cell_pyramid(grid: np.ndarray, channel: int, plan: TilePlan) -> list[Any]:
    """One channel of a per-tile grid ``(C, tz, ty, tx)`` as the levels of a region-sized map.

    Level ``k`` is downsampled by :func:`cell_level_factors` in y and x; each is a
    :class:`~napari_normcheck._arrays.TileCellMap` reading the grid in memory.
    """
    from napari_normcheck._arrays import TileCellMap

    return [TileCellMap(grid, channel, index) for index in cell_indices(plan)]


def region_transform(
    plan: TilePlan, cell_scale: tuple[float, ...], cell_translation: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The region's voxel size and origin from a tile grid's placement (its cells over tiles)."""
    from napari_normcheck.core.run.grids import tile_cell_transform

    step, centre = tile_cell_transform(plan, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    scale = tuple(c / s for c, s in zip(cell_scale, step))
    volume = tuple(t - c * v for t, c, v in zip(cell_translation, centre, scale))
    return scale, tuple(t + r * v for t, r, v in zip(volume, plan.roi_start, scale))
