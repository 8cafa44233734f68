"""The Tile size tab: the sweep over tile settings for the user's model, its plot, a setting's layers.

Runs :func:`napari_normcheck._qt.sweep_job.sweep_job` (the rows and recommendation of
``napari-normcheck sweep``) in a worker thread on the Check tab's image, region, model and settings;
plots one indicator of one output channel (chosen in a box; at first the channel with the most
foreground) against the tile size, one line per overlap and blending, the recommended setting
marked with a star (Save to PNG or SVG); a click on a point opens that setting's OUT as
layers (those of the setting shown before are removed, so few layers are shown at a time).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from qtpy.QtCore import Signal  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import (  # noqa: TID253
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_normcheck._qt import sweep_job
from napari_normcheck._qt.plots import PlotWidget
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.run.sweep import channel_support, indicator, indicator_kind, n_channels

#: ``(title, row key, mode)``: the indicators the plot can show (1 - Dice of the chosen channel, hard
#: where judged, else soft: what the recommendation judges), as in the command line's sweep plot.
INDICATORS = (
    ("grid shift (eval)", "grid_shift", "eval"),
    ("grid shift (train)", "grid_shift", "train"),
    ("tile mismatch (eval)", "mismatch_eval", None),
    ("train/eval disparity", "disparity", None),
)
#: Metadata key of the layers a click on the plot opened (removed when another setting is opened).
SWEEP_LAYER_KEY = "normcheck_sweep_setting"


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


_LINE_COLORS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176")


def is_recommended(row: dict[str, Any], recommendation: dict[str, Any]) -> bool:
    """Whether ``row`` is the recommended setting."""
    return bool(recommendation.get("tile")) and all(
        row.get(k) == recommendation.get(k) for k in ("tile", "overlap", "blend")
    )


def setting_label(row: dict[str, Any]) -> str:
    """``"16x64x64 gaussian 0.25"``: a setting in a few words."""
    tile = "x".join(map(str, row["tile"]))
    return f"{tile} {row['blend']}" + ("" if row["overlap"] is None else f" {row['overlap']:g}")


class SweepPlot(PlotWidget):
    """Indicator against tile size (x side, voxels); emits ``row_clicked`` with a point's row."""

    row_clicked = Signal(dict)

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        import pyqtgraph as pg

        self.rows: list[dict[str, Any]] = []
        self.recommendation: dict[str, Any] = {}
        self.indicator = INDICATORS[0]
        self.channel = 0
        self.channel_label = "channel 0"
        self.item.addLegend(offset=(5, 5), labelTextColor=self.colors["text"])
        self._points = pg.ScatterPlotItem(size=10, pen=None, hoverable=True)
        self._points.sigClicked.connect(self._on_clicked)
        self._star = pg.ScatterPlotItem(
            size=22, symbol="star", brush=pg.mkBrush("#ffffff"), pen=pg.mkPen("#000000")
        )
        self._star.setZValue(-1)  # behind its point, so that a click reaches the point
        self._lines: list[Any] = []
        self.item.addItem(self._points)
        self.item.addItem(self._star)
        self.set_labels("tile size (x, voxels)", "1 - Dice (hard where judged)")
        self.set_message("run the sweep: its settings appear here")

    def set_rows(
        self,
        rows: list[dict[str, Any]],
        recommendation: dict[str, Any] | None = None,
        which: tuple[str, str, str | None] | None = None,
        channel: int | None = None,
        channel_label: str | None = None,
    ) -> None:
        """Draw ``rows`` (refused ones left out) for indicator ``which`` of output ``channel``."""
        import pyqtgraph as pg

        self.rows, self.recommendation = list(rows), dict(recommendation or {})
        self.indicator = which or self.indicator
        if channel is not None:
            self.channel = channel
            self.channel_label = channel_label or f"channel {channel}"
        title, key, mode = self.indicator
        self.set_title(f"{title}, {self.channel_label}")
        self.set_labels(
            "tile size (x, voxels)",
            f"1 - Dice (hard where judged, hollow: soft; {self.channel_label})",
        )
        for line in self._lines:
            self.item.removeItem(line)
        self._lines = []
        legend = self.item.legend
        if legend is not None:
            legend.clear()
        spots, stars = [], []
        ran = [r for r in self.rows if not r.get("refused")]
        groups = sorted({(r["blend"], r["overlap"]) for r in ran}, key=str)
        for n, (blend, overlap) in enumerate(groups):
            color = _LINE_COLORS[n % len(_LINE_COLORS)]
            points = sorted(
                (r["tile"][-1], value, r)
                for r in ran
                if (r["blend"], r["overlap"]) == (blend, overlap)
                and (value := indicator(r, key, mode, self.channel)) is not None
            )
            if not points:
                continue
            label = blend if overlap is None else f"{blend}, overlap {overlap:g}"
            line = self.item.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                pen=pg.mkPen(color, width=2),
                name=label,
            )
            self._lines.append(line)
            for side, value, row in points:
                # Hollow where the value is the soft one (too little foreground for the hard).
                soft = indicator_kind(row, key, mode, self.channel) == "soft"
                spots.append(
                    {
                        "pos": (side, value),
                        "data": row,
                        "brush": pg.mkBrush(None if soft else color),
                        "pen": pg.mkPen(color, width=2),
                    }
                )
                if is_recommended(row, self.recommendation):
                    stars.append({"pos": (side, value)})
        self._points.setData(spots)
        self._star.setData(stars)
        self.set_message("" if spots else "no setting has this indicator (grid shift off?)")

    def point_rows(self) -> list[dict[str, Any]]:
        """The rows drawn as points, in drawing order."""
        return [spot.data() for spot in self._points.points()]

    def star_position(self) -> tuple[float, float] | None:
        """Where the recommended setting is marked, or ``None``."""
        stars = self._star.points()
        return None if not len(stars) else (stars[0].pos().x(), stars[0].pos().y())

    def _on_clicked(self, _item: Any, points: Any, *_args: Any) -> None:
        if len(points):
            self.row_clicked.emit(points[0].data())


class TileSizeView(QWidget):
    """The sweep's settings, Run and Cancel, the plot and the recommendation.

    Parameters
    ----------
    dock : NormcheckWidget
        The dock widget: its image, level, region, model and settings are the sweep's input.

    Signals
    -------
    sweep_settled
        The sweep's worker has finished (rows and recommendation shown).
    """

    sweep_settled = Signal()

    def __init__(self, dock: Any) -> None:
        super().__init__()
        self.dock = dock
        self.viewer = dock.viewer
        self.worker: Any = None
        self.request: sweep_job.SweepRequest | None = None
        self.rows: list[dict[str, Any]] = []
        self.recommendation: dict[str, Any] = {}
        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.tiles = QLineEdit("32,64,64 32,96,96 32,128,128")
        self.tiles.setToolTip("tiles to try, Z,Y,X each, separated by spaces")
        form.addRow("tiles", self.tiles)
        self.overlaps = QLineEdit("0.25")
        self.overlaps.setToolTip("overlaps to try, separated by spaces")
        form.addRow("overlaps", self.overlaps)
        self.blends = QLineEdit("gaussian")
        self.blends.setToolTip("blendings to try: gaussian, constant, crop (separated by spaces)")
        form.addRow("blending", self.blends)
        self.grid_shift = QCheckBox("grid shift (half a step)")
        self.grid_shift.setChecked(True)
        self.grid_shift.setToolTip(
            "measure how much the stitched result changes when the grid moves (the main indicator)"
        )
        form.addRow(self.grid_shift)
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("(a new folder in the temporary directory)")
        form.addRow("sweep folder", self.folder)
        layout.addLayout(form)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run sweep")
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.status = QLabel("the image, region, model and settings of the Check tab are used")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        choices = QHBoxLayout()
        self.indicator_combo = QComboBox()
        self.indicator_combo.addItems([title for title, _key, _mode in INDICATORS])
        self.indicator_combo.currentIndexChanged.connect(self._redraw)
        choices.addWidget(self.indicator_combo, 1)
        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip(
            "the output channel the plot shows (at first the one with the most foreground); "
            "the recommendation weighs every channel"
        )
        # A choice (any change but the default's, which is made with signals blocked) is kept
        # while the sweep's rows come in.
        self.channel_combo.currentIndexChanged.connect(self._on_channel_chosen)
        self._channel_chosen = False
        choices.addWidget(self.channel_combo, 1)
        layout.addLayout(choices)
        self.plot = SweepPlot()
        self.plot.row_clicked.connect(self.load_setting)
        layout.addWidget(self.plot, 1)
        self.recommendation_label = QLabel("")
        self.recommendation_label.setWordWrap(True)
        layout.addWidget(self.recommendation_label)

    # --- the sweep --------------------------------------------------------------------------------

    def sweep_request(self) -> sweep_job.SweepRequest:
        """The sweep of the form on the Check tab's input (raises :class:`NormcheckError`)."""
        from napari_normcheck._qt.url_open import open_layer_volume
        from napari_normcheck.core.base.config import RunConfig
        from napari_normcheck.core.run.sweep import sweep_settings

        dock = self.dock
        layer = dock.selected_image()
        if layer is None:
            raise NormcheckError("add an image layer and choose it in the Check tab")
        level = dock.level_spin.value() if layer.multiscale else 0
        volume = open_layer_volume(layer, level)
        scale, translate = dock.input_transform(layer)
        volume = dataclasses.replace(volume, scale=scale, translation=translate)
        config = dock.build_config(volume.spatial_shape, layer)
        config = config.replace(grid_shift=0.5 if self.grid_shift.isChecked() else 0.0)
        tiles = [RunConfig.from_options({"tile": t}).tile for t in self.tiles.text().split()]
        try:
            overlaps = [float(v) for v in self.overlaps.text().split()] or [config.overlap]
        except ValueError:
            raise NormcheckError(
                f"overlaps: numbers please, not {self.overlaps.text()!r}"
            ) from None
        blends = self.blends.text().split() or [config.blend]
        if not tiles:
            raise NormcheckError("give at least one tile to try (Z,Y,X)")
        text = self.folder.text().strip()
        folder = (
            Path(text).expanduser()
            if text
            else Path(tempfile.gettempdir())
            / "napari-normcheck"
            / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        return sweep_job.SweepRequest(
            volume,
            config,
            sweep_settings(tiles, overlaps, blends),
            folder,
            dock.model_request(),
            dock.model_ready,
        )

    def run(self) -> Any:
        """Start the sweep in a worker thread; returns the worker (``None`` on a form error)."""
        from napari.qt.threading import thread_worker

        if self.worker is not None or self.dock.worker is not None:
            _show_error("a check or a sweep is already running; cancel it first")
            return None
        try:
            self.request = self.sweep_request()
        except NormcheckError as error:
            _show_error(str(error))
            self.status.setText(f"error: {error}")
            return None
        worker = thread_worker(sweep_job.sweep_job, start_thread=False)(self.request)
        worker.yielded.connect(self._on_item)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.rows, self.recommendation = [], {}
        self._channel_chosen = False
        self._redraw()
        self.recommendation_label.setText("")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"{len(self.request.settings)} settings into {self.request.folder}")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop after the current tile (finished settings keep their rows)."""
        if self.request is not None:
            self.request.cancel.set()
            self.cancel_button.setEnabled(False)

    def _on_item(self, item: Any) -> None:
        from napari_normcheck._qt.jobs import JobError, ModelReady

        if isinstance(item, JobError):
            _show_error(item.message)
            self.status.setText(f"error: {item.message}")
        elif isinstance(item, ModelReady):
            self.dock.model_ready = item  # the Check tab reuses it
        elif isinstance(item, sweep_job.SweepProgress):
            self.status.setText(
                f"setting {item.n}/{item.n_settings} ({item.name.removesuffix('.zarr')}): "
                f"{item.tiles_done}/{item.tiles_total} tiles"
            )
        elif isinstance(item, sweep_job.SweepRowDone):
            self.rows.append(item.row)
            self._redraw()
        elif isinstance(item, sweep_job.SweepDone):
            self.rows, self.recommendation = item.rows, item.recommendation
            self._redraw()
            self.recommendation_label.setText(f"recommendation: {item.recommendation['text']}")
            refused = sum(1 for r in item.rows if r.get("refused"))
            self.status.setText(
                f"done: {len(item.rows)} settings ({refused} refused) in {self.request.folder}; "
                "click a point to open its layers"
            )

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.sweep_settled.emit()

    def channel_labels(self, n: int) -> list[str]:
        """Names of the ``n`` output channels: the model's when it names them all."""
        from napari_normcheck._qt.jobs import output_channel_names

        ready = getattr(self.dock, "model_ready", None)
        names = output_channel_names(ready.loaded) if ready is not None else None
        if names and len(names) == n:
            return [str(name) for name in names]
        return [f"channel {c}" for c in range(n)]

    def default_channel(self) -> int:
        """The channel with the most foreground (soft, eval and train) over the rows; 0 if none."""
        support = channel_support(self.rows)
        return max(range(len(support)), key=lambda c: (support[c], -c)) if support else 0

    def _on_channel_chosen(self, _index: int) -> None:
        self._channel_chosen = True
        self._redraw()

    def _sync_channels(self) -> None:
        # One entry per output channel of the rows; the default until the user chooses one.
        n = n_channels(self.rows)
        labels = self.channel_labels(n)
        combo = self.channel_combo
        combo.blockSignals(True)
        if [combo.itemText(i) for i in range(combo.count())] != labels:
            current = combo.currentIndex()
            combo.clear()
            combo.addItems(labels)
            combo.setCurrentIndex(current if 0 <= current < n else 0)
        if n and not self._channel_chosen:
            combo.setCurrentIndex(self.default_channel())
        combo.blockSignals(False)

    def _redraw(self, *_args: Any) -> None:
        self._sync_channels()
        which = INDICATORS[max(self.indicator_combo.currentIndex(), 0)]
        channel = max(self.channel_combo.currentIndex(), 0)
        label = self.channel_combo.currentText() or f"channel {channel}"
        self.plot.set_rows(self.rows, self.recommendation, which, channel, label)

    # --- a setting's layers -----------------------------------------------------------------------

    def load_setting(self, row: dict[str, Any]) -> list[Any]:
        """Open the OUT of ``row``'s setting as layers: the outputs the check shows, and its tiles.

        The last opened setting's layers are removed and the check's result layers hidden, so
        that the image and a handful of maps are shown at a time (the reader opens every output;
        the dock shows the same few as after a check).
        """
        from napari.layers import Layer

        from napari_normcheck import _layers
        from napari_normcheck._reader import layers_from_store

        for layer in [lay for lay in self.viewer.layers if SWEEP_LAYER_KEY in lay.metadata]:
            self.viewer.layers.remove(layer)
        for layer in self.viewer.layers:
            if "normcheck_output" in layer.metadata:
                layer.visible = False
        shown_outputs = set(_layers.widget_outputs())
        label = setting_label(row)
        added = []
        for data, kwargs, kind in layers_from_store(row["out"]):
            if kind == "image" and kwargs["metadata"].get("normcheck_output") not in shown_outputs:
                continue
            kwargs = dict(kwargs)
            kwargs["name"] = f"{kwargs.get('name', kind)} [{label}]"
            kwargs["metadata"] = {**kwargs.get("metadata", {}), SWEEP_LAYER_KEY: label}
            added.append(self.viewer.add_layer(Layer.create(data, kwargs, kind)))
        self.status.setText(f"opened {row['out']} ({label}): {len(added)} layers")
        return added
