"""Fold BatchNorm into the convolution before it, for a faster exported model (a speed-up, not a remedy).

In eval mode a BatchNorm after a convolution is an affine map per output channel,
``y = (conv(x) - running_mean) / sqrt(running_var + eps) * weight + bias``, which the convolution can
absorb: its weights are scaled per output channel and its bias shifted. Only pairs that are certainly
consecutive are folded: a convolution directly followed by a BatchNorm inside plain ``nn.Sequential``
containers (nested ones flattened, as MONAI's ``Convolution`` / ``ADN`` blocks are), where nothing else
reads the convolution's output. The BatchNorm becomes ``nn.Identity``; eval outputs stay equal up to
float rounding.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from napari_normcheck.core.base.errors import NormcheckError


@dataclass
class FoldResult:
    """A folded copy of a model.

    Attributes
    ----------
    model : torch.nn.Module
        The copy, in eval mode; the input model is untouched.
    folded : list of (str, str)
        ``(convolution, batchnorm)`` names of the folded pairs.
    skipped : list of str
        BatchNorm layers left as they were (no convolution directly before them), with the reason.
    """

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _sequential_leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The modules a plain Sequential applies one after the other, nested Sequentials flattened."""
    leaves = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if _is_plain_sequential(child):
            leaves.extend(_sequential_leaves(child, f"{full}."))
        else:
            leaves.append((full, child))
    return leaves


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _top_sequentials(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Plain Sequential containers that are not flattened into a parent plain Sequential."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if not _is_plain_sequential(module):
            continue
        parent_name = name.rpartition(".")[0]
        if name and _is_plain_sequential(modules[parent_name]):
            continue
        found.append((name, module))
    return found


def _foldable(conv: nn.Module, norm: nn.Module) -> str | None:
    """Why ``norm`` cannot be folded into ``conv``, or ``None`` when it can."""
    if not isinstance(norm, _BatchNorm) or norm.running_mean is None:
        return "not a BatchNorm with running statistics"
    if not isinstance(conv, _ConvNd):
        return "no convolution directly before it"
    out_channels = conv.out_channels
    if out_channels != norm.num_features:
        return "channel counts differ"
    if isinstance(conv, _ConvTransposeNd) and conv.groups != 1:
        return "grouped transposed convolution"
    return None


def fold_conv_bn(conv: nn.Module, norm: nn.Module) -> None:
    """Absorb eval-mode ``norm`` into ``conv`` in place (float64 arithmetic, cast back)."""
    with torch.no_grad():
        scale = norm.running_var.double().add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        weight = conv.weight.double()
        # Output channels are axis 0 of a convolution's weight and axis 1 of a transposed one's.
        axis = 1 if isinstance(conv, _ConvTransposeNd) else 0
        shape = [1] * weight.dim()
        shape[axis] = -1
        conv.weight.copy_((weight * scale.view(shape)).to(conv.weight.dtype))
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        new_bias = (bias * scale + shift).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module) -> FoldResult:
    """Fold every BatchNorm that directly follows a convolution into it, on a copy of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        An eager model (TorchScript graphs cannot be rewritten here).

    Returns
    -------
    FoldResult
        The folded copy in eval mode and what was folded.

    Raises
    ------
    NormcheckError
        For a TorchScript model.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise NormcheckError(
            "folding needs an eager model: give the state_dict with --arch instead of TorchScript"
        )
    folded_model = copy.deepcopy(model).eval()
    result = FoldResult(folded_model)
    handled: set[str] = set()
    for seq_name, sequential in _top_sequentials(folded_model):
        leaves = _sequential_leaves(sequential, f"{seq_name}." if seq_name else "")
        for (conv_name, conv), (norm_name, norm) in zip(leaves, leaves[1:]):
            if not isinstance(norm, _BatchNorm) or _foldable(conv, norm) is not None:
                continue
            fold_conv_bn(conv, norm)
            parent_name, _, child = norm_name.rpartition(".")
            parent = folded_model.get_submodule(parent_name) if parent_name else folded_model
            setattr(parent, child, nn.Identity())
            result.folded.append((conv_name, norm_name))
            handled.add(norm_name)
    for name, module in folded_model.named_modules():
        if isinstance(module, _BatchNorm) and name not in handled:
            result.skipped.append(f"{name}: no convolution directly before it in a Sequential")
    return result


def time_eval(model: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Seconds of one eval forward over each of ``inputs``."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in inputs:
            model(x)
    return time.perf_counter() - t0


def fold_speedup(
    model: nn.Module, folded: nn.Module, inputs: list[torch.Tensor], repeats: int = 3
) -> dict[str, float]:
    """Time both models on ``inputs`` and compare their eval outputs.

    The two are timed alternately, ``repeats`` times each after a warm-up, and the medians kept, so
    that other load on the machine affects both alike.

    Returns
    -------
    dict
        ``seconds_original``, ``seconds_folded`` (median seconds over all ``inputs``), ``speedup``
        (original / folded) and ``max_abs_difference`` of the eval outputs.
    """
    from napari_normcheck.core.base.modes import normalization_mode
    from napari_normcheck.core.models.outputs import first_tensor

    folded.eval()
    with normalization_mode(model, "eval"):
        with torch.inference_mode():
            difference = max(
                float((first_tensor(model(x)) - first_tensor(folded(x))).abs().max())
                for x in inputs
            )
        original_times, folded_times = [], []
        for _ in range(repeats):
            original_times.append(time_eval(model, inputs))
            folded_times.append(time_eval(folded, inputs))
    original, t_folded = float(np.median(original_times)), float(np.median(folded_times))
    return {
        "seconds_original": original,
        "seconds_folded": t_folded,
        "speedup": original / t_folded if t_folded > 0 else float("nan"),
        "max_abs_difference": difference,
    }


def export_folded(result: FoldResult, path: str | Path, provenance: dict[str, Any]) -> Path:
    """Save the folded model as scripted TorchScript (its state_dict no longer fits the original class).

    Parameters
    ----------
    result : FoldResult
        From :func:`fold_batchnorm`.
    path : path-like
        The TorchScript file; never overwritten.
    provenance : dict
        Stored inside the archive as ``normcheck_fold.json``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    NormcheckError
        When ``path`` exists or the folded model cannot be scripted.
    """
    import json
    import warnings

    from napari_normcheck.core.remedies.recalibrate_export import write_new_file

    path = Path(path)
    if path.exists():
        raise NormcheckError(f"{path} already exists and is never overwritten; choose another file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(result.model)
    except Exception as error:  # TorchScript rejects many Python constructs
        raise NormcheckError(
            f"the folded model cannot be scripted with torch.jit.script "
            f"({str(error).strip().splitlines()[0][:120]}); fold it in your own export code"
        ) from None
    extra = {"normcheck_fold.json": json.dumps(provenance)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        write_new_file(path, lambda f: torch.jit.save(scripted, f, _extra_files=extra))
    return path
