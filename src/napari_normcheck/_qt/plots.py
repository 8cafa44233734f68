"""Plots of a run with matplotlib in napari's colours: axes, ticks, labels, each savable as PNG/SVG.

- :class:`DisparityHistogram`: per-tile disparity of one output channel, the global value marked;
- :class:`FeatureMeanPlot`: per-tile mean input of a normalization layer's channel against the
  layer's running mean, with bands of 1 and 2 running standard deviations;
- :class:`DisparityScatter`: per tile, ``|feature z|`` against disparity; a click on a point (or a
  hover) names its tile, and the widget moves the viewer there.

A plot redraws only while it is visible (matplotlib draws on the GUI thread); a hidden one is
redrawn when it is shown.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Signal  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import (  # noqa: TID253
    QFileDialog,
    QHBoxLayout,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

N_BINS = 20
#: Points within this distance (screen pixels) of the pointer are hit by a click or a hover.
PICK_PIXELS = 8.0
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
    """A matplotlib figure with one axes in napari's colours, and a Save button (PNG or SVG).

    Parameters
    ----------
    parent : QWidget, optional
        The parent widget.

    Attributes
    ----------
    figure : matplotlib.figure.Figure
        The figure.
    axes : matplotlib.axes.Axes
        Its axes.
    canvas : FigureCanvasQTAgg
        The Qt widget drawing it.
    """

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.colors = napari_colors()
        # Fixed margins (fractions, so the plot resizes with the dock): a layout engine would
        # re-solve the layout at every draw, several times the cost of drawing.
        self.figure = Figure(figsize=(4.0, 2.6), dpi=90)
        self.figure.subplots_adjust(left=0.15, right=0.97, bottom=0.19, top=0.89)
        self.figure.set_facecolor(self.colors["background"])
        self.axes = self.figure.add_subplot()
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("save this plot as PNG or SVG")
        self.save_button.clicked.connect(lambda: self.save())
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas, 1)
        layout.addLayout(row)
        self._stale = False
        self.style_axes()

    def warm_up(self) -> None:
        """Draw once off-screen: matplotlib's first draw loads fonts (once per process)."""
        self.canvas.draw()

    def style_axes(self) -> None:
        """Napari's colours on the axes (call after ``axes.clear()``)."""
        ax, colors = self.axes, self.colors
        ax.set_facecolor(colors["background"])
        for spine in ax.spines.values():
            spine.set_color(colors["text"])
        ax.tick_params(colors=colors["text"], labelsize=8)
        ax.xaxis.label.set_color(colors["text"])
        ax.yaxis.label.set_color(colors["text"])
        ax.title.set_color(colors["text"])
        ax.grid(True, color=colors["grid"], linewidth=0.5, alpha=0.6)

    def legend(self) -> None:
        """A legend in napari's colours (when something is labelled)."""
        handles, _labels = self.axes.get_legend_handles_labels()
        if handles:
            legend = self.axes.legend(
                fontsize=7, facecolor=self.colors["background"], loc="upper right"
            )
            legend.get_frame().set_edgecolor(self.colors["grid"])
            for text in legend.get_texts():
                text.set_color(self.colors["text"])

    def redraw(self) -> None:
        """Draw when visible (the next time it is shown otherwise)."""
        if self.isVisible():
            self._stale = False
            self.canvas.draw_idle()
        else:
            self._stale = True

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        """Draw what changed while hidden."""
        super().showEvent(event)
        if self._stale:
            self._stale = False
            self.canvas.draw_idle()

    def save(self, path: str | Path | None = None) -> Path | None:
        """Save the plot (``.png``, ``.svg`` or any format matplotlib knows); asks where if not told."""
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save the plot", "normcheck_plot.png", "PNG (*.png);;SVG (*.svg)"
            )
            if not path:
                return None
        path = Path(path)
        self.figure.savefig(path, facecolor=self.figure.get_facecolor(), dpi=150)
        return path


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
        super().__init__(parent)
        self.counts = np.zeros(N_BINS, dtype=int)
        self.edges = np.linspace(0.0, 1.0, N_BINS + 1)
        self.global_value: float | None = None
        ax = self.axes
        self._bars = ax.stairs(self.counts, self.edges, fill=True, color=_ACCENT, alpha=0.85)
        self._bars.set_label("tiles")
        self._global = ax.axvline(0.0, color=_LINE, linewidth=2, label="whole region")
        ax.set_xlabel("soft disparity per tile (1 − soft Dice, 0–1)")
        ax.set_ylabel("tiles")
        self.legend()
        self.set_values([])

    def set_values(self, values: Any, global_value: float | None = None, channel: str = "") -> None:
        """Bin the finite ``values`` (one per tile) over ``[0, max]`` and redraw."""
        finite = np.asarray([v for v in np.ravel(values) if math.isfinite(v)], dtype=float)
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        known = global_value is not None and math.isfinite(global_value)
        if known:
            top = max(top, float(global_value))
        self.counts, self.edges = np.histogram(finite, bins=N_BINS, range=(0.0, top))
        self.global_value = global_value
        ax = self.axes
        self._bars.set_data(self.counts, self.edges)
        self._global.set_xdata([global_value, global_value] if known else [0.0, 0.0])
        self._global.set_visible(known)
        title = f"Disparity per tile{' · ' + channel if channel else ''}"
        ax.set_title(title + (f" (whole region {global_value:.3f})" if known else ""), fontsize=9)
        ax.set_xlim(0.0, top)
        ax.set_ylim(0.0, max(int(self.counts.max()), 1) * 1.08)
        self.redraw()


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
        from matplotlib.patches import Rectangle

        super().__init__(parent)
        self.tiles = np.zeros(0, dtype=int)
        self.tile_means = np.zeros(0)
        self.running_mean: float | None = None
        self.running_std: float | None = None
        ax = self.axes
        across = ax.get_yaxis_transform()  # x in axes fraction, y in data
        self._bands = []
        for k, alpha in ((2, 0.15), (1, 0.3)):
            band = Rectangle((0, 0), 1, 0, transform=across, color=_LINE, alpha=alpha, lw=0)
            band.set_label(f"± {k} running std")
            ax.add_patch(band)
            self._bands.append((k, band))
        self._mean_line = ax.axhline(0.0, color=_LINE, linewidth=2, label="running mean")
        self._points = ax.scatter([], [], s=14, color=_ACCENT, label="tile mean", zorder=3)
        ax.set_xlabel("tile (scan order)")
        ax.set_ylabel("mean input (feature units)")
        self.legend()
        self.set_data([], [])

    def set_data(
        self,
        tiles: Any,
        means: Any,
        running_mean: float | None = None,
        running_std: float | None = None,
        title: str = "",
    ) -> None:
        """Plot ``means`` (one per tile in ``tiles``) against the running statistics; redraw."""
        self.tiles = np.asarray(tiles, dtype=int)
        self.tile_means = np.asarray(means, dtype=float)
        self.running_mean, self.running_std = running_mean, running_std
        has_mean = running_mean is not None and math.isfinite(running_mean)
        has_std = has_mean and running_std is not None and math.isfinite(running_std)
        values = list(self.tile_means[np.isfinite(self.tile_means)])
        self._mean_line.set_visible(has_mean)
        if has_mean:
            self._mean_line.set_ydata([running_mean, running_mean])
            values.append(running_mean)
        for k, band in self._bands:
            band.set_visible(has_std)
            if has_std:
                band.set_y(running_mean - k * running_std)
                band.set_height(2 * k * running_std)
                values += [running_mean - k * running_std, running_mean + k * running_std]
        points = np.column_stack([self.tiles, self.tile_means]) if self.tiles.size else []
        self._points.set_offsets(np.reshape(points, (-1, 2)))
        ax = self.axes
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        pad = (high - low) * 0.06 or 1.0
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlim(-0.5, max(int(self.tiles.max()) if self.tiles.size else 0, 1) + 0.5)
        ax.set_title(title or "Feature mean per tile", fontsize=9)
        self.redraw()


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
        The highlighted tile.
    """

    tile_clicked = Signal(int)

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.tiles = np.zeros(0, dtype=int)
        self.z = np.zeros(0)
        self.disparity = np.zeros(0)
        self.selected: int | None = None
        self._hovered: int | None = None
        ax = self.axes
        self._points = ax.scatter([], [], s=16, color=_ACCENT, zorder=3)
        (self._ring,) = ax.plot([], [], "o", markersize=11, mfc="none", mec="#ffffff", mew=2)
        self._label = ax.annotate(
            "",
            (0, 0),
            xytext=(8, 8),
            textcoords="offset points",
            fontsize=8,
            color=self.colors["text"],
            bbox={"boxstyle": "round", "fc": self.colors["background"], "ec": self.colors["grid"]},
            visible=False,
        )
        ax.set_ylabel("soft disparity per tile (0–1)")
        self.canvas.mpl_connect("button_press_event", self._on_press)
        self.canvas.mpl_connect("motion_notify_event", self._on_motion)
        self.set_data([], [], [], xlabel="|feature z| per tile (running std)")

    def set_data(
        self, tiles: Any, z: Any, disparity: Any, xlabel: str = "", title: str = ""
    ) -> None:
        """Plot one point per tile (non-finite ones left out) and redraw."""
        tiles, z, disparity = (np.asarray(a, dtype=float) for a in (tiles, z, disparity))
        keep = np.isfinite(z) & np.isfinite(disparity)
        self.tiles = tiles[keep].astype(int)
        self.z, self.disparity = np.abs(z[keep]), disparity[keep]
        ax = self.axes
        self._points.set_offsets(np.column_stack([self.z, self.disparity]).reshape(-1, 2))
        top_z = float(self.z.max()) if self.z.size else 1.0
        top_d = float(self.disparity.max()) if self.disparity.size else 1.0
        ax.set_xlim(0.0, (top_z or 1.0) * 1.08)
        ax.set_ylim(0.0, (top_d or 1.0) * 1.08)
        if xlabel and xlabel != ax.get_xlabel():
            ax.set_xlabel(xlabel)
        ax.set_title(title or "Feature shift vs disparity (click a tile)", fontsize=9)
        self._hovered = None
        self._label.set_visible(False)
        self.select_tile(self.selected, draw=False)
        self.redraw()

    def select_tile(self, index: int | None, draw: bool = True) -> None:
        """Ring the point of tile ``index`` (nothing when it is not plotted)."""
        self.selected = index
        hit = np.flatnonzero(self.tiles == index) if index is not None else []
        if len(hit):
            self._ring.set_data([self.z[hit[0]]], [self.disparity[hit[0]]])
        else:
            self._ring.set_data([], [])
        if draw:
            self.redraw()

    def point_position(self, index: int) -> tuple[float, float] | None:
        """Where tile ``index``'s point is drawn, in the canvas widget's coordinates (Qt pixels)."""
        hit = np.flatnonzero(self.tiles == index)
        if not len(hit):
            return None
        self.canvas.draw()  # the transforms of the current size
        x, y = self.axes.transData.transform((self.z[hit[0]], self.disparity[hit[0]]))
        ratio = self.canvas.device_pixel_ratio or 1.0
        return x / ratio, self.canvas.height() - y / ratio

    def tile_at(self, event: Any) -> int | None:
        """The tile whose point is nearest the mouse event (within :data:`PICK_PIXELS`)."""
        if event.inaxes is not self.axes or not self.tiles.size:
            return None
        points = self.axes.transData.transform(np.column_stack([self.z, self.disparity]))
        distance = np.hypot(points[:, 0] - event.x, points[:, 1] - event.y)
        ratio = self.canvas.device_pixel_ratio or 1.0
        nearest = int(distance.argmin())
        return int(self.tiles[nearest]) if distance[nearest] <= PICK_PIXELS * ratio else None

    def _on_press(self, event: Any) -> None:
        tile = self.tile_at(event)
        if tile is not None:
            self.select_tile(tile)
            self.tile_clicked.emit(tile)

    def _on_motion(self, event: Any) -> None:
        tile = self.tile_at(event)
        if tile == self._hovered:
            return
        self._hovered = tile
        if tile is None:
            self._label.set_visible(False)
        else:
            i = int(np.flatnonzero(self.tiles == tile)[0])
            self._label.xy = (self.z[i], self.disparity[i])
            self._label.set_text(
                f"tile {tile}\n|z| {self.z[i]:.2f}\ndisparity {self.disparity[i]:.3f}"
            )
            self._label.set_visible(True)
        self.canvas.draw_idle()
