"""The data of the result layers, level by level: what is read ahead, which channel is shown.

Every image layer the widget adds is multiscale (a list of levels, one entry when the store holds
no pyramid), so re-pointing it at a store with another number of levels needs no new layer. Each
level is a :class:`~napari_normcheck._arrays.LiveChannel` (or an all-zero stand-in before the
store exists).
"""

from __future__ import annotations

from typing import Any

from napari_normcheck import _layers
from napari_normcheck._arrays import EmptyChannel, LiveChannel


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


def is_output_layer(layer: Any) -> bool:
    """A layer showing one channel of a store's output (the widget's or a remedy's)."""
    return layer.metadata.get("normcheck_output") in _layers.image_outputs() and bool(
        live_levels(layer)
    )


def switched(layer: Any, channel: int) -> tuple[list[LiveChannel], str, int]:
    """The layer's levels showing ``channel`` instead, its new name and the channel shown.

    The levels keep reading the same arrays (no store is opened); the channel is clipped to those
    the output has.
    """
    levels = live_levels(layer)
    n_channels = int(levels[0].source.shape[0])
    shown = min(max(int(channel), 0), n_channels - 1)
    labels = list(layer.metadata.get("channel_names") or [])
    if len(labels) != n_channels:
        labels = _layers.channel_names({}, n_channels)
    short = _layers.image_outputs()[layer.metadata["normcheck_output"]][0]
    name = _layers.layer_name(short, labels[shown] if n_channels > 1 else None)
    return [LiveChannel(level.source, shown) for level in levels], name, shown


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
