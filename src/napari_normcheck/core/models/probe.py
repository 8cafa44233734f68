"""Probe a network: spatial dims, channels, outputs and the tile sides it takes per axis.

The probe runs small forwards in eval mode under ``torch.inference_mode()`` and restores training flags
and buffers, so the model is not changed. The divisor of each spatial axis is searched on its own
and confirmed by forwards (:mod:`~napari_normcheck.core.models.shape_search`); a tile the user gives is
tried with a forward of its own (:mod:`~napari_normcheck.core.models.tilefit`), so the divisor is advice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models.outputs import OutputChoice, choice_of, describe_outputs
from napari_normcheck.core.models.shape_search import AxisSizes, search_shapes
from napari_normcheck.core.models.trials import run_trial, untouched


@dataclass(frozen=True)
class ModelInfo:
    """What the tiling needs to know about a network, found by probing it.

    Attributes
    ----------
    spatial_dims : int
        2 or 3.
    in_channels, out_channels : int
        Channels of the input and of the prediction (0 when no forward worked).
    divisor : tuple of int
        Per spatial axis: tile sides that are multiples of it work (the network's downsampling,
        global poolings left out; the smallest that forwards confirm). Advice: a tile the user
        gives is tried with a forward instead.
    n_parameters : int
        Number of parameter elements.
    fixed_shape : tuple of (int or None) or None
        Per spatial axis, the only side the model takes (None: any multiple of the divisor);
        None when no axis is fixed.
    outputs : tuple of str
        What the model returns, one line per item (``"[0] tensor (1, 2, 32, 32)"``).
    output_activation : str or None
        ``"sigmoid"`` or ``"softmax"`` when the model's outputs already are probabilities.
    tried : tuple of str
        The shapes the probe ran and what happened (``"(1, 1, 32, 32, 32): ok"``).
    probe_error : str or None
        Why no shape worked, when none did.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    divisor: tuple[int, ...]
    n_parameters: int
    fixed_shape: tuple[int | None, ...] | None = None
    outputs: tuple[str, ...] = ()
    output_activation: str | None = None
    tried: tuple[str, ...] = field(default=(), compare=False)
    probe_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dictionary."""
        data = asdict(self)
        for key in ("divisor", "fixed_shape", "outputs", "tried"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    def logits_with(self, activation: str) -> bool:
        """Whether ``activation`` leaves the predictions as logits (the probe saw values off 0..1)."""
        return (
            activation == "none"
            and self.output_activation is None
            and self.probe_error is None
            and self.out_channels > 0
        )

    def recorded_outputs(self) -> dict[str, Any]:
        """What a run records of the outputs under ``model`` (nothing when no probe worked)."""
        return {} if self.probe_error is not None else {"output_activation": self.output_activation}

    def describe_shapes(self) -> str:
        """Which tile sides the model takes, per axis, for ``inspect`` and the widget."""
        if self.probe_error is not None:
            return "tile sides: unknown (no probe forward worked)"
        names = ("z", "y", "x")[3 - self.spatial_dims :]
        fixed = self.fixed_shape or (None,) * self.spatial_dims
        parts = [
            f"{name} = {side} only" if side is not None else f"{name} a multiple of {d}"
            for name, d, side in zip(names, self.divisor, fixed)
        ]
        return "tile sides: " + ", ".join(parts)


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


def _self_activation(prediction: torch.Tensor) -> str | None:
    """``"softmax"`` / ``"sigmoid"`` when a prediction on random input already is probabilities."""
    values = prediction.float()
    if values.numel() == 0 or values.min() < 0 or values.max() > 1:
        return None
    if values.shape[1] > 1 and torch.allclose(values.sum(1), torch.ones(()), atol=1e-4):
        return "softmax"
    return "sigmoid"


def probe_with_notes(
    module: nn.Module,
    spatial_dims: int | None,
    in_channels: int | None,
    *,
    choice: OutputChoice | None = None,
    sizes: AxisSizes | None = None,
    allow_failure: bool = False,
) -> tuple[ModelInfo, list[str]]:
    """Probe ``module`` (see :func:`probe_model`) and also return notes for the user.

    Parameters
    ----------
    module : torch.nn.Module
        The model.
    spatial_dims, in_channels : int or None
        Overrides for what the layers say.
    choice : OutputChoice, optional
        The output to use; by default the one recorded on ``module``.
    sizes : AxisSizes, optional
        Sizes a package declares (start there, confirm its steps).
    allow_failure : bool
        Return a :class:`ModelInfo` with ``probe_error`` instead of raising when no shape works.
    """
    dims, channels = _input_layout(module, spatial_dims, in_channels)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    choice = choice or choice_of(module)
    notes: list[str] = []
    n_parameters = int(sum(p.numel() for p in module.parameters()))
    with untouched(module, notes):
        search = search_shapes(
            lambda spatial, watch=None: run_trial(
                module, channels, spatial, dtype, choice, watch=watch
            ),
            dims,
            sizes,
        )
    tried = tuple(t.summary() for t in search.tried)
    base = search.base
    if base is None:
        last = search.tried[-1]
        if last.output is not None:
            error = (
                f"the model maps an input of shape {last.shape} to {last.error.split()[-1]}"
                if last.error and last.error.startswith("the output has shape")
                else last.error
            )
            message = (
                f"{error}; napari-normcheck needs an output with the input's spatial shape "
                "(use 'same' padding, or --output-index / --output-key)"
            )
        else:
            message = (
                f"the model fails on a random input of shape {last.shape} ({last.error}); "
                "pass --in-channels / --spatial-dims if they are wrong"
            )
        if not allow_failure:
            raise NormcheckError(message)
        info = ModelInfo(dims, channels, 0, (1,) * dims, n_parameters, tried=tried)
        return _replace(info, probe_error=message), notes
    if base.note:
        notes.insert(0, base.note)
    if search.global_ops:
        names = ", ".join(op.removeprefix("aten.").split(".")[0] for op in search.global_ops)
        notes.append(
            f"the model pools whole maps ({names}), as a style vector or a squeeze-and-excitation "
            "gate does: a global pooling is not downsampling, and the tile sides do not count it"
        )
    fixed = search.fixed if any(side is not None for side in search.fixed) else None
    if fixed is not None:
        shown = ", ".join(
            f"{name} = {side}" for name, side in zip("zyx"[3 - dims :], fixed) if side is not None
        )
        notes.append(f"the model takes a fixed size only ({shown}): tiles use it")
    activation = _self_activation(base.prediction)
    if activation is not None:
        notes.append(
            f"the model's outputs are already probabilities ({activation} inside the model): "
            "keep --activation none"
        )
    elif base.prediction.numel():
        low, high = (float(v) for v in torch.aminmax(base.prediction.float()))
        notes.append(
            f"the model's outputs are not probabilities (from {low:.3g} to {high:.3g} on a random "
            "input): choose the activation it was trained with (sigmoid or softmax)"
        )
    info = ModelInfo(
        spatial_dims=dims,
        in_channels=channels,
        out_channels=int(base.prediction.shape[1]),
        divisor=search.divisor,
        n_parameters=n_parameters,
        fixed_shape=fixed,
        outputs=tuple(describe_outputs(base.output)),
        output_activation=activation,
        tried=tried,
    )
    return info, notes


def _replace(info: ModelInfo, **changes: Any) -> ModelInfo:
    return dataclasses.replace(info, **changes)


def probe_model(
    module: nn.Module, *, spatial_dims: int | None = None, in_channels: int | None = None
) -> ModelInfo:
    """Find a model's input layout, outputs and per-axis tile-side divisor by small forwards.

    ``spatial_dims`` and ``in_channels`` come from the first convolution (its weight shape for
    TorchScript) unless given. A working shape comes first (a small random cube, 32³ in 3D, 64² in
    2D; larger when that collapses the grid to a voxel or two; the size a Linear layer asks for).
    Then each axis on its own: the downsampling its strided ops showed (a global pooling, which
    reduces the whole map to one voxel at any size, is no downsampling: a second forward at another
    size tells it from a stride), confirmed by a forward on an odd multiple of it with the other
    axes unchanged, doubled while that fails, halved while an odd multiple of the half runs and
    passes every stride whole (MONAI's BasicUNet pads odd grids, so it takes any side, but 16 is
    advised). Forwards run in eval mode under ``torch.inference_mode()``; training flags and
    buffers are restored, so the model's ``state_dict`` is bitwise unchanged.

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
        When the layout cannot be found, no forward works, or the output's spatial shape differs.
    """
    return probe_with_notes(module, spatial_dims, in_channels)[0]
