"""A small histogram of per-tile disparity, painted with Qt (no plotting library needed)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from qtpy.QtCore import QRectF, Qt  # noqa: TID253 (the Qt layer)
from qtpy.QtGui import QColor, QPainter  # noqa: TID253
from qtpy.QtWidgets import QSizePolicy, QWidget  # noqa: TID253

N_BINS = 20


class DisparityHistogram(QWidget):
    """Histogram of per-tile soft disparity over ``[0, max]``, redrawn on :meth:`set_values`.

    Attributes
    ----------
    counts : numpy.ndarray
        Tiles per bin.
    edges : numpy.ndarray
        Bin edges (``len(counts) + 1``).
    """

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.counts = np.zeros(N_BINS, dtype=int)
        self.edges = np.linspace(0.0, 1.0, N_BINS + 1)
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("tiles per soft-disparity bin")

    def set_values(self, values: Any) -> None:
        """Bin the finite ``values`` (one per tile) and repaint."""
        finite = np.asarray([v for v in np.ravel(values) if math.isfinite(v)], dtype=float)
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        self.counts, self.edges = np.histogram(finite, bins=N_BINS, range=(0.0, top))
        self.update()

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 (Qt's name)
        """Draw the bars, with the value range written below."""
        painter = QPainter(self)
        try:
            width, height = self.width(), self.height()
            text_height = painter.fontMetrics().height()
            plot_height = max(height - text_height - 4, 1)
            painter.fillRect(0, 0, width, height, QColor(40, 40, 40))
            peak = max(int(self.counts.max()), 1)
            bar_width = width / len(self.counts)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor(240, 120, 40))
            for i, count in enumerate(self.counts):
                bar = plot_height * count / peak
                painter.drawRect(QRectF(i * bar_width + 1, plot_height - bar, bar_width - 2, bar))
            painter.setPen(QColor(220, 220, 220))
            painter.drawText(2, height - 4, f"{self.edges[0]:.3g}")
            label = f"{self.edges[-1]:.3g}  ({int(self.counts.sum())} tiles, max {peak})"
            text_width = painter.fontMetrics().horizontalAdvance(label)
            painter.drawText(width - text_width - 2, height - 4, label)
        finally:
            painter.end()


class FeatureScatter(QWidget):
    """Per-channel input means of one normalization layer: a dot per tile, the running mean and band.

    x is the channel index; y each tile's mean of that channel's input. The layer's running mean is
    drawn as a line with markers, ``running mean ± sqrt(running var)`` as a shaded band.

    Attributes
    ----------
    tile_means : numpy.ndarray
        ``(n_tiles, n_channels)`` input means (NaN where unknown).
    running_mean, running_var : numpy.ndarray
        The layer's running statistics per channel (empty when unknown).
    title : str
        The layer's name.
    """

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.tile_means = np.zeros((0, 0))
        self.running_mean = np.zeros(0)
        self.running_var = np.zeros(0)
        self.title = ""
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("per-tile input mean per channel; line: running mean ± sqrt(running var)")

    def set_data(
        self,
        tile_means: Any,
        running_mean: Any = None,
        running_var: Any = None,
        title: str = "",
    ) -> None:
        """Show ``tile_means`` (one row per tile) against the running statistics, and repaint."""
        rows = [np.asarray(row, dtype=float).ravel() for row in tile_means]
        n_channels = max(
            [len(r) for r in rows] + [0 if running_mean is None else len(running_mean)]
        )
        means = np.full((len(rows), n_channels), np.nan)
        for i, row in enumerate(rows):
            means[i, : len(row)] = row
        self.tile_means = means
        self.running_mean = np.asarray(running_mean if running_mean is not None else [], float)
        self.running_var = np.asarray(running_var if running_var is not None else [], float)
        self.title = title
        self.update()

    @property
    def points(self) -> np.ndarray:
        """The finite dots as ``(n, 2)`` rows of (channel, mean)."""
        channel = np.broadcast_to(np.arange(self.tile_means.shape[1]), self.tile_means.shape)
        keep = np.isfinite(self.tile_means)
        return np.stack([channel[keep], self.tile_means[keep]], axis=1)

    def _y_range(self) -> tuple[float, float]:
        values = [self.tile_means[np.isfinite(self.tile_means)]]
        if self.running_mean.size:
            sd = np.sqrt(np.clip(self.running_var, 0, None)) if self.running_var.size else 0.0
            values += [self.running_mean - sd, self.running_mean + sd]
        finite = np.concatenate([np.ravel(v) for v in values])
        finite = finite[np.isfinite(finite)]
        if not finite.size:
            return (0.0, 1.0)
        low, high = float(finite.min()), float(finite.max())
        pad = (high - low) * 0.05 or 1.0
        return (low - pad, high + pad)

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 (Qt's name)
        """Draw the band, the running-mean line and the tile dots."""
        from qtpy.QtCore import QPointF  # noqa: TID253
        from qtpy.QtGui import QPen, QPolygonF  # noqa: TID253

        painter = QPainter(self)
        try:
            width, height = self.width(), self.height()
            text_height = painter.fontMetrics().height()
            top, bottom = text_height + 4, max(height - text_height - 4, text_height + 6)
            left, right = 4.0, max(width - 4.0, 5.0)
            painter.fillRect(0, 0, width, height, QColor(40, 40, 40))
            n = max(self.tile_means.shape[1], self.running_mean.size)
            low, high = self._y_range()

            def px(channel: float) -> float:
                return left + (channel + 0.5) * (right - left) / max(n, 1)

            def py(value: float) -> float:
                return bottom - (value - low) / (high - low) * (bottom - top)

            mean = self.running_mean
            if mean.size:
                sd = np.sqrt(np.clip(self.running_var, 0, None)) if self.running_var.size else None
                if sd is not None and sd.size == mean.size:
                    upper = [QPointF(px(c), py(m + s)) for c, (m, s) in enumerate(zip(mean, sd))]
                    lower = [QPointF(px(c), py(m - s)) for c, (m, s) in enumerate(zip(mean, sd))]
                    painter.setPen(Qt.PenStyle.NoPen)
                    painter.setBrush(QColor(80, 140, 220, 90))
                    painter.drawPolygon(QPolygonF(upper + lower[::-1]))
                painter.setPen(QPen(QColor(90, 170, 255), 2))
                painter.setBrush(QColor(90, 170, 255))
                line = [QPointF(px(c), py(m)) for c, m in enumerate(mean)]
                painter.drawPolyline(QPolygonF(line))
                for point in line:
                    painter.drawRect(QRectF(point.x() - 3, point.y() - 3, 6, 6))
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor(240, 120, 40, 170))
            for channel, value in self.points:
                painter.drawEllipse(QPointF(px(channel), py(value)), 2.5, 2.5)
            painter.setPen(QColor(220, 220, 220))
            painter.drawText(2, text_height, f"{self.title}  ({self.tile_means.shape[0]} tiles)")
            painter.drawText(2, height - 4, f"y {low:.3g}..{high:.3g}, x: channel 0..{n - 1}")
        finally:
            painter.end()
