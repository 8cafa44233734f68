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

from napari_normcheck.core.measure.metrics import FOREGROUND, dice_sums, disparity_from_sums
from napari_normcheck.core.measure.support import foreground_from_sums


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
    def sums(self) -> dict[str, np.ndarray]:
        """Dice sums of eval against train (:func:`~napari_normcheck.core.measure.metrics.dice_sums`)."""
        return dice_sums(
            self.probabilities["train"], self.probabilities["eval"], self.threshold, self.argmax
        )

    @cached_property
    def disparity(self) -> dict[str, list[float]]:
        """``1 - Dice`` of eval against train per channel: ``hard``, ``soft`` (and ``argmax``)."""
        return {
            kind: disparity_from_sums(sums)
            for kind, sums in self.sums.items()
            if kind != FOREGROUND
        }

    @property
    def n_voxels(self) -> int:
        """Voxels per channel."""
        return int(np.prod(self.probabilities["eval"].shape[1:]))


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
    # From the Dice counts already summed: |A xor B| = |A| + |B| - 2 |A and B|.
    inter, total = view.sums["argmax" if view.argmax else "hard"]
    return [float(v) for v in (total - 2 * inter) / max(view.n_voxels, 1)]


def foreground_voxels(view: TileView) -> list[int]:
    """Hard foreground of eval and train together, ``|A| + |B|``, per channel (the Dice's support).

    Whether the tile's hard values are judged follows from it when the run ends
    (:func:`~napari_normcheck.core.measure.support.is_judged`), so a resumed run with another
    ``min_foreground`` judges every tile by the same rule.
    """
    return foreground_from_sums(view.sums["hard"])
