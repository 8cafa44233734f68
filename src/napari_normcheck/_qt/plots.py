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
