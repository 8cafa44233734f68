"""The feature statistics part of the dock widget: layer/channel choice, ``feature z``, the scatter.

A mixin of :class:`~napari_normcheck._qt.widget.NormcheckWidget` (it uses the widget's result
layers and tile table).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox  # noqa: TID253 (the Qt layer)

from napari_normcheck._qt.plots import FeatureScatter
from napari_normcheck._qt.steps import step


class FeatureSection:
    """Per-layer feature statistics after a run (mixed into the dock widget)."""

    def _build_feature_box(self) -> QGroupBox:
        box = QGroupBox("Feature statistics (normalization inputs)")
        form = QFormLayout(box)
        self.feature_layer_combo = QComboBox()
        self.feature_layer_combo.currentIndexChanged.connect(self._on_feature_layer)
        form.addRow("layer", self.feature_layer_combo)
        self.feature_channel_combo = QComboBox()
        self.feature_channel_combo.currentIndexChanged.connect(self._on_feature_channel)
        form.addRow("channel", self.feature_channel_combo)
        self.scatter = FeatureScatter(box)
        form.addRow(self.scatter)
        return box

    def show_features(self, read: tuple | None = None, defer: bool = False) -> None:
        """Fill the feature layer choice from the store's ``feature_z``; show its layer and scatter.

        Parameters
        ----------
        read : tuple, optional
            :func:`napari_normcheck._layers.feature_z_grid` of the store, read when not given.
        defer : bool
            Add the ``feature z`` layer in a GUI step of its own (at the end of a run).
        """
        from napari_normcheck import _layers

        if read is None:
            path = self.results.store_path
            if path is not None and not path.exists() and self.results.run_out is not None:
                path = self.results.run_out
            read = _layers.feature_z_grid(path) if path is not None else None
        if read is None:
            self.update_scatter()
            return
        self.feature_grid, self.feature_layers = read[0], read[1]
        names = [str(layer.get("name", i)) for i, layer in enumerate(self.feature_layers)]
        current = self.feature_layer_combo.currentText()
        self.feature_layer_combo.blockSignals(True)
        self.feature_layer_combo.clear()
        self.feature_layer_combo.addItems(names)
        if current in names:
            self.feature_layer_combo.setCurrentText(current)
        self.feature_layer_combo.blockSignals(False)
        self._on_feature_layer(defer=defer)

    def _on_feature_layer(self, *_args: Any, defer: bool = False) -> None:
        """A layer was chosen: offer its channels (its strongest first chosen) and redraw."""
        from napari_normcheck import _layers

        index = self.feature_layer_combo.currentIndex()
        if index < 0 or self.feature_grid is None:
            return
        layer = self.feature_layers[index] if index < len(self.feature_layers) else {}
        n_channels = int(layer.get("channels") or self.feature_grid.shape[1])
        channel = _layers.strongest_channel(self.feature_grid, index)
        self.feature_channel_combo.blockSignals(True)
        self.feature_channel_combo.clear()
        self.feature_channel_combo.addItems([str(c) for c in range(n_channels)])
        self.feature_channel_combo.setCurrentIndex(min(channel, n_channels - 1))
        self.feature_channel_combo.blockSignals(False)
        self._on_feature_channel(defer=defer)
        self.update_scatter()

    def _on_feature_channel(self, *_args: Any, defer: bool = False) -> None:
        """Show the chosen layer and channel in the ``feature z`` layer."""
        layer = self.feature_layer_combo.currentIndex()
        channel = self.feature_channel_combo.currentIndex()
        if layer >= 0 and channel >= 0:
            if defer:
                self.results.steps.add(
                    step("add feature z", self.results.show_feature_z, layer, channel)
                )
            else:
                self.results.show_feature_z(layer, channel)

    def update_scatter(self) -> None:
        """Plot the chosen layer's per-tile input means against its running statistics."""
        index = self.feature_layer_combo.currentIndex()
        if index < 0 or index >= len(self.feature_layers):
            return
        layer = self.feature_layers[index]
        name = str(layer.get("name", ""))
        means = []
        for tile in sorted(self.tile_table.records):
            features = (self.tile_table.records[tile].get("features") or {}).get(name) or {}
            if features.get("mean") is not None:
                means.append(features["mean"])
        self.scatter.set_data(means, layer.get("running_mean"), layer.get("running_var"), name)
