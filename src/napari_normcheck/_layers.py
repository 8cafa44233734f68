"""Results of a run as napari layer data tuples, read lazily from OUT.zarr (no Qt).

One image layer per output (predictions, the disparity map, the seams, the per-tile grids), showing
one output channel at a time: the widget re-points the same layers when another channel is chosen,
so the layer count does not grow with the model's channels. Each layer reads its store lazily
through :class:`~napari_normcheck._arrays.LiveChannel` objects, one per pyramid level (the levels
and their placement come from the group's OME-Zarr ``multiscales`` metadata), placed in world
coordinates by the level's scale and translation (spatial axes only). A ``tiles`` Shapes layer
outlines each tile's write box on every plane it spans (built by :mod:`napari_normcheck._tile_layers`,
whose names are re-exported here). The reader's own rule (the channel as a slider axis) is in
:mod:`napari_normcheck._reader`. Which outputs there are, their layer names and styles, which the
widget shows and their order in the layer list all come from the output registry
(:mod:`napari_normcheck.core.run.registry`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_normcheck._arrays import EmptyChannel, channel_pyramid, output_sources, unit_divisor

# Re-exported: the store's metadata and the feature z functions, as ``_layers.<name>``.
from napari_normcheck._feature_layers import FEATURE_Z as FEATURE_Z
from napari_normcheck._feature_layers import FEATURE_Z_NAME as FEATURE_Z_NAME
from napari_normcheck._feature_layers import feature_z_colormap as feature_z_colormap
from napari_normcheck._feature_layers import feature_z_grid as feature_z_grid
from napari_normcheck._feature_layers import feature_z_layer as feature_z_layer
from napari_normcheck._feature_layers import strongest_channel as strongest_channel
from napari_normcheck._store_meta import Level as Level
from napari_normcheck._store_meta import open_root as open_root
from napari_normcheck._store_meta import output_groups as output_groups
from napari_normcheck._store_meta import output_levels as output_levels
from napari_normcheck._store_meta import run_attrs as run_attrs
from napari_normcheck._store_meta import spatial_transform as spatial_transform

# Re-exported: callers use the tile functions as ``_layers.<name>``.
from napari_normcheck._tile_layers import UNKNOWN_TILE_COLOR as UNKNOWN_TILE_COLOR
from napari_normcheck._tile_layers import input_translation as input_translation
from napari_normcheck._tile_layers import plan_from_attrs as plan_from_attrs
from napari_normcheck._tile_layers import region_transform as region_transform
from napari_normcheck._tile_layers import tile_box as tile_box
from napari_normcheck._tile_layers import tile_cell_pyramid as tile_cell_pyramid
from napari_normcheck._tile_layers import tile_cell_stack as tile_cell_stack
from napari_normcheck._tile_layers import tile_center as tile_center
from napari_normcheck._tile_layers import tile_edge_colors as tile_edge_colors
from napari_normcheck._tile_layers import tile_features as tile_features
from napari_normcheck._tile_layers import tile_shapes_layer as tile_shapes_layer
from napari_normcheck._tile_layers import to_world as to_world
from napari_normcheck.core.run import registry

if TYPE_CHECKING:
    from napari_normcheck.core.base.tiling import TilePlan

LayerDataTuple = tuple[Any, dict, str]


def image_outputs() -> dict[str, tuple[str, dict[str, Any]]]:
    """Group name in OUT.zarr -> (short layer name, ``add_image`` style), from the output registry.

    Every registered output: the voxel maps (predictions, disparity, seams) in registry order,
    then the tile metrics' grids (:func:`napari_normcheck.core.run.registry.output_display`).
    """
    return {name: (shown.layer, shown.style()) for name, shown in registry.output_display().items()}


def outputs_in_group(group: str) -> tuple[str, ...]:
    """The outputs whose display is in ``group`` (``prediction``, ``remedy``, ``disparity``)."""
    return tuple(name for name, shown in registry.output_display().items() if shown.group == group)


def widget_voxel_outputs(params: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The voxel outputs the widget shows, written while tiles finish.

    Parameters
    ----------
    params : dict, optional
        The run's parameters: outputs a run turns on (``seams``) are left out when it did not.
    """
    return tuple(
        output.name
        for output in registry.VOXEL_OUTPUTS
        if output.display.widget
        and (params is None or output.opt_in is None or bool(params.get(output.opt_in)))
    )


def widget_grid_outputs() -> tuple[str, ...]:
    """The per-tile grids the widget shows, written when the run ends."""
    return tuple(
        metric.grid
        for metric in registry.TILE_METRICS
        if metric.grid and metric.display is not None and metric.display.widget
    )


def grid_groups() -> frozenset[str]:
    """Every per-tile grid of the registry (one cell per tile in the store)."""
    return frozenset(metric.grid for metric in registry.TILE_METRICS if metric.grid)


def widget_outputs() -> tuple[str, ...]:
    """Every output the widget shows (the store holds more; the reader opens them all)."""
    return (*widget_voxel_outputs(), *widget_grid_outputs())


def layer_order() -> tuple[str, ...]:
    """Result layers from the top of napari's layer list down (``normcheck_output`` values).

    ``tiles``, the disparity maps (disparity, seams), the predictions, the remedies' predictions,
    the per-tile grids, ``feature z``. The grids go by layer name, so each metric's plain layer
    comes just above its variants (``tile disparity`` above ``tile disparity (hard)``).
    """
    voxels = {output.name: output.display for output in registry.VOXEL_OUTPUTS}
    grids = {m.grid: m.display for m in registry.TILE_METRICS if m.grid and m.display}
    return (
        "tiles",
        *(
            name
            for group in ("disparity", "prediction", "remedy")
            for name, shown in voxels.items()
            if shown.group == group
        ),
        *sorted(grids, key=lambda name: grids[name].layer),
        FEATURE_Z,
    )


# Names older callers import: computed from the registry when read, so a registry entry added
# later (or in a test) shows up in them too.
_REGISTRY_VIEWS: dict[str, Callable[[], Any]] = {
    "IMAGE_OUTPUTS": image_outputs,
    "DISPARITY_OUTPUTS": lambda: outputs_in_group("disparity"),
    "REMEDY_OUTPUTS": lambda: outputs_in_group("remedy"),
    "GRID_OUTPUTS": widget_grid_outputs,
}


def __getattr__(name: str) -> Any:
    """``IMAGE_OUTPUTS``, ``DISPARITY_OUTPUTS``, ``REMEDY_OUTPUTS``, ``GRID_OUTPUTS`` from the registry."""
    if name in _REGISTRY_VIEWS:
        return _REGISTRY_VIEWS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Separator of an output's and its channel's names in a layer name: ``disparity · membrane``.
NAME_SEPARATOR = " · "


def channel_names(attrs: dict[str, Any], n_channels: int) -> list[str]:
    """Names of the output channels: the model's (a bioimage.io package's) when known, else ``channel k``.

    Parameters
    ----------
    attrs : dict
        The store's ``normcheck`` attributes (``channel_names`` at the top, or ``channel_names`` /
        ``output_channel_names`` in ``model``).
    n_channels : int
        The outputs' channel count.
    """
    for source in (attrs, attrs.get("model") or {}, attrs.get("params") or {}):
        for key in ("channel_names", "output_channel_names"):
            names = source.get(key) if isinstance(source, dict) else None
            if isinstance(names, (list, tuple)) and len(names) == n_channels:
                return [str(name) for name in names]
    return [f"channel {k}" for k in range(n_channels)]


def layer_name(short: str, channel_name: str | None) -> str:
    """Name of an output layer: ``"disparity · membrane"`` (the output alone for one channel)."""
    return f"{short}{NAME_SEPARATOR}{channel_name}" if channel_name else short


def image_layers(
    path: str | Path,
    names: tuple[str, ...] | None = None,
    channel: int = 0,
    fallback: str | Path | None = None,
    names_of_channels: list[str] | None = None,
) -> list[LayerDataTuple]:
    """One image layer data tuple per output present in the store, showing one channel.

    Parameters
    ----------
    path : path-like
        OUT.zarr (complete or still being written).
    names : tuple of str, optional
        Output groups to read; all known ones that exist by default.
    channel : int
        The output channel shown (clipped to the channels there are).
    fallback : path-like, optional
        The final store when ``path`` is a run's ``.inprogress`` folder (see
        :class:`~napari_normcheck._arrays.FollowingArray`).
    names_of_channels : list of str, optional
        The channels' names; from the store's attributes, else ``channel k``, by default.

    Returns
    -------
    list of tuple
        ``(levels, kwargs, "image")``: ``levels`` is a list of lazy ``(Z, Y, X)`` arrays, finest
        first, for a multiscale layer (one entry when the store has no pyramid).
    """
    root = open_root(path)
    attrs = run_attrs(root)
    params = attrs.get("params", {})
    # Carried by every layer so an export keeps the run's parameters and the model's hash.
    run = {key: attrs.get(key) for key in ("params", "model", "source", "version")}
    members = output_groups(root)
    layers: list[LayerDataTuple] = []
    grids = grid_groups()
    plan: TilePlan | None = None
    for group_name in image_outputs():
        if (names is not None and group_name not in names) or group_name not in members:
            continue
        try:
            levels = output_levels(root[group_name])
            if group_name in grids:
                plan = plan or plan_from_attrs(attrs)
                if plan is None:
                    continue
                array = root[f"{group_name}/0"]
                grid = stored_to_unit(array[...], array.dtype).astype(np.float32)
                n_channels = int(grid.shape[0])
                scale, translation = region_transform(plan, levels[0].scale, levels[0].translation)
            else:
                sources = output_sources(path, group_name, [lv.path for lv in levels], fallback)
                n_channels = int(sources[0].shape[0])
                scale, translation = levels[0].scale, levels[0].translation
        except (KeyError, FileNotFoundError, ValueError):
            continue  # a group the run is creating right now: shown at the next refresh
        shown = min(max(int(channel), 0), n_channels - 1)
        labels = names_of_channels or channel_names(attrs, n_channels)
        if len(labels) != n_channels:
            labels = channel_names({}, n_channels)
        kwargs = output_kwargs(group_name, shown, labels, scale, translation, params)
        kwargs["metadata"]["run"] = run
        if group_name in grids:
            data = tile_cell_pyramid(grid, shown, plan)  # type: ignore[arg-type]
        else:
            data = channel_pyramid(sources, shown)
        layers.append((data, kwargs, "image"))
    return layers


def output_kwargs(
    group_name: str,
    channel: int,
    labels: list[str],
    scale: tuple[float, ...],
    translation: tuple[float, ...],
    params: dict[str, Any],
) -> dict[str, Any]:
    """The ``add_image`` keyword arguments of an output showing ``channel``: name, place and style."""
    short, style = image_outputs()[group_name]
    kwargs: dict[str, Any] = {
        "name": layer_name(short, labels[channel] if len(labels) > 1 else None),
        "scale": tuple(scale),
        "translate": tuple(translation),
        "metadata": {
            "normcheck_output": group_name,
            "channel": channel,
            "channel_names": list(labels),
        },
        "rgb": False,  # a last axis of 3 or 4 voxels is not a colour axis
        "multiscale": True,  # one level or several: re-pointing may change how many
        **style,
    }
    limits = contrast_for(group_name, params)
    # Without limits napari would scan the data for them; logits get theirs from their data later.
    kwargs["contrast_limits"] = limits if limits is not None else (0.0, 1.0)
    if limits is None:
        kwargs["metadata"]["contrast_from_data"] = True
    return kwargs


def placeholder_layers(
    names: tuple[str, ...],
    n_channels: int,
    channel: int,
    labels: list[str],
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
    if unit_divisor(dtype) is not None:
        dtype = "float32"  # stored integers are shown as 0..1 floats (``LiveChannel``)
    return [
        (
            [EmptyChannel(shape, dtype)],
            output_kwargs(name, channel, labels, scale, translation, params),
            "image",
        )
        for name in names
    ]


def placeholder_grid_layers(
    plan: TilePlan,
    channel: int,
    labels: list[str],
    scale: tuple[float, ...],
    volume_translation: tuple[float, ...],
    params: dict[str, Any],
) -> list[LayerDataTuple]:
    """Layer data tuples of the per-tile grids (and ``feature z``) before the run writes them.

    Region-sized (all zero until then), placed like the voxel outputs: the written grids are drawn
    with each tile's cell over its own voxels (:func:`tile_cell_pyramid`).
    """
    translation = tuple(t + r * s for t, r, s in zip(volume_translation, plan.roi_start, scale))
    shape = plan.roi_shape
    layers: list[LayerDataTuple] = [
        (
            [EmptyChannel(shape, "float32")],
            output_kwargs(name, channel, labels, scale, translation, params),
            "image",
        )
        for name in widget_grid_outputs()
    ]
    feature = {
        "name": FEATURE_Z_NAME,
        "scale": tuple(scale),
        "translate": translation,
        "colormap": feature_z_colormap(),
        "contrast_limits": (-1.0, 1.0),
        "blending": "translucent",
        "opacity": 0.5,
        "visible": False,
        "rgb": False,
        "multiscale": True,
        "metadata": {"normcheck_output": FEATURE_Z},
    }
    layers.append(([EmptyChannel(shape, "float32")], feature, "image"))
    return layers


def contrast_for(
    group_name: str, params: dict[str, Any], dtype: Any = None
) -> tuple[float, float] | None:
    """Contrast limits of an output's meaning: 0..1 for probabilities (however stored), else automatic.

    The limits shown once the run has written the output follow its data too
    (:func:`contrast_top`).

    Parameters
    ----------
    group_name : str
        The output group.
    params : dict
        The run parameters (``activation``, ``output_dtype``).
    dtype : numpy.dtype, optional
        The stored data type: unsigned integers hold 0..1 scaled to their full range, and are
        shown as 0..1.
    """
    if (dtype is not None and np.dtype(dtype).kind == "u") or params.get("output_dtype") == "uint8":
        return (0.0, 1.0)  # stored integers are read as 0..1 (``LiveChannel``, the reader)
    shown = registry.output_display().get(group_name)
    if shown is not None and shown.contrast is not None:
        return tuple(shown.contrast)  # type: ignore[return-value]
    if params.get("activation", "none") != "none":
        return (0.0, 1.0)
    return None


#: Least upper contrast limit of a map, as a fraction of its meaning's top (1 for a disparity):
#: a map of near-zero values stays dark instead of showing its noise at full brightness.
CONTRAST_FLOOR = {"prediction": 0.1, "remedy": 0.1, "disparity": 0.05, "grid": 0.02}
#: Percentile of a voxel map's non-zero values that gets the colormap's top colour.
CONTRAST_PERCENTILE = 99.5
#: The seams maps' own: most seam voxels disagree a little and a few a lot (median 0.02, 90th
#: percentile 0.24, largest 1 on ssTEM): their top 5 % saturate, so the seams' course shows.
CONTRAST_PERCENTILES = {"seams_eval": 95.0, "seams_train": 95.0}


def contrast_top(
    values: Any, floor: float, top: float = 1.0, percentile: float | None = None
) -> float:
    """The upper contrast limit of a map from its values: its largest real value plainly visible.

    A high percentile of the non-zero finite values (the largest one when ``percentile`` is
    ``None``), never below ``floor`` nor above ``top`` (the meaning's largest value). A seams map
    peaking at 0.24 is then drawn up to 0.24, not lost in a 0..1 range.
    """
    values = np.asarray(values, dtype=np.float32).ravel()
    values = values[np.isfinite(values) & (values > 0)]
    if not values.size:
        return float(floor)
    high = float(values.max() if percentile is None else np.percentile(values, percentile))
    return float(min(max(high, floor), top))


#: Most voxels read to set a voxel map's contrast (planes spread over z of its coarsest level).
CONTRAST_SAMPLE_VOXELS = 8_000_000


def sampled_level(level: Any) -> np.ndarray:
    """Values of a ``(Z, Y, X)`` level for its contrast: whole, or evenly spread planes of it."""
    z, y, x = level.shape[-3:]
    planes = max(1, min(z, CONTRAST_SAMPLE_VOXELS // max(y * x, 1)))
    stride = max(1, int(np.ceil(np.sqrt(y * x / CONTRAST_SAMPLE_VOXELS))))
    picked = np.unique(np.linspace(0, z - 1, planes).round().astype(int))
    read = getattr(level, "read_unit", level.__getitem__)  # (not napari's last slice)
    return np.stack(
        [
            np.asarray(read((int(k), slice(None, None, stride), slice(None, None, stride))))
            for k in picked
        ]
    )


def stored_to_unit(values: np.ndarray, dtype: Any) -> np.ndarray:
    """Stored values as floats in their meaning's units (unsigned integers: 0..max -> 0..1)."""
    values = np.asarray(values, dtype=float)
    if np.dtype(dtype).kind == "u":
        values = values / float(np.iinfo(np.dtype(dtype)).max)
    return values


def _tile_grid(path: str | Path, name: str) -> np.ndarray | None:
    """A stored per-tile grid ``(C, tz, ty, tx)`` on its 0..1 scale; ``None`` when absent."""
    root = open_root(path)
    if name not in output_groups(root):
        return None
    try:
        array = root[f"{name}/0"]
        return stored_to_unit(array[...], array.dtype)
    except (KeyError, FileNotFoundError, ValueError):
        return None  # being created by the run right now


def _per_tile(per_cell: np.ndarray, plan: TilePlan, missing: Any = np.nan) -> np.ndarray:
    values = []
    for tile in plan.tiles():
        try:
            values.append(per_cell[tile.grid])
        except IndexError:
            values.append(missing)
    return np.asarray(values)


def _channel_cells(grid: np.ndarray, channel: int | None, reduce: Any) -> np.ndarray:
    if channel is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: tiles not run
            return reduce(grid, axis=0)
    return grid[min(max(int(channel), 0), grid.shape[0] - 1)]


def tile_disparity_values(
    path: str | Path, plan: TilePlan, channel: int | None = None
) -> np.ndarray | None:
    """Per tile (scan order), one channel's hard disparity from the store's tile grid.

    The verdict's basis: NaN where the tile has not run or its channel is not judged (the
    store's ``tile_disparity`` grid holds NaN there). The soft grid is read only from a store
    without a hard one.

    Parameters
    ----------
    path : path-like
        OUT.zarr.
    plan : TilePlan
        The run's tiles.
    channel : int, optional
        The output channel; the largest judged value over the channels when ``None``.
    """
    grid = _tile_grid(path, "tile_disparity")
    if grid is None:
        grid = _tile_grid(path, "tile_disparity_soft")
    if grid is None:
        return None
    return _per_tile(_channel_cells(grid, channel, np.nanmax), plan).astype(float)


def tile_judged_values(
    path: str | Path, plan: TilePlan, channel: int | None = None
) -> np.ndarray | None:
    """Per tile (scan order), whether its hard disparity of ``channel`` is judged.

    Read off the store's grids: a tile that ran (its soft disparity is defined) and has no hard
    value was not judged (too little foreground); a tile that has not run counts as judged (its
    outline says "not run yet"). With ``channel`` ``None``: judged in at least one channel.
    """
    hard = _tile_grid(path, "tile_disparity")
    soft = _tile_grid(path, "tile_disparity_soft")
    if hard is None or soft is None or hard.shape != soft.shape:
        return None
    flags = np.isfinite(hard) | ~np.isfinite(soft)
    cells = flags.any(axis=0) if channel is None else _channel_cells(flags, channel, None)
    return _per_tile(cells, plan, True).astype(bool)
