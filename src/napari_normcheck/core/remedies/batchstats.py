"""Eval with batch statistics: every tile normalized with its own statistics at inference.

This is the "``track_running_stats=False``" remedy, built without touching module flags (whose effect
on a layer that already has buffers differs between PyTorch versions): on a deep copy of the model,
each normalization layer with running statistics is replaced by :class:`BatchStatsNorm`, which calls
:func:`torch.nn.functional.batch_norm` (or ``instance_norm``) with ``running_mean=None`` and
``running_var=None``, one tile at a time, so a tile's prediction never depends on the other tiles of an
eval batch. With one tile per batch this is exactly the train-mode pass of the check at
``train_batch=1``: zero disparity by construction, and usually more tile mismatch, since neighbouring
tiles now normalize differently.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from napari_normcheck.core.base.modes import normalization_mode, running_stats_layers


class BatchStatsNorm(nn.Module):
    """A normalization layer that always uses the statistics of each sample of its input.

    Parameters
    ----------
    layer : torch.nn.Module
        A BatchNorm / SyncBatchNorm / InstanceNorm layer; its affine parameters and ``eps`` are kept
        (shared, not copied), its running buffers are ignored.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.eps = float(layer.eps)
        self.instance = isinstance(layer, _InstanceNorm)
        self.replaced = type(layer).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize each sample of ``x`` ``(N, C, ...)`` over its own spatial voxels."""
        if self.instance:
            return F.instance_norm(
                x, None, None, self.weight, self.bias, use_input_stats=True, eps=self.eps
            )
        # BatchNorm statistics pool over the batch axis: one call per tile keeps tiles independent.
        return torch.cat(
            [
                F.batch_norm(
                    x[i : i + 1], None, None, self.weight, self.bias, training=True, eps=self.eps
                )
                for i in range(x.shape[0])
            ]
        )

    def extra_repr(self) -> str:
        """Shown in the module's repr: which layer it replaces."""
        return f"replaces={self.replaced}, eps={self.eps}"


class _PerTileTrainMode(nn.Module):
    """Fallback for TorchScript models, whose layers cannot be replaced.

    One tile per forward with the normalization layers in train mode (private buffers; see
    :func:`normalization_mode`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        with normalization_mode(self.model, "train"):
            for i in range(x.shape[0]):
                out = self.model(x[i : i + 1])
                outputs.append(out if isinstance(out, torch.Tensor) else out[0])
        return torch.cat(outputs)


def batch_stats_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that normalizes every tile with its own statistics, in any mode.

    Parameters
    ----------
    model : torch.nn.Module
        The user's model; not modified.

    Returns
    -------
    torch.nn.Module
        In eval mode (dropout off). Eager models get :class:`BatchStatsNorm` in place of each layer
        with running statistics; TorchScript models are wrapped to run tile by tile in train
        normalization mode, which computes the same values.
    """
    worker = copy.deepcopy(model).eval()
    if isinstance(worker, torch.jit.ScriptModule) or any(
        isinstance(m, torch.jit.ScriptModule) for _, m in running_stats_layers(worker)
    ):
        return _PerTileTrainMode(worker).eval()
    for name, layer in running_stats_layers(worker):
        parent_name, _, child = name.rpartition(".")
        parent = worker.get_submodule(parent_name) if parent_name else worker
        setattr(parent, child, BatchStatsNorm(layer))
    return worker
