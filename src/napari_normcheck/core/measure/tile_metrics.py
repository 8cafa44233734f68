"""Per-tile metrics: functions of one tile's own predictions over the voxels it writes.

A :class:`TileView` holds a tile's activated predictions by name (``eval``, ``train``, and the
remedies' when they run) and computes shared quantities once (the Dice sums of eval against
train). Each metric is a plain function of a view that returns one value per output channel, or
``None`` where it does not apply; :mod:`~napari_normcheck.core.run.registry` names them, says where
they are stored and how napari shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import numpy as np

from napari_normcheck.core.measure.metrics import tile_disparity


class TileView:
    """One tile's probabilities ``(C, *box)`` by prediction name, over the voxels it writes.

    Parameters
    ----------
    probabilities : mapping of str to numpy.ndarray
        Activated predictions by prediction name, each ``(C, z, y, x)`` float32.
    threshold : float
        Foreground threshold of the hard metrics.
    argmax : bool
        The outputs are softmax classes (hard labels are the argmax over channels).
    """

    def __init__(
        self, probabilities: Mapping[str, np.ndarray], threshold: float, argmax: bool
    ) -> None:
        self.probabilities = probabilities
        self.threshold = threshold
        self.argmax = argmax

    @cached_property
    def disparity(self) -> dict[str, list[float]]:
        """``1 - Dice`` of eval against train per channel: ``hard``, ``soft`` (and ``argmax``)."""
        return tile_disparity(
            self.probabilities["train"], self.probabilities["eval"], self.threshold, self.argmax
        )

    def hard(self, name: str) -> np.ndarray:
        """Boolean foreground of prediction ``name`` per channel (one-hot argmax for softmax)."""
        p = self.probabilities[name]
        if self.argmax:
            labels = p.argmax(axis=0)
            return labels[None] == np.arange(p.shape[0]).reshape(-1, *(1,) * labels.ndim)
        return p > self.threshold


def disparity_hard(view: TileView) -> list[float]:
    """Thresholded ``1 - Dice(P_train, P_eval)`` per channel."""
    return view.disparity["hard"]


def disparity_soft(view: TileView) -> list[float]:
    """Soft (probability-weighted) ``1 - Dice(P_train, P_eval)`` per channel."""
    return view.disparity["soft"]


def disparity_argmax(view: TileView) -> list[float] | None:
    """``1 - Dice`` of the argmax classes (softmax outputs only)."""
    return view.disparity.get("argmax")


def flip_fraction(view: TileView) -> list[float]:
    """Fraction of the tile's voxels whose hard label differs between eval and train, per channel.

    Unlike the disparity it does not depend on how much foreground the tile has: a tile that is
    mostly background and flips a few voxels scores low here, high in ``1 - Dice``.
    """
    flips = view.hard("eval") != view.hard("train")
    return [float(v) for v in flips.reshape(flips.shape[0], -1).mean(axis=1)]
