"""The output channel the result layers show, their order in the layer list, the ``feature z`` layer.

A mixin of :class:`~napari_normcheck._qt.results.ResultLayers`: choosing another channel re-points
the same layers (the widget's and the remedies') at that channel of the arrays they read, renames
them (``disparity · membrane``) and recolours the tile outlines; no layer is added.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_normcheck import _layers
from napari_normcheck._qt import layer_data
from napari_normcheck._qt.steps import step


class ChannelChoice:
    """Channel switching, layer order and ``feature z`` of the result layers (a mixin).

    Notes
    -----
    The class it is mixed into provides ``viewer``, ``layers``, ``feature_layer``,
    ``tiles_layer``, ``channel``, ``channel_labels``, ``store_path``, ``run_out``, ``steps``,
    ``_off_thread`` and ``_update_tiles``.
    """

    viewer: Any
    layers: dict[str, Any]
    feature_layer: Any
    tiles_layer: Any
    channel: int
    channel_labels: list[str]
    store_path: Path | None
    run_out: Path | None

    def labels_for(self, n_channels: int) -> list[str]:
        """Names of ``n_channels`` output channels: the model's when they fit, else ``c<k>``."""
        if len(self.channel_labels) == n_channels:
            return list(self.channel_labels)
        return _layers.channel_names({}, n_channels)

    def output_layers(self) -> list[Any]:
        """Every layer in the viewer showing one channel of a store output (remedies' too)."""
        return [layer for layer in self.viewer.layers if layer_data.is_output_layer(layer)]

    def set_channel(
        self, channel: int, tile_values: Any = None, contrast: Callable[[], None] | None = None
    ) -> None:
        """Show output channel ``channel`` in the same layers (renamed); no layer is added.

        Parameters
        ----------
        channel : int
            The output channel.
        tile_values : numpy.ndarray, optional
            That channel's per-tile disparity, for the outline colours.
        contrast : callable, optional
            Called on the GUI thread once layers whose contrast follows their data (logits) got
            their new limits (read off the GUI thread).
        """
        self.channel = int(channel)
        switched = [layer for layer in self.output_layers()]
        for layer in switched:
            layer_data.show_channel(layer, self.channel)
        for layer in self.layers.values():  # stand-ins: the name of the channel they will show
            if layer in self.viewer.layers and layer_data.is_stand_in(layer):
                labels = list(layer.metadata.get("channel_names") or [])
                if 0 <= self.channel < len(labels) and len(labels) > 1:
                    short = _layers.image_outputs()[layer.metadata["normcheck_output"]][0]
                    layer.name = _layers.layer_name(short, labels[self.channel])
        if tile_values is not None:
            self._update_tiles(tile_values)
        jobs = layer_data.limit_jobs(switched)
        if jobs:
            # The new channel's limits from its data, read off the GUI thread.
            self._off_thread(
                lambda: layer_data.data_limits(jobs),
                lambda limits: self.steps.add(step("contrast", self._apply_contrast, limits)),
                finished=contrast,
            )
        elif contrast is not None:
            contrast()

    def _apply_contrast(self, limits: list[tuple[Any, tuple[float, float]]]) -> None:
        for layer, (low, high) in limits:
            if layer in self.viewer.layers:
                if layer.metadata.get("contrast_from_data"):
                    layer.contrast_limits_range = (low, high)  # logits: their own range
                else:  # the meaning's range (0..1) stays reachable with the slider
                    layer.contrast_limits_range = (min(low, 0.0), max(high, 1.0))
                layer.contrast_limits = (low, high)

    def order_layers(self) -> None:
        """Put the result layers at the top of the layer list, in :func:`_layers.layer_order`."""
        layers = self.viewer.layers
        ranked = {name: rank for rank, name in enumerate(_layers.layer_order())}
        own = [*self.layers.values(), self.tiles_layer, self.feature_layer]
        ours = [
            layer
            for layer in layers
            if layer.metadata.get("normcheck_output") in ranked
            and (any(layer is o for o in own) or layer_data.is_output_layer(layer))
        ]
        wanted = sorted(ours, key=lambda layer: -ranked[layer.metadata["normcheck_output"]])
        top = len(layers) - len(wanted)
        if [layers.index(layer) for layer in wanted] == list(range(top, len(layers))):
            return
        # Bottom-ranked first: each one moved to the top leaves the earlier ones below it.
        for layer in wanted:
            layers.move(layers.index(layer), len(layers))

    def show_feature_z(self, layer: int = 0, channel: int | None = None) -> Any:
        """Add (or update) the ``feature z`` layer from the current store; ``None`` when it has none.

        Parameters
        ----------
        layer : int
            Index of the normalization layer in the store's ``feature_z`` attributes.
        channel : int, optional
            The feature channel; the one with the largest ``|z|`` by default.
        """
        if self.store_path is None:
            return None
        path = self.store_path
        if not path.exists() and self.run_out is not None:
            path = self.run_out
        read = _layers.feature_z_layer(path, layer, channel)
        if read is None:
            return None
        data, kwargs, _ = read
        existing = self.feature_layer
        if existing is not None and existing in self.viewer.layers:
            existing.data = data
            existing.scale, existing.translate = kwargs["scale"], kwargs["translate"]
            existing.contrast_limits = kwargs["contrast_limits"]
            existing.metadata.update(kwargs["metadata"])
        else:
            self.feature_layer = self.viewer.add_image(data, **kwargs)
        return self.feature_layer
