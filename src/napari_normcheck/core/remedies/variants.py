"""The remedies as named predictions of the one tile loop: model variants that pickle.

A :class:`~napari_normcheck.core.run.predictions.Prediction` carries a ``variant`` that builds its
model from the user's model on the run's device; a cluster's workers build it themselves, so the
variants here are small picklable objects: the recalibrated running statistics travel as plain
lists (exact for float32), never as a pickled module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import running_stats_layers
from napari_normcheck.core.remedies.batchstats import batch_stats_copy
from napari_normcheck.core.run.predictions import Prediction

REMEDIES = ("recalibrated", "batchstats")


@dataclass(frozen=True, eq=False)
class BatchStatsVariant:
    """A copy normalizing every tile by its own statistics (:func:`batch_stats_copy`)."""

    def __call__(self, model: nn.Module) -> nn.Module:
        """The copy, on ``model``'s device; ``model`` is not changed."""
        return batch_stats_copy(model)


@dataclass(frozen=True, eq=False)
class RecalibratedVariant:
    """A copy with recalibrated running statistics.

    Attributes
    ----------
    stats : dict
        ``{layer name: {"running_mean": [...], "running_var": [...]}}`` of every layer with running
        statistics (see :func:`running_stats_of`).
    """

    stats: dict[str, dict[str, list[float]]]

    def __call__(self, model: nn.Module) -> nn.Module:
        """The copy, in eval mode on ``model``'s device; ``model`` is not changed."""
        worker = copy.deepcopy(model).eval()
        layers = dict(running_stats_layers(worker))
        if set(layers) != set(self.stats):
            raise NormcheckError(
                "the recalibrated statistics do not fit this model's normalization layers; "
                "recalibrate it again"
            )
        with torch.no_grad():
            for name, layer in layers.items():
                for buffer in ("running_mean", "running_var"):
                    target = getattr(layer, buffer)
                    values = torch.tensor(self.stats[name][buffer], dtype=target.dtype)
                    target.copy_(values.to(target.device))
        return worker


def running_stats_of(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """The running mean and variance of every layer with running statistics, as lists."""
    return {
        name: {
            buffer: getattr(layer, buffer).detach().float().cpu().tolist()
            for buffer in ("running_mean", "running_var")
        }
        for name, layer in running_stats_layers(model)
    }


def check_remedy_names(remedies: tuple[str, ...]) -> None:
    """Raise :class:`NormcheckError` for a name that is not one of :data:`REMEDIES`."""
    unknown = [r for r in remedies if r not in REMEDIES]
    if unknown:
        raise NormcheckError(f"unknown remedy {unknown[0]!r}; use {', '.join(REMEDIES)}")


def remedy_predictions(
    remedies: tuple[str, ...], recalibrated_stats: dict[str, Any] | None = None
) -> tuple[Prediction, ...]:
    """The remedies' predictions, in :data:`REMEDIES` order.

    Parameters
    ----------
    remedies : tuple of str
        Any of ``"recalibrated"``, ``"batchstats"``.
    recalibrated_stats : dict, optional
        :func:`running_stats_of` the recalibrated copy (needed for ``recalibrated``).
    """
    check_remedy_names(remedies)
    predictions = []
    for remedy in REMEDIES:
        if remedy not in remedies:
            continue
        if remedy == "recalibrated":
            if recalibrated_stats is None:
                raise ValueError("the recalibrated prediction needs the recalibrated statistics")
            variant: Any = RecalibratedVariant(recalibrated_stats)
        else:
            variant = BatchStatsVariant()
        predictions.append(Prediction(remedy, "eval", variant=variant))
    return tuple(predictions)
