"""What a run fixes before its first tile: the plan, the device and how the model sees the tiles."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from napari_normcheck.core.base.tiling import TilePlan
from napari_normcheck.core.io.intensity import IntensityTransform


@dataclass(frozen=True)
class RunSetup:
    """What is fixed before the first tile.

    Attributes
    ----------
    plan : TilePlan
        The global tile plan.
    spatial_dims : int
        2 or 3.
    device : torch.device
        Where the forwards run.
    eval_batch : int
        Tiles per forward of the predictions whose results do not depend on the batch.
    transform : IntensityTransform
        Input normalization.
    n_out : int
        The model's output channels (0 until probed).
    """

    plan: TilePlan
    spatial_dims: int
    device: torch.device
    eval_batch: int
    transform: IntensityTransform
    n_out: int = 0
