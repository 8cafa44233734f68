"""Results of a run as napari layer data tuples, read lazily from OUT.zarr (no Qt).

Every image output group of the store named in :data:`IMAGE_OUTPUTS` (predictions, the disparity
map, the per-tile disparity and mismatch grids) becomes one image layer per channel, backed by the
zarr array through a :class:`~napari_normcheck._arrays.LiveChannel` (read lazily, slice by slice),
placed in world coordinates by the group's OME-Zarr scale and translation (spatial axes only). A
``tiles`` Shapes layer outlines each tile's write box; its ``features`` hold the tile index, grid position and
disparity (built by :mod:`napari_normcheck._tile_layers`, whose names are re-exported here).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_normcheck._arrays import EmptyChannel, live_channels

# Re-exported: callers use the tile functions as ``_layers.<name>``.
from napari_normcheck._tile_layers import UNKNOWN_TILE_COLOR as UNKNOWN_TILE_COLOR
from napari_normcheck._tile_layers import input_translation as input_translation
from napari_normcheck._tile_layers import plan_from_attrs as plan_from_attrs
from napari_normcheck._tile_layers import tile_box as tile_box
from napari_normcheck._tile_layers import tile_center as tile_center
from napari_normcheck._tile_layers import tile_edge_colors as tile_edge_colors
from napari_normcheck._tile_layers import tile_features as tile_features
from napari_normcheck._tile_layers import tile_shapes_layer as tile_shapes_layer
from napari_normcheck._tile_layers import to_world as to_world

if TYPE_CHECKING:
    from napari_normcheck.core.tiling import TilePlan

LayerDataTuple = tuple[Any, dict, str]

# Group name in OUT.zarr -> (short layer name, style).
IMAGE_OUTPUTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Hidden like train: the disparity is what to look at first; eye icons compare the two.
    "pred_eval": ("eval", {"blending": "additive", "opacity": 0.6, "visible": False}),
    "pred_train": ("train", {"blending": "additive", "opacity": 0.6, "visible": False}),
    # Written by `run --remedies` (or the widget's Remedies section) when the user asked for them.
    "pred_recalibrated": (
        "recalibrated",
        {"blending": "additive", "opacity": 0.6, "visible": False},
    ),
    "pred_batchstats": ("batch-stats", {"blending": "additive", "opacity": 0.6, "visible": False}),
    "disparity": ("disparity", {"colormap": "magma", "blending": "additive", "opacity": 0.6}),
    # Where overlapping tiles disagree: tiling artifacts show up here.
    "seams_eval": (
        "seams (eval)",
        {"colormap": "cyan", "blending": "additive", "opacity": 0.7, "visible": False},
    ),
    "seams_train": (
        "seams (train)",
        {"colormap": "cyan", "blending": "additive", "opacity": 0.7, "visible": False},
    ),
    "tile_disparity": (
        "tile disparity",
        {"colormap": "inferno", "blending": "translucent", "opacity": 0.4, "visible": False},
    ),
    "tile_disparity_soft": (
        "tile disparity soft",
        {"colormap": "inferno", "blending": "translucent", "opacity": 0.4, "visible": False},
    ),
    "tile_mismatch_eval": (
        "tile mismatch eval",
        {"colormap": "viridis", "blending": "translucent", "opacity": 0.4, "visible": False},
    ),
    "tile_mismatch_train": (
        "tile mismatch train",
        {"colormap": "viridis", "blending": "translucent", "opacity": 0.4, "visible": False},
    ),
}
# Predictions: one colour per channel (the same in both modes, so toggling compares like with like).
CHANNEL_COLORMAPS = ("green", "magenta", "cyan", "yellow", "blue", "red")
DISPARITY_OUTPUTS = (
    "seams_eval",
    "seams_train",
    "disparity",
    "tile_disparity",
    "tile_disparity_soft",
    "tile_mismatch_eval",
    "tile_mismatch_train",
)


def open_root(path: str | Path) -> Any:
    """Open the store's root zarr group read-only."""
    import zarr

    return zarr.open_group(str(path), mode="r")


def output_groups(root: Any) -> set[str]:
    """Names of the groups in the store (the completion marker is not one: its warning is muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return set(root.group_keys())


def run_attrs(root: Any) -> dict[str, Any]:
    """The root's ``normcheck`` attributes (run parameters, plan, ...)."""
    return dict(root.attrs.get("normcheck", {}))


def spatial_transform(group: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Spatial ``(scale, translation)`` from an OME-Zarr image group's level ``0``.

    Parameters
    ----------
    group : zarr.Group
        An image group written by :class:`~napari_normcheck.core.store.OutputStore`.

    Returns
    -------
    tuple
        ``(scale, translation)`` over the space axes (channel axes dropped).
    """
    ome = dict(group.attrs.get("ome", {}))
    multiscale = ome["multiscales"][0]
    space = [i for i, axis in enumerate(multiscale["axes"]) if axis.get("type") == "space"]
    scale = [1.0] * len(multiscale["axes"])
    translation = [0.0] * len(multiscale["axes"])
    for transform in multiscale["datasets"][0].get("coordinateTransformations", []):
        if transform["type"] == "scale":
            scale = transform["scale"]
        elif transform["type"] == "translation":
            translation = transform["translation"]
    return tuple(float(scale[i]) for i in space), tuple(float(translation[i]) for i in space)


def image_layers(
    path: str | Path,
    prefix: str | None = None,
    names: tuple[str, ...] | None = None,
    fallback: str | Path | None = None,
) -> list[LayerDataTuple]:
    """Image layer data tuples for the outputs present in the store.

    Parameters
    ----------
    path : path-like
        OUT.zarr (complete or still being written).
    prefix : str, optional
        Start of every layer name; the store's folder name by default.
    names : tuple of str, optional
        Output groups to read; all known ones that exist by default.
    fallback : path-like, optional
        The final store when ``path`` is a run's ``.inprogress`` folder (see :class:`~napari_normcheck._arrays.FollowingArray`).

    Returns
    -------
    list of tuple
        ``(data, kwargs, "image")`` per output and channel; ``data`` is ``(Z, Y, X)`` and lazy.
    """
    root = open_root(path)
    prefix = Path(path).name.removesuffix(".zarr") if prefix is None else prefix
    attrs = run_attrs(root)
    params = attrs.get("params", {})
    # Carried by every layer so an export keeps the run's parameters and the model's hash.
    run = {key: attrs.get(key) for key in ("params", "model", "source", "version")}
    members = output_groups(root)
    layers: list[LayerDataTuple] = []
    for group_name in IMAGE_OUTPUTS:
        if (names is not None and group_name not in names) or group_name not in members:
            continue
        try:
            group = root[group_name]
            scale, translation = spatial_transform(group)
            channels = live_channels(path, group_name, fallback)
        except (KeyError, FileNotFoundError, ValueError):
            continue  # a group the run is creating right now: shown at the next refresh
        for channel, data in enumerate(channels):
            kwargs = output_kwargs(
                prefix, group_name, channel, len(channels), scale, translation, params
            )
            kwargs["metadata"]["run"] = run
            layers.append((data, kwargs, "image"))
    return layers


def output_kwargs(
    prefix: str,
    group_name: str,
    channel: int,
    n_channels: int,
    scale: tuple[float, ...],
    translation: tuple[float, ...],
    params: dict[str, Any],
) -> dict[str, Any]:
    """The ``add_image`` keyword arguments of one channel of an output: name, place and style."""
    short, style = IMAGE_OUTPUTS[group_name]
    kwargs: dict[str, Any] = {
        "name": layer_name(prefix, short, channel, n_channels),
        "scale": tuple(scale),
        "translate": tuple(translation),
        "metadata": {"normcheck_output": group_name, "channel": channel},
        "rgb": False,  # a last axis of 3 or 4 voxels is not a colour axis
        **style,
    }
    if "colormap" not in kwargs:
        kwargs["colormap"] = (
            "gray" if n_channels == 1 else CHANNEL_COLORMAPS[channel % len(CHANNEL_COLORMAPS)]
        )
    limits = contrast_for(group_name, params)
    # Without limits napari would scan the data for them; logits get theirs when the run ends.
    kwargs["contrast_limits"] = limits if limits is not None else (0.0, 1.0)
    if limits is None:
        kwargs["metadata"]["contrast_from_data"] = True
    return kwargs


def placeholder_layers(
    prefix: str,
    names: tuple[str, ...],
    n_channels: int,
    shape: tuple[int, ...],
    scale: tuple[float, ...],
    translation: tuple[float, ...],
    params: dict[str, Any],
) -> list[LayerDataTuple]:
    """Layer data tuples of a run's voxel outputs before its store exists (all zero).

    The widget adds these while the engine has not started (adding a layer is the costliest thing
    the GUI thread does), then points them at the store; the shape and placement are those the
    store will have (the region's shape, the input's voxel size, origin at the region's start).
    """
    dtype = params.get("output_dtype", "float32")
    layers: list[LayerDataTuple] = []
    for group_name in names:
        for channel in range(n_channels):
            kwargs = output_kwargs(
                prefix, group_name, channel, n_channels, scale, translation, params
            )
            layers.append((EmptyChannel(shape, dtype), kwargs, "image"))
    return layers


#: Grid outputs the widget shows, written when the run ends.
GRID_OUTPUTS = ("tile_disparity_soft", "tile_mismatch_eval")


def placeholder_grid_layers(
    prefix: str,
    plan: TilePlan,
    n_channels: int,
    scale: tuple[float, ...],
    volume_translation: tuple[float, ...],
    params: dict[str, Any],
) -> list[LayerDataTuple]:
    """Layer data tuples of the per-tile grids (and ``feature z``) before the run writes them.

    One cell per tile, placed over its tile as the engine will place it; all zero until then.
    """
    from napari_normcheck.core.grids import tile_cell_transform

    cell_scale, cell_translation = tile_cell_transform(plan, tuple(scale), volume_translation)
    layers: list[LayerDataTuple] = []
    for group_name in GRID_OUTPUTS:
        for channel in range(n_channels):
            kwargs = output_kwargs(
                prefix, group_name, channel, n_channels, cell_scale, cell_translation, params
            )
            layers.append((EmptyChannel(plan.grid_shape, "float32"), kwargs, "image"))
    feature = {
        "name": f"{prefix} feature z".strip(),
        "scale": cell_scale,
        "translate": cell_translation,
        "colormap": feature_z_colormap(),
        "contrast_limits": (-1.0, 1.0),
        "blending": "translucent",
        "opacity": 0.5,
        "visible": False,
        "rgb": False,
        "metadata": {"normcheck_output": FEATURE_Z},
    }
    layers.append((EmptyChannel(plan.grid_shape, "float32"), feature, "image"))
    return layers


def layer_name(prefix: str, short: str, channel: int, n_channels: int) -> str:
    """Name of an output layer: ``"<prefix> <output>"`` plus ``" c<k>"`` for multi-channel outputs."""
    name = f"{prefix} {short}".strip()
    return f"{name} c{channel}" if n_channels > 1 else name


def contrast_for(group_name: str, params: dict[str, Any]) -> tuple[float, float] | None:
    """Contrast limits of an output: 0..1 for probabilities (0..255 stored as uint8), else automatic."""
    if params.get("output_dtype") == "uint8":
        return (0.0, 255.0)
    if group_name in DISPARITY_OUTPUTS or params.get("activation", "none") != "none":
        return (0.0, 1.0)
    return None


def tile_disparity_values(path: str | Path, plan: TilePlan) -> np.ndarray | None:
    """Per tile (scan order), the largest channel value of the store's tile disparity grid.

    The soft disparity grid is preferred (it varies smoothly); the hard one is used when alone.
    """
    root = open_root(path)
    groups = output_groups(root)
    name = next((n for n in ("tile_disparity_soft", "tile_disparity") if n in groups), None)
    if name is None:
        return None
    try:
        grid = np.asarray(root[f"{name}/0"][...], dtype=float)
    except (KeyError, FileNotFoundError, ValueError):
        return None  # being created by the run right now
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: tiles not run
        per_cell = np.nanmax(grid, axis=0)
    values = []
    for tile in plan.tiles():
        try:
            values.append(float(per_cell[tile.grid]))
        except IndexError:
            values.append(np.nan)
    return np.asarray(values)


def layers_from_store(path: str | Path, prefix: str | None = None) -> list[LayerDataTuple]:
    """All layers of a napari-normcheck output: images (lazy) and the tiles outline.

    Parameters
    ----------
    path : path-like
        OUT.zarr.
    prefix : str, optional
        Start of every layer name; the store's folder name by default.

    Returns
    -------
    list of tuple
        Layer data tuples for ``viewer._add_layer_from_data`` or a napari reader.
    """
    layers = image_layers(path, prefix)
    for _data, kwargs, _kind in layers:
        if kwargs["metadata"].get("contrast_from_data"):
            del kwargs["contrast_limits"]  # a finished store: napari takes them from the data
    root = open_root(path)
    plan = plan_from_attrs(run_attrs(root))
    if plan is not None and "pred_eval" in output_groups(root):
        scale, translation = spatial_transform(root["pred_eval"])
        prefix = Path(path).name.removesuffix(".zarr") if prefix is None else prefix
        layers.append(
            tile_shapes_layer(
                plan,
                scale,
                input_translation(plan, scale, translation),
                name=f"{prefix} tiles".strip(),
                disparity=tile_disparity_values(path, plan),
            )
        )
    feature = feature_z_layer(path, prefix)
    if feature is not None:
        layers.append(feature)
    return layers


FEATURE_Z = "feature_z"
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
    prefix: str | None = None,
    layer: int = 0,
    channel: int | None = None,
) -> LayerDataTuple | None:
    """The ``feature z`` image layer: one layer's one channel of ``feature_z``, one cell per tile.

    Parameters
    ----------
    path : path-like
        OUT.zarr.
    prefix : str, optional
        Start of the layer name; the store's folder name by default.
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
    data = grid[layer, channel].astype(np.float32)
    finite = np.abs(data[np.isfinite(data)])
    zmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    prefix = Path(path).name.removesuffix(".zarr") if prefix is None else prefix
    name = layers[layer].get("name", str(layer)) if layer < len(layers) else str(layer)
    kwargs: dict[str, Any] = {
        "name": f"{prefix} feature z".strip(),
        "scale": scale,
        "translate": translation,
        "colormap": feature_z_colormap(),
        "contrast_limits": (-zmax, zmax),
        "blending": "translucent",
        "opacity": 0.5,
        "visible": False,
        "metadata": {
            "normcheck_output": FEATURE_Z,
            "feature_layer": layer,
            "feature_layer_name": name,
            "channel": channel,
        },
    }
    return (data, kwargs, "image")
