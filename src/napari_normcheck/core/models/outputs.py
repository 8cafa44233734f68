"""Which of a model's outputs is the prediction: a tensor, a tuple or list, or a dict.

Deep-supervision networks return several heads (nnU-Net's ``PlainConvUNet`` a list, full
resolution first); multi-task networks return dicts. By default the prediction is the first tensor
with the input's spatial shape (the full-resolution head). ``--output-index N`` and
``--output-key NAME`` choose another one; the choice travels with the module (an attribute that
``copy.deepcopy`` keeps), so the tile loop needs no extra argument.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError

_CHOICE_ATTRIBUTE = "_normcheck_output_choice"


@dataclass(frozen=True)
class OutputChoice:
    """The output the user chose.

    Attributes
    ----------
    index : int or None
        Position in a returned tuple or list (``--output-index``).
    key : str or None
        Key in a returned dict (``--output-key``).
    """

    index: int | None = None
    key: str | None = None

    @property
    def explicit(self) -> bool:
        """True when the user named an output."""
        return self.index is not None or self.key is not None

    def describe(self) -> str:
        """``--output-index 1``, ``--output-key 'seg'`` or ``the default``."""
        if self.key is not None:
            return f"--output-key {self.key!r}"
        if self.index is not None:
            return f"--output-index {self.index}"
        return "the default"


class _SelectedOutput(nn.Module):
    """Wraps a TorchScript model (which cannot hold Python attributes through a copy)."""

    def __init__(self, model: nn.Module, choice: OutputChoice) -> None:
        super().__init__()
        self.model = model
        setattr(self, _CHOICE_ATTRIBUTE, choice)

    def forward(self, x: torch.Tensor) -> Any:  # noqa: D102
        return self.model(x)


def attach_choice(module: nn.Module, choice: OutputChoice | None) -> nn.Module:
    """Record ``choice`` on ``module`` (a wrapper for TorchScript); returns the module to use."""
    if choice is None or not choice.explicit:
        return module
    if isinstance(module, torch.jit.ScriptModule):
        return _SelectedOutput(module, choice)
    setattr(module, _CHOICE_ATTRIBUTE, choice)
    return module


def choice_of(module: nn.Module) -> OutputChoice:
    """The output choice recorded on ``module`` (the default when none)."""
    return getattr(module, _CHOICE_ATTRIBUTE, None) or OutputChoice()


def _entries(output: Any) -> list[tuple[str, Any]] | None:
    if isinstance(output, Mapping):
        return [(repr(key), value) for key, value in output.items()]
    if isinstance(output, Sequence) and not isinstance(output, str | bytes):
        return [(f"[{i}]", value) for i, value in enumerate(output)]
    return None


def describe_outputs(output: Any) -> list[str]:
    """One line per returned item: ``"tensor (1, 2, 32, 32)"`` or ``"[1] tensor (1, 2, 16, 16)"``."""
    if torch.is_tensor(output):
        return [f"tensor {tuple(output.shape)}"]
    entries = _entries(output)
    if entries is None:
        return [type(output).__name__]
    return [
        f"{name} tensor {tuple(value.shape)}"
        if torch.is_tensor(value)
        else f"{name} {type(value).__name__}"
        for name, value in entries
    ]


def select_prediction(
    output: Any,
    choice: OutputChoice | None = None,
    spatial_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, str | None]:
    """The prediction among a model's outputs, and a note when it was picked from several.

    Parameters
    ----------
    output : Any
        What the model returned.
    choice : OutputChoice, optional
        The user's choice; by default the first tensor with the input's spatial shape (else the
        first tensor).
    spatial_shape : sequence of int, optional
        The input's spatial shape, to recognise the full-resolution head.

    Returns
    -------
    prediction : torch.Tensor
    note : str or None
        What was chosen, for the user (None for a plain tensor).

    Raises
    ------
    NormcheckError
        When the chosen output does not exist or is not a tensor, or no tensor is returned.
    """
    choice = choice or OutputChoice()
    if torch.is_tensor(output) and not choice.explicit:
        return output, None
    entries = _entries(output)
    kind = type(output).__name__
    if choice.key is not None:
        if not isinstance(output, Mapping) or choice.key not in output:
            keys = ", ".join(name for name, _ in entries or []) or "none"
            raise NormcheckError(
                f"--output-key {choice.key!r}: the model returns a {kind} (keys: {keys}); "
                "name one of its keys"
            )
        return _tensor(output[choice.key], repr(choice.key), kind), None
    if choice.index is not None:
        if entries is None or not -len(entries) <= choice.index < len(entries):
            size = f"a {kind} of {len(entries)}" if entries is not None else f"a {kind}"
            raise NormcheckError(
                f"--output-index {choice.index}: the model returns {size}; choose an index "
                "inside it (inspect lists the outputs)"
            )
        name, value = entries[choice.index]
        return _tensor(value, name, kind), None
    tensors = [(name, value) for name, value in entries or [] if torch.is_tensor(value)]
    if not tensors:
        raise NormcheckError(f"the model returned a {kind} without a tensor; it must return one")
    full = [
        (name, value)
        for name, value in tensors
        if spatial_shape is not None and tuple(value.shape[2:]) == tuple(spatial_shape)
    ]
    name, value = (full or tensors)[0]
    which = "first tensor" if name == tensors[0][0] else "first full-resolution tensor"
    return value, (
        f"the model returns a {kind} of {len(entries or [])}; its {which} ({name}) is used as "
        "the prediction (--output-index / --output-key choose another)"
    )


def _tensor(value: Any, name: str, kind: str) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise NormcheckError(
            f"output {name} of the model's {kind} is a {type(value).__name__}, not a tensor"
        )
    return value


_warned_tuple_output = False


def first_tensor(
    output: Any, model: nn.Module | None = None, spatial_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """The model's prediction: the output itself, or the tensor chosen among several.

    The choice recorded on ``model`` (``--output-index`` / ``--output-key``) wins; otherwise the
    first tensor with the input's ``spatial_shape`` (the full-resolution head of deep supervision),
    else the first tensor (see :func:`~napari_normcheck.core.models.outputs.select_prediction`).
    """
    global _warned_tuple_output
    choice = choice_of(model) if model is not None else None
    prediction, note = select_prediction(output, choice, spatial_shape)
    if note is not None and not _warned_tuple_output:
        warnings.warn(f"{note}; shape {tuple(prediction.shape)}", stacklevel=2)
        _warned_tuple_output = True
    return prediction
