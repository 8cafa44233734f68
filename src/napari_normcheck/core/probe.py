"""Probe a network: spatial dims, channels and the factor a tile side must be divisible by.

The probe runs small forwards in eval mode under ``torch.inference_mode()`` and restores training flags
and buffers, so the model is not changed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils._python_dispatch import TorchDispatchMode

from napari_normcheck.core.errors import NormcheckError, first_line
from napari_normcheck.core.modes import normalization_mode


@dataclass(frozen=True)
class ModelInfo:
    """What the tiling needs to know about a network, found by probing it.

    Attributes
    ----------
    spatial_dims : int
        2 or 3.
    in_channels, out_channels : int
        Channels of the input and of the (first) output tensor.
    divisor : tuple of int
        Per spatial axis: a tile side must be a multiple of this (the network's downsampling factor).
    n_parameters : int
        Number of parameter elements.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    divisor: tuple[int, ...]
    n_parameters: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dictionary."""
        return {**asdict(self), "divisor": list(self.divisor)}


# Cubic probe sides, smallest first: larger ones only when the small one collapses or fails.
_PROBE_SIDES = {2: (64, 128, 256), 3: (32, 64, 128)}
_MAX_DIVISOR = 64
# aten ops that can shrink the spatial grid by a stride (adaptive pooling is global, not a stride).
_STRIDED_OP_WORDS = ("conv", "pool", "unshuffle", "upsample", "interpolate")


class _StrideRecorder(TorchDispatchMode):
    """Record the smallest spatial size produced by a strided op during one forward.

    A dispatch mode sees the aten ops of eager, scripted and traced models alike, where forward
    hooks would miss everything inside TorchScript.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.smallest: list[int | None] = [None] * spatial_dims

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = str(func)
        if "adaptive" not in name and any(word in name for word in _STRIDED_OP_WORDS):
            output = result[0] if isinstance(result, tuple | list) and result else result
            self._record(args[0] if args else None, output)
        return result

    def _record(self, source: Any, output: Any) -> None:
        ndim = self.spatial_dims + 2
        if not (torch.is_tensor(source) and torch.is_tensor(output)):
            return
        if source.ndim != ndim or output.ndim != ndim:
            return
        for axis, (n_in, n_out) in enumerate(zip(source.shape[2:], output.shape[2:], strict=True)):
            # A stride of 2 or more, not the border a convolution without padding removes.
            if 3 * n_out <= 2 * n_in:
                current = self.smallest[axis]
                self.smallest[axis] = n_out if current is None else min(current, n_out)


@contextlib.contextmanager
def _untouched(module: nn.Module, notes: list[str]) -> Iterator[None]:
    """Eval mode and inference mode; buffers a forward wrote (a model traced in train mode) restored."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        # TorchScript's optimizing executor profiles and recompiles for each new input shape,
        # which costs seconds for the few one-off shapes of a probe.
        with (
            normalization_mode(module, "eval"),
            torch.inference_mode(),
            torch.jit.optimized_execution(False),
        ):
            yield
    finally:
        changed = False
        with torch.no_grad():
            for buffer, copy in saved:
                if not torch.equal(buffer, copy):
                    buffer.copy_(copy)
                    changed = True
        if changed:
            notes.append(
                "the model updated its own buffers in an eval-mode forward (traced in train mode?); "
                "they were restored"
            )


def _input_layout(
    module: nn.Module, spatial_dims: int | None, in_channels: int | None
) -> tuple[int, int]:
    found = _first_convolution(module)
    dims = spatial_dims if spatial_dims is not None else (found[0] if found else None)
    channels = in_channels if in_channels is not None else (found[1] if found else None)
    if dims is None or channels is None:
        raise NormcheckError(
            "cannot tell the model's input from its layers (no convolution found); pass "
            "--spatial-dims and --in-channels"
        )
    if dims not in (2, 3):
        raise NormcheckError(
            f"the model is {dims}D; napari-normcheck checks 2D and 3D networks (pass --spatial-dims "
            "if this is wrong)"
        )
    return dims, channels


def _first_convolution(module: nn.Module) -> tuple[int, int] | None:
    """``(spatial_dims, in_channels)`` of the first convolution registered in ``module``."""
    for sub in module.modules():
        if isinstance(sub, _ConvNd):
            return sub.weight.ndim - 2, int(sub.in_channels)
        name = getattr(sub, "original_name", "")
        if isinstance(sub, torch.jit.ScriptModule) and name.startswith("Conv"):
            weight = dict(sub.named_parameters(recurse=False)).get("weight")
            if weight is not None and weight.ndim >= 3:
                if name.startswith("ConvTranspose"):
                    return weight.ndim - 2, int(weight.shape[0])
                # Traced modules keep no attributes; groups is known only for scripted ones.
                return weight.ndim - 2, int(weight.shape[1]) * int(getattr(sub, "groups", 1))
    for parameter in module.parameters():
        if parameter.ndim in (4, 5):
            return parameter.ndim - 2, int(parameter.shape[1])
    if isinstance(module, torch.jit.ScriptModule):
        return _first_constant_convolution(module)
    return None


def _first_constant_convolution(script_module: torch.jit.ScriptModule) -> tuple[int, int] | None:
    """Layout from the first convolution of a frozen graph, whose weights are constants."""
    graph = script_module.inlined_graph
    for node in graph.nodes():
        if "conv" not in node.kind():
            continue
        weight = list(node.inputs())[1]
        if weight.node().kind() != "prim::Constant":
            return None
        value = weight.toIValue()
        if torch.is_tensor(value) and value.ndim >= 3:
            transposed = "transpose" in node.kind() or (
                node.kind().endswith("convolution") and bool(list(node.inputs())[6].toIValue())
            )
            return value.ndim - 2, int(value.shape[0] if transposed else value.shape[1])
    return None


def _primary_output(output: Any, notes: list[str]) -> torch.Tensor:
    """The prediction: the output itself or the first tensor of a tuple, list or dict."""
    if torch.is_tensor(output):
        return output
    items = list(output.items()) if isinstance(output, Mapping) else None
    values = [v for _, v in items] if items is not None else output
    if isinstance(values, tuple | list):
        for index, value in enumerate(values):
            if torch.is_tensor(value):
                where = repr(items[index][0]) if items is not None else f"#{index}"
                notes.append(
                    f"the model returns a {type(output).__name__} of {len(values)}; its first "
                    f"tensor ({where}) is used as the prediction"
                )
                return value
    raise NormcheckError(
        f"the model returned a {type(output).__name__} without a tensor; it must return a tensor"
    )


def _forward(module: nn.Module, shape: tuple[int, ...], dims: int, dtype: torch.dtype):
    """Run one seeded random input; return (output or None, smallest strided sizes, error)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(shape, generator=generator).to(dtype)
    recorder = _StrideRecorder(dims)
    try:
        with recorder:
            output = module(image)
    except Exception as error:
        return None, recorder.smallest, error
    return output, recorder.smallest, None


def probe_with_notes(
    module: nn.Module, spatial_dims: int | None, in_channels: int | None
) -> tuple[ModelInfo, list[str]]:
    """Probe ``module`` (see :func:`probe_model`) and also return notes for the user."""
    dims, channels = _input_layout(module, spatial_dims, in_channels)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    notes: list[str] = []
    output_notes: list[str] = []
    result: tuple[torch.Tensor, tuple[int, ...]] | None = None
    with _untouched(module, notes):
        for side in _PROBE_SIDES[dims]:
            shape = (1, channels, *(side,) * dims)
            output, smallest, error = _forward(module, shape, dims, dtype)
            # A grid strided down to one voxel may be a floor, or too small for a layer (instance
            # norm refuses one voxel): retry larger. Any other failure would recur, and larger
            # forwards of a real network are slow.
            collapsed = any(n is not None and n < 2 for n in smallest)
            if error is not None and not any(n is not None and n <= 2 for n in smallest):
                break
            if error is not None or (collapsed and side != _PROBE_SIDES[dims][-1]):
                continue
            prediction = _check_output(_primary_output(output, output_notes), shape, dims)
            divisor = tuple(1 if n is None else math.ceil(side / n) for n in smallest)
            result = prediction, _confirm_divisor(module, shape, divisor, dims, dtype, notes)
            break
    if result is None:
        raise NormcheckError(
            f"the model fails on a random input of shape {shape} ({first_line(error)[:160]}); "
            "pass --in-channels / --spatial-dims if they are wrong"
        )
    prediction, divisor = result
    n_parameters = sum(p.numel() for p in module.parameters())
    info = ModelInfo(dims, channels, int(prediction.shape[1]), divisor, int(n_parameters))
    return info, output_notes + notes


def _check_output(prediction: torch.Tensor, shape: tuple[int, ...], dims: int) -> torch.Tensor:
    if prediction.ndim != dims + 2 or tuple(prediction.shape[2:]) != shape[2:]:
        raise NormcheckError(
            f"the model maps an input of shape {shape} to {tuple(prediction.shape)}; "
            "napari-normcheck needs an output with the input's spatial shape (use 'same' padding)"
        )
    return prediction


def _confirm_divisor(
    module: nn.Module,
    shape: tuple[int, ...],
    divisor: tuple[int, ...],
    dims: int,
    dtype: torch.dtype,
    notes: list[str],
) -> tuple[int, ...]:
    """Check ``divisor`` on odd multiples of it; double it while the model fails there.

    The strides seen by :class:`_StrideRecorder` miss exotic downsampling (strided slicing, say).
    An input whose sides are odd multiples of the divisor, ``(3 d, d, d)``, is a multiple of the
    divisor but of no larger power-of-two multiple of it, and is cheap: one axis is tripled so that
    the coarsest grid has more than one voxel (instance norm refuses a single one).
    """
    candidate = divisor
    while max(candidate) <= _MAX_DIVISOR:
        trial = tuple((3 if axis == 0 else 1) * d for axis, d in enumerate(candidate))
        output, _, error = _forward(module, (1, shape[1], *trial), dims, dtype)
        if error is None:
            prediction = _primary_output(output, [])
            if prediction.ndim == dims + 2 and tuple(prediction.shape[2:]) == trial:
                if candidate != divisor:
                    notes.append(f"tile-side divisor {candidate} found by trial forwards")
                return candidate
        candidate = tuple(2 * d for d in candidate)
    raise NormcheckError(
        f"the model works on {tuple(shape)} but on no odd multiple of sides up to "
        f"{_MAX_DIVISOR}; check that it accepts inputs of other sizes"
    )


def probe_model(
    module: nn.Module, *, spatial_dims: int | None = None, in_channels: int | None = None
) -> ModelInfo:
    """Find a model's input layout, output channels and tile-side divisor by small forwards.

    ``spatial_dims`` and ``in_channels`` come from the first convolution (its weight shape for
    TorchScript) unless given. The divisor is the largest downsampling factor of any strided
    convolution or pooling seen in a forward on a small random cube (32³ in 3D, 64² in 2D; larger
    only when that collapses the grid to one voxel), confirmed by a forward on odd multiples of it.
    Forwards run in eval mode under ``torch.inference_mode()``; training flags and buffers are
    restored, so the model's ``state_dict`` is bitwise unchanged.

    Parameters
    ----------
    module : torch.nn.Module
        An eager, scripted or traced model.
    spatial_dims, in_channels : int, optional
        Overrides for what the layers say.

    Returns
    -------
    ModelInfo
        Probe results.

    Raises
    ------
    NormcheckError
        When the layout cannot be found, the forward fails, or the output's spatial shape differs.
    """
    return probe_with_notes(module, spatial_dims, in_channels)[0]
