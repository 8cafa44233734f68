"""The Results tab's output channel choice and its plots (histogram, feature mean, ``|z|``).

The plots: per-tile disparity histogram, feature mean per tile, ``|z|`` vs disparity.

A mixin of :class:`~napari_normcheck._qt.widget.NormcheckWidget` (it uses the widget's result
layers, tile table and finished run). The normalization layer and feature channel chosen here
drive the two feature plots and the ``feature z`` layer; the output channel chosen in the widget
drives the disparity values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from qtpy.QtCore import Qt  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import (  # noqa: TID253
    QComboBox,
    QFormLayout,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_normcheck._qt.plots import DisparityHistogram, DisparityScatter, FeatureMeanPlot
from napari_normcheck._qt.steps import step
from napari_normcheck._qt.tile_table import channel_value, judged


def tile_is_judged(record: dict[str, Any], channel: int, rule: Any) -> bool:
    """Whether a tile's hard disparity of ``channel`` is judged (enough foreground).

    The record's ``judged`` flags once the run has ended; while it runs, the same rule on the
    tile's own ``foreground_voxels`` over the voxels it writes (what the run will decide).
    """
    if isinstance(record.get("judged"), (list, tuple)):
        return judged(record, channel)
    foreground = record.get("foreground_voxels")
    if not isinstance(foreground, (list, tuple)) or not 0 <= channel < len(foreground):
        return True
    if "start" not in record or "stop" not in record:
        return True
    from napari_normcheck.core.measure.support import is_judged

    n_voxels = int(np.prod([b - a for a, b in zip(record["start"], record["stop"])]))
    return is_judged(float(foreground[channel]), n_voxels, rule)


#: Why the feature plots are empty for a model without running statistics.
NO_FEATURES = (
    "no normalization layer keeps running statistics\n(GroupNorm, InstanceNorm, LayerNorm):"
    "\nboth modes normalize alike, there is no |z| to plot"
)


class FeatureSection:
    """The plots and the normalization layer / feature channel choice (mixed into the dock widget)."""

    def _build_plots(self) -> QWidget:
        box = QWidget()
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 0, 0, 0)
        form = QFormLayout()
        self.feature_layer_combo = QComboBox()
        self.feature_layer_combo.setToolTip("the normalization layer of the feature plots")
        self.feature_layer_combo.currentIndexChanged.connect(self._on_feature_layer)
        form.addRow("norm layer", self.feature_layer_combo)
        self.feature_channel_combo = QComboBox()
        self.feature_channel_combo.setToolTip("the channel of that layer's input")
        self.feature_channel_combo.currentIndexChanged.connect(self._on_feature_channel)
        form.addRow("feature channel", self.feature_channel_combo)
        self.plot_tabs = QTabWidget()
        self.histogram = DisparityHistogram()
        self.feature_plot = FeatureMeanPlot()
        self.scatter = DisparityScatter()
        self.scatter.tile_clicked.connect(self._on_plot_tile)
        self.plot_tabs.addTab(self.scatter, "|z| vs disparity")
        self.plot_tabs.addTab(self.histogram, "Disparity")
        self.plot_tabs.addTab(self.feature_plot, "Feature mean")
        layout.addWidget(self.plot_tabs, 1)
        layout.addLayout(form)
        return box

    def clear_features(self) -> None:
        """Forget the last run's normalization layers and feature grid; empty the plots."""
        self.feature_grid = None
        self.feature_entries = []
        for combo in (self.feature_layer_combo, self.feature_channel_combo):
            combo.blockSignals(True)
            combo.clear()
            combo.blockSignals(False)
        self.tile_table.set_feature(None, None)
        waiting = "the run has started: tiles appear as they finish"
        self.histogram.set_values([])
        self.histogram.set_message(waiting)
        self.feature_plot.set_data([], [], empty=waiting)
        self.scatter.set_data([], [], [], empty=waiting)

    # --- the output channel ---------------------------------------------------------------------

    def _set_channel_labels(self, loaded: Any, n_channels: int) -> None:
        """Offer the model's output channels, by name when the model names them."""
        from napari_normcheck import _layers
        from napari_normcheck._qt import jobs

        names = jobs.output_channel_names(loaded) if loaded is not None else None
        if not (isinstance(names, (list, tuple)) and len(names) == n_channels):
            names = _layers.channel_names({}, n_channels)
        names = [str(name) for name in names]
        self.results.channel_labels = names
        if [self.channel_combo.itemText(i) for i in range(self.channel_combo.count())] == names:
            return
        self.channel_combo.blockSignals(True)
        self.channel_combo.clear()
        self.channel_combo.addItems(names)
        self.channel_combo.setCurrentIndex(min(self.results.channel, n_channels - 1))
        self.channel_combo.blockSignals(False)
        self.results.channel = self.channel_combo.currentIndex()
        self.tile_table.set_channel(self.results.channel)

    def _on_channel_activated(self, *_args: Any) -> None:
        self.user_chose_channel = True  # a choice of the user's is kept across runs

    def _on_channel_changed(self, index: int) -> None:
        """Show output channel ``index``: the same layers re-pointed, the table and plots follow."""
        if index < 0:
            return
        self.results.channel = index
        self.tile_table.set_channel(index)
        self.results.set_channel(index, self.tile_values())
        self.update_plots()

    # --- the normalization layers ----------------------------------------------------------------

    def _layer_entries(self) -> list[dict[str, Any]]:
        """The normalization layers with running statistics: the store's, else the records'."""
        if self.feature_entries:
            return self.feature_entries
        for record in self.tile_table.records.values():
            features = record.get("features") or {}
            return [
                {"name": name, "channels": len(values.get("mean") or [])}
                for name, values in features.items()
                if values.get("z") is not None
            ]
        return []

    def _fill_layer_combo(self) -> None:
        names = [str(entry.get("name", i)) for i, entry in enumerate(self._layer_entries())]
        combo = self.feature_layer_combo
        if [combo.itemData(i) for i in range(combo.count())] == names:
            return
        current = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        for i, name in enumerate(names):  # shown as type and place; the module path in the tooltip
            combo.addItem(self.norm_layer_text(name), name)
            combo.setItemData(i, name, Qt.ItemDataRole.ToolTipRole)
        if current in names:
            combo.setCurrentIndex(names.index(current))
        combo.blockSignals(False)
        self._on_feature_layer(redraw=False)

    def show_features(self, read: tuple | None = None, defer: bool = False) -> None:
        """Take the layers from the store's ``feature_z``; show its layer and the plots.

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
        if read is not None:
            self.feature_grid, self.feature_entries = read[0], read[1]
            self.feature_layer_combo.clear()  # (refilled with the store's layers)
        self._fill_layer_combo()
        self._on_feature_channel(defer=defer)
        self.update_plots()

    def _on_feature_layer(self, *_args: Any, redraw: bool = True) -> None:
        """A layer was chosen: offer its channels (its strongest first chosen)."""
        from napari_normcheck import _layers

        index = self.feature_layer_combo.currentIndex()
        entries = self._layer_entries()
        if index < 0 or index >= len(entries):
            return
        n_channels = int(entries[index].get("channels") or 1)
        channel = 0
        if self.feature_grid is not None and index < self.feature_grid.shape[0]:
            channel = _layers.strongest_channel(self.feature_grid, index)
        self.feature_channel_combo.blockSignals(True)
        self.feature_channel_combo.clear()
        self.feature_channel_combo.addItems([str(c) for c in range(n_channels)])
        self.feature_channel_combo.setCurrentIndex(min(channel, n_channels - 1))
        self.feature_channel_combo.blockSignals(False)
        if redraw:
            self._on_feature_channel()

    def _on_feature_channel(self, *_args: Any, defer: bool = False) -> None:
        """Show the chosen layer and channel in the ``feature z`` layer and the plots."""
        layer = self.feature_layer_combo.currentIndex()
        channel = self.feature_channel_combo.currentIndex()
        if layer >= 0 and channel >= 0 and self.feature_grid is not None:
            if defer:
                self.results.steps.add(
                    step("add feature z", self.results.show_feature_z, layer, channel)
                )
            else:
                self.results.show_feature_z(layer, channel)
        if not defer:
            self.update_plots()

    # --- the plots -----------------------------------------------------------------------------

    def _global_disparity(self, channel: int) -> float | None:
        event = self.finished_event
        values = ((event.summary.get("disparity") or {}).get("soft") if event else None) or []
        return float(values[channel]) if 0 <= channel < len(values) else None

    def _running_stats(self, entry: dict[str, Any], channel: int) -> tuple[Any, Any]:
        """The layer's running mean and standard deviation of ``channel`` (``None`` if unknown)."""
        mean, var = entry.get("running_mean"), entry.get("running_var")
        if mean is None and self.model_ready is not None:
            try:  # during a run: the model's own buffers (read only)
                module = self.model_ready.loaded.module.get_submodule(str(entry["name"]))
                mean = module.running_mean.detach().cpu().numpy().tolist()
                var = module.running_var.detach().cpu().numpy().tolist()
            except (AttributeError, KeyError, TypeError):
                return None, None
        try:
            std = math.sqrt(max(float(var[channel]), 0.0)) if var is not None else None
            return (float(mean[channel]) if mean is not None else None), std
        except (IndexError, TypeError, ValueError):
            return None, None

    def update_plots(self) -> None:
        """Redraw the three plots from the tile records (visible plots only draw)."""
        channel = self.results.channel
        label = self.channel_combo.currentText()
        records = self.tile_table.records
        tiles = sorted(records)
        disparity = [channel_value(records[t].get("disparity_soft"), channel) for t in tiles]
        self.histogram.set_values(disparity, self._global_disparity(channel), label)
        entries = self._layer_entries()
        index = self.feature_layer_combo.currentIndex()
        feature_channel = max(self.feature_channel_combo.currentIndex(), 0)
        if not entries or not 0 <= index < len(entries):
            self.tile_table.set_feature(None, None)
            z = [(records[t].get("feature_z") or {}).get("max_abs", math.nan) for t in tiles]
            why = NO_FEATURES if records else "no tile has finished yet"
            self.scatter.set_data(
                tiles, z, disparity, xlabel="largest |feature z| per tile", empty=why
            )
            self.feature_plot.set_data([], [], empty=why)
            return
        entry = entries[index]
        name = str(entry.get("name", ""))
        text = self.norm_layer_text(name)
        self.tile_table.set_feature(name, feature_channel, text)
        means, z = [], []
        for t in tiles:
            values = (records[t].get("features") or {}).get(name) or {}
            means.append(channel_value(values.get("mean"), feature_channel))
            z.append(channel_value(values.get("z"), feature_channel))
        mean, std = self._running_stats(entry, feature_channel)
        self.feature_plot.set_data(
            tiles, means, mean, std, title=f"{text} · channel {feature_channel}"
        )
        self.scatter.set_data(
            tiles,
            z,
            disparity,
            # Axis label and title stay short (long ones are cut at the plot's edge): the layer
            # and channel in the title, the module path and the output channel in the tooltip.
            xlabel="|feature z| per tile",
            title=f"{text}, channel {feature_channel}",
            detail=f"x: |z| of layer {name}, channel {feature_channel}, per tile\n"
            f"y: soft disparity of {label} per tile",
            empty=f"no tile has a |z| for {text}, channel {feature_channel} yet",
        )

    def _on_plot_tile(self, index: int) -> None:
        """A point of the scatter was clicked: go to its tile and select its row."""
        self.tile_table.select_tile(index)
        self.go_to_tile(index)

    def tile_values(self) -> np.ndarray | None:
        """Per tile, the chosen channel's hard disparity from the table, the verdict's basis.

        NaN where not yet known or not judged; the outlines of tiles whose channel is not
        judged are drawn in a neutral colour (``results.tile_judged``).
        """
        if self.plan is None or not self.tile_table.records:
            return None
        channel = self.results.channel
        rule = self._min_foreground()
        values = np.full(self.plan.n_tiles, np.nan)
        judged_tiles = np.ones(self.plan.n_tiles, dtype=bool)
        for index, record in self.tile_table.records.items():
            judged_tiles[index] = tile_is_judged(record, channel, rule)
            if judged_tiles[index]:
                values[index] = channel_value(record.get("disparity_hard"), channel)
        self.results.tile_judged = judged_tiles
        return values

    def _min_foreground(self) -> Any:
        """The running check's rule for enough foreground (the default before any run)."""
        from napari_normcheck.core.measure.support import DEFAULT_MIN_FOREGROUND, MinForeground

        config = getattr(getattr(self, "run_request", None), "config", None)
        rule = getattr(config, "min_foreground", None)
        return MinForeground(*rule) if rule is not None else DEFAULT_MIN_FOREGROUND
