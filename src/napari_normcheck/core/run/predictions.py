"""The named predictions of a run: which model variant predicts each tile, and how tiles are batched.

Every run makes ``eval`` and ``train``; ``run --remedies`` adds ``recalibrated`` and ``batchstats``
(built by :mod:`napari_normcheck.core.remedies`, which hands them down as :class:`Prediction` objects
with a ``variant``). The tile loop reads each tile once and runs every prediction on it, so resume,
the reader and writer threads, progress, cancel and the cluster path serve all of them alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.modes import NormMode
from napari_normcheck.core.measure.features import FeatureRecorder, default_feature_layers


@dataclass(frozen=True)
class Prediction:
    """One named prediction over the run's tile plan.

    Attributes
    ----------
    name : str
        Its name: the key of its outputs (``pred_<name>``) and of its sums.
    mode : {"eval", "train"}
        The normalization statistics of its forwards (see
        :func:`~napari_normcheck.core.base.modes.normalization_mode`).
    shares_batch : bool
        Tiles of one forward share batch statistics (the train pass, ``train_batch`` tiles at a
        time); otherwise each tile's result is independent of the batch (``eval_batch`` tiles).
    variant : callable, optional
        Builds the model this prediction runs from the user's model on the run's device (a
        recalibrated copy, a copy normalizing each tile by its own statistics). It must not change
        its argument, and it must pickle (a cluster's workers build it themselves).
    features : bool
        Per-tile feature statistics are recorded during its forwards.
    stage : str
        The :class:`~napari_normcheck.core.run.timing.Timing` stage its forwards count to.
    """

    name: str
    mode: NormMode = "eval"
    shares_batch: bool = False
    variant: Callable[[nn.Module], nn.Module] | None = None
    features: bool = False
    stage: str = "forward_remedies"


EVAL = Prediction("eval", "eval", features=True, stage="forward_eval")
TRAIN = Prediction("train", "train", shares_batch=True, stage="forward_train")
#: The two predictions of every check, in the order outputs and sums hold them.
CHECK = (EVAL, TRAIN)


@dataclass(frozen=True)
class BoundPrediction:
    """A prediction with the model that makes it (on the run's device) and its feature hooks."""

    prediction: Prediction
    model: nn.Module
    recorder: FeatureRecorder | None

    @property
    def name(self) -> str:
        """The prediction's name."""
        return self.prediction.name


def bind_predictions(
    model: nn.Module, predictions: Sequence[Prediction], config: RunConfig
) -> list[BoundPrediction]:
    """Each prediction with its model: the run's own, or its variant built from it.

    Parameters
    ----------
    model : torch.nn.Module
        The user's model on the run's device (a worker's copy on a GPU).
    predictions : sequence of Prediction
        What the run predicts; names must be unique.
    config : RunConfig
        Feature layers to record (for the prediction with ``features``).

    Returns
    -------
    list of BoundPrediction
    """
    names = [p.name for p in predictions]
    if len(set(names)) != len(names):
        raise ValueError(f"prediction names must be unique, not {names}")
    bound = []
    for prediction in predictions:
        worker = model if prediction.variant is None else prediction.variant(model)
        recorder = make_recorder(worker, config) if prediction.features else None
        bound.append(BoundPrediction(prediction, worker, recorder))
    return bound


def make_recorder(model: nn.Module, config: RunConfig) -> FeatureRecorder | None:
    """Feature hooks on every running-statistics norm layer and on ``config.feature_layers``."""
    names = list(dict.fromkeys(default_feature_layers(model) + list(config.feature_layers)))
    # Forward hooks cannot be added to a compiled TorchScript graph: no feature statistics there.
    if not names or isinstance(model, torch.jit.ScriptModule):
        return None
    return FeatureRecorder(model, names)
