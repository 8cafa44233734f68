"""Plots of a run with pyqtgraph in napari's colours: axes, ticks, labels, each savable as PNG/SVG.

- :class:`DisparityHistogram`: per-tile disparity of one output channel, the global value marked;
- :class:`FeatureMeanPlot`: per-tile mean input of a normalization layer's channel against the
  layer's running mean, with bands of 1 and 2 running standard deviations;
- :class:`DisparityScatter`: per tile, ``|feature z|`` against disparity; hovering a point names
  its tile, clicking it asks the widget to go there.

pyqtgraph draws with Qt on the GUI thread, and an update costs a few milliseconds: the plots can
follow a run without freezing napari (matplotlib's Agg took 100-300 ms per draw here).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QPointF, Signal  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import (  # noqa: TID253
    QFileDialog,
    QHBoxLayout,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

N_BINS = 20
_ACCENT = "#f07828"  # the tiles' orange
_LINE = "#5aaaff"


def napari_colors() -> dict[str, str]:
    """Background, text and grid colours of napari's current theme (dark by default)."""
    colors = {"background": "#262930", "text": "#f0f1f2", "grid": "#414851"}
    try:
        from napari.settings import get_settings
        from napari.utils.theme import get_theme

        name = get_settings().appearance.theme
        theme = get_theme(name if name != "system" else "dark")
        colors = {
            "background": theme.canvas.as_hex(),
            "text": theme.text.as_hex(),
            "grid": theme.foreground.as_hex(),
        }
    except Exception:  # an older napari or no settings: the dark defaults
        pass
    return colors


class PlotWidget(QWidget):
    """A pyqtgraph plot in napari's colours, with a Save button (PNG or SVG).

    Parameters
    ----------
    parent : QWidget, optional
        The parent widget.

    Attributes
    ----------
    view : pyqtgraph.PlotWidget
        The plot's Qt widget (a graphics view).
    item : pyqtgraph.PlotItem
        Its axes and contents.
    """

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        import pyqtgraph as pg

        self.colors = napari_colors()
        self.view = pg.PlotWidget(background=self.colors["background"])
        self.view.setMinimumHeight(170)
        self.view.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.item = self.view.getPlotItem()
        self.item.setMenuEnabled(False)
        self.item.getViewBox().setMouseEnabled(x=False, y=False)
        self.item.hideButtons()
        pen = pg.mkPen(self.colors["text"])
        for side in ("bottom", "left"):
            axis = self.item.getAxis(side)
            axis.setPen(pen)
            axis.setTextPen(pen)
            axis.enableAutoSIPrefix(False)  # 0.6, not 600 (x0.001)
        self.item.showGrid(x=True, y=True, alpha=0.25)
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("save this plot as PNG or SVG")
        self.save_button.clicked.connect(lambda: self.save())
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.view, 1)
        layout.addLayout(row)
        self._title = ""
        self.message = ""
        self._message = pg.TextItem("", color=self.colors["text"], anchor=(0.5, 0.5))
        self._message.setZValue(10)
        self.item.getViewBox().addItem(self._message, ignoreBounds=True)

    def set_message(self, text: str) -> None:
        """Say why the plot is empty (an empty ``text`` hides the message)."""
        self.message = text
        self._message.setText(text)
        self._message.setVisible(bool(text))
        if text:
            (x0, x1), (y0, y1) = self.item.getViewBox().viewRange()
            self._message.setPos((x0 + x1) / 2, (y0 + y1) / 2)

    def set_labels(self, x: str, y: str) -> None:
        """Axis labels (units in the text)."""
        style = {"color": self.colors["text"], "font-size": "9pt"}
        self.item.setLabel("bottom", x, **style)
        self.item.setLabel("left", y, **style)

    def set_title(self, text: str) -> None:
        """The plot's title."""
        if text != self._title:
            self._title = text
            self.item.setTitle(text, color=self.colors["text"], size="9pt")

    def title(self) -> str:
        """The plot's title."""
        return self._title

    def labels(self) -> tuple[str, str]:
        """The x and y axis labels."""
        return (self.item.getAxis("bottom").labelText, self.item.getAxis("left").labelText)

    def save(self, path: str | Path | None = None) -> Path | None:
        """Save the plot as ``.svg`` or as an image (``.png``); asks where when not told."""
        import pyqtgraph.exporters as exporters

        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save the plot", "normcheck_plot.png", "PNG (*.png);;SVG (*.svg)"
            )
            if not path:
                return None
        path = Path(path)
        if path.suffix.lower() == ".svg":
            self._save_svg(path)
        else:
            exporter = exporters.ImageExporter(self.item)
            width = max(int(self.item.sceneBoundingRect().width()), 400)
            exporter.parameters()["width"] = 2 * width  # twice the screen's resolution
            exporter.export(str(path))
        return path

    def _save_svg(self, path: Path) -> None:
        """The plot's scene drawn into an SVG file by Qt (vector paths and text)."""
        from qtpy.QtCore import QRectF, QSize  # noqa: TID253
        from qtpy.QtGui import QPainter  # noqa: TID253
        from qtpy.QtSvg import QSvgGenerator  # noqa: TID253

        source = self.item.sceneBoundingRect()
        generator = QSvgGenerator()
        generator.setFileName(str(path))
        generator.setSize(QSize(int(source.width()), int(source.height())))
        generator.setViewBox(QRectF(0, 0, source.width(), source.height()))
        generator.setTitle(self._title)
        painter = QPainter(generator)
        try:
            target = QRectF(0, 0, source.width(), source.height())
            painter.fillRect(target, self.view.backgroundBrush())
            self.view.scene().render(painter, target, source)
        finally:
            painter.end()


class DisparityHistogram(PlotWidget):
    """Histogram of per-tile disparity of one output channel, the global value as a line.

    Attributes
    ----------
    counts : numpy.ndarray
        Tiles per bin.
    edges : numpy.ndarray
        Bin edges (``len(counts) + 1``).
    global_value : float or None
        The whole region's disparity of the channel (marked).
    """

    def __init__(self, parent: Any = None) -> None:
        import pyqtgraph as pg

        super().__init__(parent)
        self.counts = np.zeros(N_BINS, dtype=int)
        self.edges = np.linspace(0.0, 1.0, N_BINS + 1)
        self.global_value: float | None = None
        self._bars = pg.PlotCurveItem(
            x=self.edges,
            y=self.counts.astype(float),
            stepMode="center",
            fillLevel=0,
            brush=pg.mkBrush(_ACCENT),
            pen=pg.mkPen(_ACCENT),
        )
        self.item.addItem(self._bars)
        self._global = pg.InfiniteLine(angle=90, pen=pg.mkPen(_LINE, width=2))
        self.item.addItem(self._global)
        self.set_labels("soft disparity per tile (1 − soft Dice, 0–1)", "tiles")
        self.set_values([])

    def set_values(self, values: Any, global_value: float | None = None, channel: str = "") -> None:
        """Bin the finite ``values`` (one per tile) over ``[0, max]``; mark ``global_value``."""
        finite = np.asarray([v for v in np.ravel(values) if math.isfinite(v)], dtype=float)
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        known = global_value is not None and math.isfinite(global_value)
        if known:
            top = max(top, float(global_value))
        self.counts, self.edges = np.histogram(finite, bins=N_BINS, range=(0.0, top))
        self.global_value = global_value
        self._bars.setData(self.edges, self.counts.astype(float))
        self._global.setVisible(known)
        if known:
            self._global.setPos(float(global_value))
        title = f"Disparity per tile{' · ' + channel if channel else ''}"
        self.set_title(title + (f" (blue: whole region {global_value:.3f})" if known else ""))
        self.item.setXRange(0.0, top, padding=0.02)
        self.item.setYRange(0.0, max(int(self.counts.max()), 1) * 1.08, padding=0)
        self.set_message("" if finite.size else "no tile has finished yet")


class FeatureMeanPlot(PlotWidget):
    """Per-tile mean input of one channel of a normalization layer against its running mean.

    The running mean is a line; ``running mean ± 1`` and ``± 2`` running standard deviations are
    bands: tiles outside the outer band are normalized very differently in train and eval mode.

    Attributes
    ----------
    tiles : numpy.ndarray
        Tile indices (x).
    tile_means : numpy.ndarray
        Their mean input of the channel (y).
    running_mean, running_std : float or None
        The layer's running statistics of the channel.
    """

    def __init__(self, parent: Any = None) -> None:
        import pyqtgraph as pg

        super().__init__(parent)
        self.tiles = np.zeros(0, dtype=int)
        self.tile_means = np.zeros(0)
        self.running_mean: float | None = None
        self.running_std: float | None = None
        self._bands = []
        for k, alpha in ((2, 40), (1, 80)):
            band = pg.LinearRegionItem(
                orientation="horizontal",
                movable=False,
                brush=pg.mkBrush(90, 170, 255, alpha),
                pen=pg.mkPen(None),
            )
            self.item.addItem(band)
            self._bands.append((k, band))
        self._mean_line = pg.InfiniteLine(angle=0, pen=pg.mkPen(_LINE, width=2))
        self.item.addItem(self._mean_line)
        self._points = pg.ScatterPlotItem(size=7, brush=pg.mkBrush(_ACCENT), pen=None)
        self.item.addItem(self._points)
        self.set_labels("tile (scan order)", "mean input (feature units)")
        self.set_data([], [])

    def set_data(
        self,
        tiles: Any,
        means: Any,
        running_mean: float | None = None,
        running_std: float | None = None,
        title: str = "",
        empty: str = "no tile has finished yet",
    ) -> None:
        """Plot ``means`` (one per tile in ``tiles``) against the running statistics.

        ``empty`` says why there is nothing to plot, shown when no mean is known.
        """
        self.tiles = np.asarray(tiles, dtype=int)
        self.tile_means = np.asarray(means, dtype=float)
        self.running_mean, self.running_std = running_mean, running_std
        has_mean = running_mean is not None and math.isfinite(running_mean)
        has_std = has_mean and running_std is not None and math.isfinite(running_std)
        values = list(self.tile_means[np.isfinite(self.tile_means)])
        self._mean_line.setVisible(has_mean)
        if has_mean:
            self._mean_line.setPos(float(running_mean))
            values.append(running_mean)
        for k, band in self._bands:
            band.setVisible(has_std)
            if has_std:
                low, high = running_mean - k * running_std, running_mean + k * running_std
                band.setRegion((low, high))
                values += [low, high]
        keep = np.isfinite(self.tile_means)
        self._points.setData(self.tiles[keep].astype(float), self.tile_means[keep])
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        pad = (high - low) * 0.06 or 1.0
        self.item.setYRange(low - pad, high + pad, padding=0)
        last = int(self.tiles.max()) if self.tiles.size else 1
        self.item.setXRange(-0.5, max(last, 1) + 0.5, padding=0)
        self.set_title(
            (title or "Feature mean per tile") + " · blue: running mean, bands ±1, ±2 std"
        )
        self.set_message("" if keep.any() else empty)


class DisparityScatter(PlotWidget):
    """Per tile, ``|feature z|`` (x) against disparity (y): the diagnosis in one picture.

    Signals
    -------
    tile_clicked : Signal(int)
        Emitted with the tile index when a point is clicked.

    Attributes
    ----------
    tiles, z, disparity : numpy.ndarray
        One entry per plotted tile.
    selected : int or None
        The ringed tile.
    """

    tile_clicked = Signal(int)

    def __init__(self, parent: Any = None) -> None:
        import pyqtgraph as pg

        super().__init__(parent)
        self.tiles = np.zeros(0, dtype=int)
        self.z = np.zeros(0)
        self.disparity = np.zeros(0)
        self.selected: int | None = None
        self._points = pg.ScatterPlotItem(
            size=9,
            brush=pg.mkBrush(_ACCENT),
            pen=None,
            hoverable=True,
            hoverBrush=pg.mkBrush("#ffffff"),
            tip=self.hover_text,
        )
        self._points.sigClicked.connect(self._on_clicked)
        self.item.addItem(self._points)
        self._ring = pg.ScatterPlotItem(size=18, brush=None, pen=pg.mkPen("#ffffff", width=2))
        self.item.addItem(self._ring)
        self.set_labels("|feature z| per tile (running std)", "soft disparity (0–1)")
        self.set_data([], [], [])

    def set_data(
        self,
        tiles: Any,
        z: Any,
        disparity: Any,
        xlabel: str = "",
        title: str = "",
        empty: str = "no tile has finished yet",
        detail: str = "",
    ) -> None:
        """Plot one point per tile (non-finite ones left out); ``empty`` says why none is.

        ``detail`` is the plot's tooltip (what the axes hold, in full).
        """
        tiles, z, disparity = (np.asarray(a, dtype=float) for a in (tiles, z, disparity))
        keep = np.isfinite(z) & np.isfinite(disparity)
        self.tiles = tiles[keep].astype(int)
        self.z, self.disparity = np.abs(z[keep]), disparity[keep]
        self._points.setData(self.z, self.disparity, data=self.tiles)
        top_z = float(self.z.max()) if self.z.size else 1.0
        top_d = float(self.disparity.max()) if self.disparity.size else 1.0
        self.item.setXRange(0.0, (top_z or 1.0) * 1.08, padding=0)
        self.item.setYRange(0.0, (top_d or 1.0) * 1.08, padding=0)
        if xlabel and xlabel != self.labels()[0]:
            self.set_labels(xlabel, "soft disparity (0–1)")
        self.set_title(title or "Feature shift vs disparity (click a tile)")
        self.view.setToolTip(detail)
        self.set_message("" if self.tiles.size else empty)
        self.select_tile(self.selected)

    def hover_text(self, x: float, y: float, data: Any) -> str:
        """The tooltip of a point: its tile and values."""
        return f"tile {int(data)}\n|z| {x:.2f}\ndisparity {y:.3f}"

    def select_tile(self, index: int | None) -> None:
        """Ring the point of tile ``index`` (nothing when it is not plotted)."""
        self.selected = index
        hit = np.flatnonzero(self.tiles == index) if index is not None else []
        if len(hit):
            self._ring.setData([self.z[hit[0]]], [self.disparity[hit[0]]])
        else:
            self._ring.setData([], [])

    def point_position(self, index: int) -> tuple[float, float] | None:
        """Where tile ``index``'s point is drawn, in the plot view's viewport (Qt pixels)."""
        hit = np.flatnonzero(self.tiles == index)
        if not len(hit):
            return None
        view_box = self.item.getViewBox()
        scene = view_box.mapViewToScene(QPointF(self.z[hit[0]], self.disparity[hit[0]]))
        point = self.view.mapFromScene(scene)
        return float(point.x()), float(point.y())

    def _on_clicked(self, _item: Any, points: Any, *_args: Any) -> None:
        if len(points):
            tile = int(points[0].data())
            self.select_tile(tile)
            self.tile_clicked.emit(tile)
