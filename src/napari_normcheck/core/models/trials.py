"""Trial forwards of a model on random inputs, recording the strides they pass through.

Every probe and tile check runs its forwards through :func:`run_trial` inside :func:`untouched`, so
the model's parameters, buffers and training flags are what they were before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from napari_normcheck.core.base.errors import first_line
from napari_normcheck.core.base.modes import normalization_mode
from napari_normcheck.core.models.outputs import OutputChoice, select_prediction

# aten ops that can shrink the spatial grid by a stride (adaptive pooling is global, not a stride).
_STRIDED_OP_WORDS = ("conv", "pool", "unshuffle", "upsample", "interpolate")


class GridStep(NamedTuple):
    """One op that can change the spatial grid: its name, input and output spatial sides."""

    op: str
    source: tuple[int, ...]
    output: tuple[int, ...]

    def shrinks(self, axis: int) -> bool:
        """A stride of 2 or more along ``axis``, not the border a convolution without padding removes."""
        return 3 * self.output[axis] <= 2 * self.source[axis]


class StoppedForward(Exception):
    """A watched forward stopped early: the rest of it cannot change the answer."""


# Called with each step's index and the step; a reason stops the forward, None lets it go on.
StepWatch = Callable[[int, GridStep], str | None]


class StrideRecorder(TorchDispatchMode):
    """Record, in order, the grids of the ops that can stride (convolutions, poolings, resampling).

    A dispatch mode sees the aten ops of eager, scripted and traced models alike, where forward
    hooks would miss everything inside TorchScript. Which of them are strides and which are global
    (a whole-map pooling) is told by comparing two forwards
    (:mod:`~napari_normcheck.core.models.grid_steps`).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable unless this says no,
        # and that imports torch._dynamo (about 1 s) on the first op of every process's probe.
        # Our eager forwards never compile.
        return False

    def __init__(self, spatial_dims: int, watch: StepWatch | None = None) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.steps: list[GridStep] = []
        self.watch = watch
        self.stopped: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = str(func)
        if "adaptive" not in name and any(word in name for word in _STRIDED_OP_WORDS):
            output = result[0] if isinstance(result, tuple | list) and result else result
            self._record(name, args[0] if args else None, output)
        return result

    def _record(self, name: str, source: Any, output: Any) -> None:
        ndim = self.spatial_dims + 2
        if not (torch.is_tensor(source) and torch.is_tensor(output)):
            return
        if source.ndim != ndim or output.ndim != ndim:
            return
        step = GridStep(name, tuple(source.shape[2:]), tuple(output.shape[2:]))
        self.steps.append(step)
        reason = self.watch(len(self.steps) - 1, step) if self.watch is not None else None
        if reason is not None:
            self.stopped = reason
            raise StoppedForward(reason)


def smallest_grid(
    steps: Sequence[GridStep], spatial_dims: int, skip: Container[tuple[int, int]] = ()
) -> list[int | None]:
    """Per axis, the smallest output of a step that shrinks it; ``(index, axis)`` in ``skip`` ignored."""
    smallest: list[int | None] = [None] * spatial_dims
    for index, step in enumerate(steps):
        for axis in range(spatial_dims):
            if (index, axis) in skip or not step.shrinks(axis):
                continue
            current = smallest[axis]
            n_out = step.output[axis]
            smallest[axis] = n_out if current is None else min(current, n_out)
    return smallest


@contextlib.contextmanager
def untouched(module: nn.Module, notes: list[str]) -> Iterator[None]:
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


@dataclass
class Trial:
    """One forward on a random input of ``shape``.

    Attributes
    ----------
    shape : tuple of int
        ``(1, C, *spatial)``.
    ok : bool
        The forward ran and the prediction has the input's spatial shape.
    output : Any
        What the model returned (None on error).
    prediction : torch.Tensor or None
        The selected prediction.
    steps : list of GridStep
        The ops that could stride, in the order they ran (up to the error, when one stopped it).
    error : str or None
        One line: the exception, or the mismatched output shape.
    note : str or None
        How the prediction was picked among several outputs.
    """

    shape: tuple[int, ...]
    ok: bool
    output: Any = None
    prediction: torch.Tensor | None = None
    steps: list[GridStep] = field(default_factory=list)
    error: str | None = None
    note: str | None = None

    @property
    def spatial(self) -> tuple[int, ...]:
        """The spatial sides of the input."""
        return self.shape[2:]

    @property
    def smallest(self) -> list[int | None]:
        """Per spatial axis, the smallest grid a strided op produced (None when none strided it)."""
        return smallest_grid(self.steps, len(self.spatial))

    def collapsed(self, skip: Container[tuple[int, int]] = ()) -> bool:
        """A strided op (``(index, axis)`` in ``skip`` ignored) brought an axis to two voxels or fewer."""
        return any(
            n is not None and n <= 2 for n in smallest_grid(self.steps, len(self.spatial), skip)
        )

    def summary(self) -> str:
        """``"(1, 1, 32, 32, 32): ok"`` or the error."""
        return f"{self.shape}: {'ok' if self.ok else self.error}"


def run_trial(
    module: nn.Module,
    channels: int,
    spatial: Sequence[int],
    dtype: torch.dtype = torch.float32,
    choice: OutputChoice | None = None,
    device: torch.device | str = "cpu",
    watch: StepWatch | None = None,
) -> Trial:
    """Run one seeded random input of batch 1 through ``module`` as it is (mode set by the caller).

    ``watch`` sees each grid step as it runs and can stop the forward (a failed trial).
    """
    shape = (1, channels, *(int(s) for s in spatial))
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    recorder = StrideRecorder(len(spatial), watch)
    try:
        with recorder:
            output = module(image)
    except Exception as error:
        # TorchScript re-raises the watch's exception as its own, with a message of many lines.
        stopped = f"StoppedForward: {recorder.stopped}" if recorder.stopped else None
        message = stopped or first_line(error)
        return Trial(shape, False, steps=recorder.steps, error=message[:200])
    try:
        prediction, note = select_prediction(output, choice, shape[2:])
    except Exception as error:
        return Trial(shape, False, output, steps=recorder.steps, error=str(error))
    if prediction.ndim != len(shape) or tuple(prediction.shape[2:]) != shape[2:]:
        error = f"the output has shape {tuple(prediction.shape)}"
        return Trial(shape, False, output, prediction, recorder.steps, error, note)
    return Trial(shape, True, output, prediction, recorder.steps, None, note)


@contextlib.contextmanager
def norm_train(module: nn.Module) -> Iterator[None]:
    """Batch statistics in the normalization layers (stricter on sizes than eval), nothing written."""
    with normalization_mode(module, "train"), torch.inference_mode():
        yield
