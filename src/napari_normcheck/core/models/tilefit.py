"""Does the model take this tile? One forward decides; the divisor is only advice.

A run tries its input window once (batch 1, batch statistics in the normalization layers, which
refuse smaller bottlenecks than eval mode does) before the first tile. When the model takes the
window and returns its spatial shape, the run goes ahead whatever the probe's divisor says. When
not, the error names the axis and the nearest sizes that work, found by a few more forwards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models.trials import Trial, norm_train, run_trial, untouched

_AXES = ("z", "y", "x")
_CHANNEL_ERROR = re.compile(r"to have \d+ channels|channels? mismatch|expected .*channels", re.I)


def _divisors(divisor: Sequence[int] | int | None, dims: int) -> tuple[int, ...]:
    if divisor is None:
        return (1,) * dims
    if isinstance(divisor, int):
        return (divisor,) * dims
    return tuple(int(d) for d in divisor)[-dims:]


def _neighbours(side: int, divisor: int) -> list[int]:
    """Sizes near ``side`` that are multiples of ``divisor``, nearest first."""
    below = max(divisor, side // divisor * divisor)
    above = -(-side // divisor) * divisor
    if below == above == side:
        below, above = max(divisor, side - divisor), side + divisor
    candidates = sorted({below, above} - {side}, key=lambda n: (abs(n - side), -n))
    return candidates


def _shape_text(sides: Sequence[int], dims: int) -> str:
    return ",".join(str(s) for s in ((1,) if dims == 2 else ()) + tuple(sides))


def check_window(
    model: nn.Module,
    in_channels: int,
    window: tuple[int, int, int],
    spatial_dims: int,
    device: torch.device | str = "cpu",
    divisor: Sequence[int] | int | None = None,
) -> int:
    """Run the window once; return the model's output channels, or explain which sides fail.

    Parameters
    ----------
    model : torch.nn.Module
        The model on ``device`` (not changed).
    in_channels : int
        Input channels.
    window : tuple of int
        The model's input window ``(z, y, x)`` (``z = 1`` for a 2D model).
    spatial_dims : int
        2 or 3.
    device : torch.device or str
        Where the forward runs.
    divisor : int or tuple of int, optional
        The probe's advice per axis, used to propose sizes when the window fails.

    Returns
    -------
    int
        Output channels of the prediction.

    Raises
    ------
    NormcheckError
        One line naming the axis that fails and the nearest sizes that work.
    """
    sides = tuple(int(s) for s in window[3 - spatial_dims :])
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    notes: list[str] = []
    with untouched(model, notes), norm_train(model):

        def trial(spatial: Sequence[int]) -> Trial:
            return run_trial(model, in_channels, spatial, dtype, device=device)

        result = trial(sides)
        if result.ok:
            return int(result.prediction.shape[1])
        raise NormcheckError(_explain(trial, result, sides, spatial_dims, divisor))


def _explain(
    trial, result: Trial, sides: tuple[int, ...], dims: int, divisor: Sequence[int] | int | None
) -> str:
    """The one-line message: the failing axis with its nearest working sizes, or a tile that works."""
    divs = _divisors(divisor, dims)
    names = _AXES[3 - dims :]
    head = f"the model does not take the tile window {_shape_text(sides, dims)} ({result.error})"
    if _CHANNEL_ERROR.search(result.error or ""):
        return f"{head}; check the channel count and --spatial-dims"
    if result.prediction is not None:
        return (
            f"the model maps the tile window {_shape_text(sides, dims)} to an output of shape "
            f"{tuple(result.prediction.shape)}; napari-normcheck needs an output with the input's "
            "spatial shape (a segmentation network with 'same' padding; --output-index / "
            "--output-key choose another output)"
        )
    advice = f"tile sides divisible by the model's downsampling {divs} are advised"
    fixes = []
    for axis, (side, d) in enumerate(zip(sides, divs)):
        working = []
        for candidate in _neighbours(side, d):
            changed = list(sides)
            changed[axis] = candidate
            if trial(changed).ok:
                working.append(candidate)
        if working:
            fixes.append(
                f"{names[axis]} {side} fails, {' or '.join(map(str, working))} "
                f"work{'s' if len(working) == 1 else ''}"
                + (f" (multiples of {d})" if d > 1 else "")
            )
    if fixes:
        return f"{head}: {'; '.join(fixes)}; change --tile (or --halo) accordingly ({advice})"
    rounded = [max(d, -(-s // d) * d) for s, d in zip(sides, divs)]
    # The rounded window, then the divisor itself (a model with a fixed size takes only that).
    for candidate in (rounded, list(divs)):
        if candidate != list(sides) and trial(candidate).ok:
            return (
                f"{head}; tile sides should be divisible by the model's downsampling {divs}: "
                f"a window of {_shape_text(candidate, dims)} works"
            )
    return f"{head}; {advice}; 'napari-normcheck inspect' lists the shapes the model takes"
