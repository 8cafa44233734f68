"""What the tiles of a run add up to: per-tile records and the global sums of every prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from napari_normcheck.core.measure.features import FeatureLayer
from napari_normcheck.core.measure.metrics import DisparityAccumulator
from napari_normcheck.core.measure.mismatch import MismatchTracker


@dataclass
class RunSums:
    """What the tiles of a run add up to, single-process or merged from blocks.

    Attributes
    ----------
    records : dict
        Per-tile records by tile index (all tiles of the plan).
    mismatch : MismatchTracker
        With every pair's sums, for every prediction.
    disparity : dict of str to DisparityAccumulator
        Every prediction but train against train (``eval``: the disparity), with every chunk's sums.
    feature_layers : list of FeatureLayer
        Recorded layers (for the ``feature_z`` grid).
    spilled_chunks : int
        Chunks spilled to disk while blending (reported).
    """

    records: dict[int, dict[str, Any]]
    mismatch: MismatchTracker
    disparity: dict[str, DisparityAccumulator]
    feature_layers: list[FeatureLayer]
    spilled_chunks: int = 0
