"""The napari reader contribution: open a napari-normcheck OUT.zarr as layers.

The same rule as the dock widget: one layer per output, whatever the model's channel count. Here
the channel is a slider axis (``channel``, the first) of each layer; outputs with pyramids open as
multiscale layers; the tile outlines show on every plane their tiles span.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LayerDataTuple = tuple[Any, dict, str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerDataTuple]] | None:
    """Return a reader when ``path`` is a napari-normcheck output folder, else ``None``.

    Parameters
    ----------
    path : str or list of str
        What napari asks about; a list is accepted when every element is an output folder.

    Returns
    -------
    callable or None
        ``reader(path) -> list of layer data tuples``; ``None`` for other zarr folders, so napari
        tries other readers.
    """
    from napari_normcheck.core.io.store import is_normcheck_store

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(is_normcheck_store(p) for p in paths):
        return None
    return read_outputs


def read_outputs(path: str | list[str]) -> list[LayerDataTuple]:
    """Read every output of one or more stores as lazily loaded layers.

    Parameters
    ----------
    path : str or list of str
        OUT.zarr folder(s).

    Returns
    -------
    list of tuple
        Layer data tuples from :func:`napari_normcheck._layers.layers_from_store`.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerDataTuple] = []
    for p in paths:
        layers.extend(layers_from_store(p))
    return layers


def _axis_labels_supported() -> bool:
    """Whether napari's layers take ``axis_labels`` (0.6 and later)."""
    import inspect

    from napari.layers import Image

    return "axis_labels" in inspect.signature(Image.__init__).parameters


def output_layer(path: str | Path, root: Any, group_name: str) -> LayerDataTuple | None:
    """One output of the store as an image layer with the channel as its first axis.

    Parameters
    ----------
    path : path-like
        OUT.zarr.
    root : zarr.Group
        Its root group.
    group_name : str
        The output (a key of :func:`napari_normcheck._layers.image_outputs`).

    Returns
    -------
    tuple or None
        ``(data, kwargs, "image")``: ``data`` is the lazy ``(C, Z, Y, X)`` zarr array, or the list
        of its levels (finest first) when the store holds a pyramid; ``None`` when unreadable.
    """
    import zarr

    from napari_normcheck import _layers

    try:
        levels = _layers.output_levels(root[group_name])
        arrays = [
            zarr.open_array(str(Path(path) / group_name / lv.path), mode="r") for lv in levels
        ]
    except (KeyError, FileNotFoundError, ValueError):
        return None
    attrs = _layers.run_attrs(root)
    params = attrs.get("params", {})
    n_channels = int(arrays[0].shape[0])
    short, style = _layers.image_outputs()[group_name]
    kwargs: dict[str, Any] = {
        "name": short,
        "scale": (1.0, *levels[0].scale),
        "translate": (0.0, *levels[0].translation),
        "rgb": False,
        "multiscale": len(arrays) > 1,
        "metadata": {
            "normcheck_output": group_name,
            "normcheck_store": str(path),
            "channel_names": _layers.channel_names(attrs, n_channels),
            "run": {key: attrs.get(key) for key in ("params", "model", "source", "version")},
        },
        **style,
    }
    limits = _layers.contrast_for(group_name, params, arrays[0].dtype)
    if limits is not None:  # else (logits) napari takes them from the data
        kwargs["contrast_limits"] = limits
    if _axis_labels_supported():
        kwargs["axis_labels"] = ("channel", "z", "y", "x")
    shown = [in_units(array) for array in arrays]
    plan = _layers.plan_from_attrs(attrs) if group_name in _layers.grid_groups() else None
    if plan is not None:
        # Each tile's cell over its own voxels, edges on the tile outlines (one cell per tile in
        # the store): region-sized, placed as the voxel maps.
        grid = _layers.stored_to_unit(arrays[0][...], arrays[0].dtype).astype(np.float32)
        shown = _layers.tile_cell_stack(grid, plan)
        space, origin = _layers.region_transform(plan, levels[0].scale, levels[0].translation)
        kwargs["scale"], kwargs["translate"] = (1.0, *space), (0.0, *origin)
        kwargs["multiscale"] = len(shown) > 1
    return (shown if len(shown) > 1 else shown[0], kwargs, "image")


def in_units(array: Any) -> Any:
    """A stored array read in its values' units: stored integers (uint8) as 0..1, lazily.

    The status bar, the colour bar and the contrast then read 0..1 as the report does; the
    division runs chunk by chunk as napari reads (dask), nothing is read here.
    """
    from napari_normcheck._arrays import unit_divisor

    divisor = unit_divisor(array.dtype)
    if divisor is None:
        return array
    import dask.array as da

    return (da.from_zarr(array) * np.float32(1.0 / divisor)).astype(np.float32)


def layers_from_store(path: str | Path) -> list[LayerDataTuple]:
    """All layers of a napari-normcheck output: one image per output (lazy), tiles, feature z.

    Parameters
    ----------
    path : path-like
        OUT.zarr.

    Returns
    -------
    list of tuple
        Layer data tuples for ``viewer._add_layer_from_data`` or a napari reader; the tiles and
        ``feature z`` layers (3D) line up with the images' last three axes.
    """
    from napari_normcheck import _layers

    root = _layers.open_root(path)
    members = _layers.output_groups(root)
    layers = [
        layer
        for name in _layers.image_outputs()
        if name in members and (layer := output_layer(path, root, name)) is not None
    ]
    plan = _layers.plan_from_attrs(_layers.run_attrs(root))
    if plan is not None and "pred_eval" in members:
        scale, translation = _layers.spatial_transform(root["pred_eval"])
        layers.append(
            _layers.tile_shapes_layer(
                plan,
                scale,
                _layers.input_translation(plan, scale, translation),
                name="tiles",
                disparity=_layers.tile_disparity_values(path, plan),
                judged=_layers.tile_judged_values(path, plan),
            )
        )
    feature = _layers.feature_z_layer(path)
    if feature is not None:
        layers.append(feature)
    return layers
