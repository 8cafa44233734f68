"""The data of the result layers, level by level: what is read ahead, which channel is shown.

Every image layer the widget adds is multiscale (a list of levels, one entry when the store holds
no pyramid), so re-pointing it at a store with another number of levels needs no new layer. Each
level is a :class:`~napari_normcheck._arrays.LiveChannel` (or an all-zero stand-in before the
store exists).
"""

from __future__ import annotations

from typing import Any

from napari_normcheck import _layers
from napari_normcheck._arrays import EmptyChannel, LiveChannel, TileCellMap
from napari_normcheck.core.run import registry


def output_of(kwargs: dict[str, Any]) -> str:
    """The output group a layer's keyword arguments describe (its key in the result layers)."""
    return str(kwargs["metadata"].get("normcheck_output", kwargs["name"]))


def levels_of(layer: Any) -> list[Any]:
    """The arrays of a layer's levels, finest first (one for a single-scale layer)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        return [data[i] for i in range(len(data))]
    return [data]


def is_stand_in(layer: Any) -> bool:
    """The layer still shows the all-zero stand-in of an output not written yet."""
    return isinstance(levels_of(layer)[0], EmptyChannel)


def live_levels(layer: Any) -> list[LiveChannel]:
    """The layer's levels that read a store (none for stand-ins and plain arrays)."""
    return [level for level in levels_of(layer) if isinstance(level, LiveChannel)]


def channel_levels(layer: Any) -> list[LiveChannel | TileCellMap]:
    """The layer's levels that show one channel of an output (a store's map or a tile grid)."""
    return [level for level in levels_of(layer) if isinstance(level, (LiveChannel, TileCellMap))]


def is_output_layer(layer: Any) -> bool:
    """A layer showing one channel of a store's output (the widget's or a remedy's)."""
    return layer.metadata.get("normcheck_output") in _layers.image_outputs() and bool(
        channel_levels(layer)
    )


def switched(layer: Any, channel: int) -> tuple[list[Any], str, int]:
    """The layer's levels showing ``channel`` instead, its new name and the channel shown.

    The levels keep reading the same arrays (no store is opened); the channel is clipped to those
    the output has.
    """
    levels = channel_levels(layer)
    first = levels[0]
    n_channels = int(
        first.grid.shape[0] if isinstance(first, TileCellMap) else first.source.shape[0]
    )
    shown = min(max(int(channel), 0), n_channels - 1)
    labels = list(layer.metadata.get("channel_names") or [])
    if len(labels) != n_channels:
        labels = _layers.channel_names({}, n_channels)
    short = _layers.image_outputs()[layer.metadata["normcheck_output"]][0]
    name = _layers.layer_name(short, labels[shown] if n_channels > 1 else None)
    return [level.with_channel(shown) for level in levels], name, shown


def show_channel(layer: Any, channel: int) -> bool:
    """Point an output layer at another channel of the same arrays (renamed; no layer added).

    Returns
    -------
    bool
        Whether the layer's contrast must be taken from its new data (logits).
    """
    levels, name, shown = switched(layer, channel)
    if shown != layer.metadata.get("channel"):
        layer.data = levels
        layer.metadata["channel"] = shown
    if layer.name != name:
        layer.name = name
    return bool(layer.metadata.get("contrast_from_data"))


def stop_prefetch(layer: Any) -> None:
    """From now on napari reads the layer's store itself (slices read ahead are dropped)."""
    for level in live_levels(layer):
        level.use({})


def display_group(output: str) -> str:
    """``prediction``, ``remedy``, ``disparity`` (voxel maps) or ``grid`` (per-tile maps)."""
    if output in _layers.grid_groups():
        return "grid"
    voxel = {o.name: o.display.group for o in registry.VOXEL_OUTPUTS}
    return voxel.get(output, "disparity")


def limit_jobs(layers: list[Any]) -> list[tuple[Any, str, list[Any], bool]]:
    """What :func:`data_limits` needs of each layer, taken on the GUI thread.

    ``(layer, output, levels, from_slice)``: ``from_slice`` for outputs without a fixed range
    (logits), whose limits are those of the shown slice.
    """
    jobs = []
    for layer in layers:
        levels = channel_levels(layer)
        if levels:
            output = str(layer.metadata.get("normcheck_output"))
            jobs.append((layer, output, levels, bool(layer.metadata.get("contrast_from_data"))))
    return jobs


def data_limits(
    jobs: list[tuple[Any, str, list[Any], bool]],
) -> list[tuple[Any, tuple[float, float]]]:
    """Contrast limits from the data, so each map's largest real value is plainly visible (any thread).

    Per-tile maps: 0 to their largest value; voxel maps: 0 to a high percentile of their coarsest
    level's non-zero values (:func:`napari_normcheck._layers.contrast_top`), never below the
    group's floor. The eval and train predictions (and the remedies') share one top, so equal
    values look equal. Logits: the shown slice's range.
    """
    paired = ("prediction", "remedy")
    tops: dict[int, float] = {}
    limits: list[tuple[Any, tuple[float, float]]] = []
    for layer, output, levels, from_slice in jobs:
        floor = _layers.CONTRAST_FLOOR.get(display_group(output), 0.05)
        if from_slice:
            if isinstance(levels[0], LiveChannel):
                limits.append((layer, levels[0].value_range()))
        elif isinstance(levels[0], TileCellMap):
            tops[id(layer)] = _layers.contrast_top(levels[0].values, floor)
        else:
            values = _layers.sampled_level(levels[-1])
            percentile = _layers.CONTRAST_PERCENTILES.get(output, _layers.CONTRAST_PERCENTILE)
            top = _layers.contrast_top(values, floor, percentile=percentile)
            tops[id(layer)] = top
    shared = [tops[id(j[0])] for j in jobs if id(j[0]) in tops and display_group(j[1]) in paired]
    for layer, output, _levels, _from_slice in jobs:
        if id(layer) in tops:
            top = max(shared) if display_group(output) in paired else tops[id(layer)]
            limits.append((layer, (0.0, float(top))))
    return limits
