"""Trial forwards of a model on random inputs, recording the strides they pass through.

Every probe and tile check runs its forwards through :func:`run_trial` inside :func:`untouched`, so
the model's parameters, buffers and training flags are what they were before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from napari_normcheck.core.base.errors import first_line
from napari_normcheck.core.base.modes import normalization_mode
from napari_normcheck.core.models.outputs import OutputChoice, select_prediction

# aten ops that can shrink the spatial grid by a stride (adaptive pooling is global, not a stride).
_STRIDED_OP_WORDS = ("conv", "pool", "unshuffle", "upsample", "interpolate")


class StrideRecorder(TorchDispatchMode):
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
    smallest : list of (int or None)
        Per spatial axis, the smallest grid a strided op produced.
    error : str or None
        One line: the exception, or the mismatched output shape.
    note : str or None
        How the prediction was picked among several outputs.
    """

    shape: tuple[int, ...]
    ok: bool
    output: Any = None
    prediction: torch.Tensor | None = None
    smallest: list[int | None] | None = None
    error: str | None = None
    note: str | None = None

    @property
    def spatial(self) -> tuple[int, ...]:
        """The spatial sides of the input."""
        return self.shape[2:]

    @property
    def collapsed(self) -> bool:
        """A strided op brought some axis down to two voxels or fewer."""
        return any(n is not None and n <= 2 for n in self.smallest or [])

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
) -> Trial:
    """Run one seeded random input of batch 1 through ``module`` as it is (mode set by the caller)."""
    shape = (1, channels, *(int(s) for s in spatial))
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    recorder = StrideRecorder(len(spatial))
    try:
        with recorder:
            output = module(image)
    except Exception as error:
        return Trial(shape, False, smallest=recorder.smallest, error=first_line(error)[:200])
    try:
        prediction, note = select_prediction(output, choice, shape[2:])
    except Exception as error:
        return Trial(shape, False, output, smallest=recorder.smallest, error=str(error))
    if prediction.ndim != len(shape) or tuple(prediction.shape[2:]) != shape[2:]:
        error = f"the output has shape {tuple(prediction.shape)}"
        return Trial(shape, False, output, prediction, recorder.smallest, error, note)
    return Trial(shape, True, output, prediction, recorder.smallest, None, note)


@contextlib.contextmanager
def norm_train(module: nn.Module) -> Iterator[None]:
    """Batch statistics in the normalization layers (stricter on sizes than eval), nothing written."""
    with normalization_mode(module, "train"), torch.inference_mode():
        yield
