"""Switch a model's normalization layers between eval and train statistics without changing the model.

The train-mode pass of napari-normcheck must normalize with batch statistics, exactly as during
training, while leaving every parameter and buffer of the user's model untouched, dropout off, and the
model's own ``training`` flags as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

NormMode = Literal["eval", "train"]
# The two predictions of every check, in the order outputs and sums hold them.
MODES: tuple[NormMode, NormMode] = ("eval", "train")

_RUNNING_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def has_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer that switches statistics between train and eval.

    These are BatchNorm1/2/3d, SyncBatchNorm, InstanceNorm with ``track_running_stats=True`` and any other
    ``_NormBase`` subclass that keeps running buffers (a BatchRenorm, say).

    Parameters
    ----------
    module : torch.nn.Module
        Any module.

    Returns
    -------
    bool
        True when eval mode normalizes with remembered running statistics.
    """
    if isinstance(module, torch.jit.RecursiveScriptModule):
        # A scripted BatchNorm keeps its attributes and buffers; a traced one keeps neither flag.
        return bool(getattr(module, "track_running_stats", False)) and "running_mean" in dict(
            module.named_buffers(recurse=False)
        )
    return (
        isinstance(module, _NormBase)
        and bool(module.track_running_stats)
        and getattr(module, "running_mean", None) is not None
    )


def running_stats_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """List ``(qualified_name, module)`` of every layer for which :func:`has_running_stats` holds."""
    return [(name, m) for name, m in model.named_modules() if has_running_stats(m)]


@contextlib.contextmanager
def normalization_mode(model: nn.Module, mode: NormMode) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, or in eval mode with batch statistics in its normalization layers.

    ``mode="eval"`` is ``model.eval()``. ``mode="train"`` additionally switches each layer with running
    statistics to training behaviour (batch statistics) while its running buffers are temporarily
    replaced by private copies, so the forward's momentum update lands in the copies and the model's
    own buffers are never written. Dropout and every other module stay in eval mode.

    On exit, whatever happened inside, the original buffer objects and every module's ``training`` flag
    are restored, so ``model.state_dict()`` is bitwise identical to before.

    Parameters
    ----------
    model : torch.nn.Module
        The user's model; not modified.
    mode : {"eval", "train"}
        Which normalization statistics to use.

    Yields
    ------
    torch.nn.Module
        The same model object, switched.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', not {mode!r}")
    training_flags = [(m, m.training) for m in model.modules()]
    saved_buffers: list[tuple[nn.Module, dict[str, torch.Tensor | None]]] = []
    try:
        model.eval()
        if mode == "train":
            for _, layer in running_stats_layers(model):
                originals = {name: getattr(layer, name, None) for name in _RUNNING_BUFFERS}
                saved_buffers.append((layer, originals))
                for name, buffer in originals.items():
                    if buffer is not None:
                        # A private copy takes the momentum update; the model's tensor is never written.
                        layer._buffers[name] = buffer.detach().clone()
                layer.training = True
        yield model
    finally:
        for layer, originals in saved_buffers:
            for name, buffer in originals.items():
                if buffer is not None:
                    layer._buffers[name] = buffer
        for module, flag in training_flags:
            module.training = flag
