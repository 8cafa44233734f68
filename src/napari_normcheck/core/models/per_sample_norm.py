"""Train-mode normalization of several tiles in one forward, each tile with its own statistics.

A BatchNorm in training mode on a batch of one tile normalizes with that tile's per-channel mean and
(biased) variance, then applies the layer's weight and bias. That is exactly an instance
normalization of the tile with the same weight, bias and eps, so N tiles can run together through
the network with every running-statistics layer computing per-sample statistics: the result equals N
separate batch-1 train-mode forwards, at the cost of one forward of batch N. InstanceNorm layers with
running statistics already normalize per sample in training mode.

Only the layers' bound ``forward`` is replaced, on the instance, for the duration of the block; no
parameter or buffer is read for writing, so the model's ``state_dict`` cannot change.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from napari_normcheck.core.base.modes import running_stats_layers

# Layers whose training-mode forward is exactly "normalize by this batch's statistics, then affine".
# Subclasses with other forwards (a BatchRenorm, say) are not assumed to be.
_EXACT_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def supports_per_sample(model: nn.Module) -> bool:
    """Whether every running-statistics layer of ``model`` can normalize per sample exactly.

    False for TorchScript models (their forwards cannot be replaced) and for normalization layers of
    other types than BatchNorm, SyncBatchNorm and InstanceNorm (their training forward may differ).

    Parameters
    ----------
    model : torch.nn.Module
        The model to check.

    Returns
    -------
    bool
        True when :func:`per_sample_train_norm` gives batch-1 train-mode results for any batch.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return False
    layers = running_stats_layers(model)
    return all(type(layer) in _EXACT_TYPES for _, layer in layers)


def _per_sample_forward(layer: _NormBase, x: torch.Tensor) -> torch.Tensor:
    # instance_norm with use_input_stats=True: per-sample, per-channel biased variance, then the
    # layer's affine transform, as BatchNorm does in training on a batch of one. No running buffers
    # are passed, so nothing is updated.
    weight = layer.weight if layer.affine else None
    bias = layer.bias if layer.affine else None
    if isinstance(layer, _InstanceNorm) and x.dim() == layer._get_no_batch_dim():
        # An unbatched input to an InstanceNorm: normalize it as a batch of one.
        return F.instance_norm(
            x.unsqueeze(0), None, None, weight, bias, True, 0.0, layer.eps
        ).squeeze(0)
    return F.instance_norm(x, None, None, weight, bias, True, 0.0, layer.eps)


@contextlib.contextmanager
def per_sample_train_norm(model: nn.Module) -> Iterator[nn.Module]:
    """Make each running-statistics layer of ``model`` normalize every sample by its own statistics.

    Use inside :func:`~napari_normcheck.core.base.modes.normalization_mode` ``("eval")``: all other layers
    (dropout included) stay in eval mode. On exit the layers' own ``forward`` methods are back.

    Parameters
    ----------
    model : torch.nn.Module
        A model for which :func:`supports_per_sample` holds.

    Yields
    ------
    torch.nn.Module
        The same model object.
    """
    if not supports_per_sample(model):
        raise ValueError("this model's normalization layers cannot be run per sample exactly")
    replaced = []
    try:
        for _, layer in running_stats_layers(model):
            layer.forward = types.MethodType(_per_sample_forward, layer)
            replaced.append(layer)
        yield model
    finally:
        for layer in replaced:
            # The instance attribute shadows the class's forward; deleting it restores the class's.
            with contextlib.suppress(AttributeError):
                del layer.forward
