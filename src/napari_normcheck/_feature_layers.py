"""The ``feature z`` outputs as napari data: the grid of per-tile z-scores, one layer of it (no Qt).

``feature_z`` holds, per normalization layer, channel and tile, how far the tile's mean input lies
from the layer's running mean in running standard deviations: the statistic train-mode
normalization would correct and eval-mode normalization does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_normcheck._store_meta import open_root, output_groups, run_attrs, spatial_transform
from napari_normcheck._tile_layers import plan_from_attrs, region_transform, tile_cell_pyramid

LayerDataTuple = tuple[Any, dict, str]

FEATURE_Z = "feature_z"
FEATURE_Z_NAME = "feature z"
# Diverging colormaps, preferred first (the first napari knows is used).
FEATURE_Z_COLORMAPS = ("bwr", "PiYG", "twilight_shifted")


def feature_z_grid(
    path: str | Path,
) -> tuple[np.ndarray, list[dict[str, Any]], tuple, tuple] | None:
    """The store's ``feature_z`` grid with its layers and spatial transform, or ``None``.

    Returns
    -------
    tuple or None
        ``(grid, layers, scale, translation)``: ``grid`` is ``(layer, channel, tz, ty, tx)``,
        ``layers`` the ``normcheck.layers`` attributes (name, channels, running statistics),
        ``scale`` and ``translation`` the spatial placement of the cells over their tiles.
    """
    try:
        root = open_root(path)
        if FEATURE_Z not in output_groups(root):
            return None
        group = root[FEATURE_Z]
        grid = np.asarray(group["0"][...], dtype=float)
        layers = list(dict(group.attrs.get("normcheck", {})).get("layers", []))
        scale, translation = spatial_transform(group)
    except (KeyError, FileNotFoundError, ValueError):
        return None
    return grid, layers, scale, translation


def strongest_channel(grid: np.ndarray, layer: int) -> int:
    """The channel of ``layer`` with the largest ``|z|`` over the tiles (0 when all unknown)."""
    values = np.abs(np.asarray(grid[layer], dtype=float)).reshape(grid.shape[1], -1)
    values = np.where(np.isfinite(values), values, -1.0)
    return int(values.max(axis=1).argmax()) if values.size else 0


def feature_z_colormap() -> str:
    """The first available diverging colormap of :data:`FEATURE_Z_COLORMAPS`."""
    from napari.utils.colormaps import AVAILABLE_COLORMAPS

    return next((n for n in FEATURE_Z_COLORMAPS if n in AVAILABLE_COLORMAPS), "twilight_shifted")


def feature_z_layer(
    path: str | Path,
    layer: int = 0,
    channel: int | None = None,
) -> LayerDataTuple | None:
    """The ``feature z`` image layer: one layer's one channel of ``feature_z``, one cell per tile.

    Parameters
    ----------
    path : path-like
        OUT.zarr.
    layer : int
        Index of the normalization layer (in the ``normcheck.layers`` attributes).
    channel : int, optional
        The channel; the one with the largest ``|z|`` over the tiles by default.

    Returns
    -------
    tuple or None
        ``(data (tz, ty, tx), kwargs, "image")``, or ``None`` when the store has no ``feature_z``.
    """
    read = feature_z_grid(path)
    if read is None:
        return None
    grid, layers, scale, translation = read
    layer = min(max(int(layer), 0), grid.shape[0] - 1)
    if channel is None:
        channel = strongest_channel(grid, layer)
    channel = min(max(int(channel), 0), grid.shape[1] - 1)
    data: Any = grid[layer, channel].astype(np.float32)
    finite = np.abs(data[np.isfinite(data)])
    zmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    name = layers[layer].get("name", str(layer)) if layer < len(layers) else str(layer)
    plan = plan_from_attrs(run_attrs(open_root(path)))
    if plan is not None:  # each tile's cell over its own voxels, edges on the tile outlines
        data = tile_cell_pyramid(grid[layer].astype(np.float32), channel, plan)
        scale, translation = region_transform(plan, scale, translation)
    kwargs: dict[str, Any] = {
        "name": FEATURE_Z_NAME,
        "scale": scale,
        "translate": translation,
        "colormap": feature_z_colormap(),
        "contrast_limits": (-zmax, zmax),
        "blending": "translucent",
        "opacity": 0.5,
        "visible": False,
        "rgb": False,
        "multiscale": plan is not None,
        "metadata": {
            "normcheck_output": FEATURE_Z,
            "feature_layer": layer,
            "feature_layer_name": name,
            "channel": channel,
        },
    }
    return (data, kwargs, "image")
