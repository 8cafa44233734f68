"""Model forwards: devices, batches in eval and train normalization, outputs and activations."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from napari_normcheck.core.errors import NormcheckError
from napari_normcheck.core.features import FeatureRecorder
from napari_normcheck.core.modes import normalization_mode
from napari_normcheck.core.tile_io import TileWork

if TYPE_CHECKING:
    from napari_normcheck.core.engine import Timing

MODES = ("eval", "train")


def resolve_device(choice: str) -> torch.device:
    """``auto`` gives CUDA when available, else CPU; an explicit CUDA choice without CUDA is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise NormcheckError(
            "device cuda was requested but no CUDA GPU is available; use --device cpu"
        )
    return torch.device(choice)


class Passes:
    """The eval and train forwards of pending tiles, batched, with feature hooks in the eval pass."""

    def __init__(
        self,
        model: nn.Module,
        eval_batch: int,
        train_batch: int,
        spatial_dims: int,
        device: torch.device,
        timing: Timing,
        recorder: FeatureRecorder | None,
    ) -> None:
        self.model = model
        self.batch = {"eval": eval_batch, "train": train_batch}
        self.spatial_dims = spatial_dims
        self.device = device
        self.timing = timing
        self.recorder = recorder

    def run_ready(self, pending: deque[TileWork], *, final: bool) -> None:
        """Run each mode on consecutive pending tiles, a full batch at a time (a partial one at the end)."""
        for mode in MODES:
            self._run_mode(pending, mode, final)

    def _run_mode(self, pending: deque[TileWork], mode: str, final: bool) -> None:
        todo = [w for w in pending if mode not in w.outputs]
        while todo and (len(todo) >= self.batch[mode] or final):
            group = todo[: self.batch[mode]]
            t0 = time.perf_counter()
            hooks = self.recorder.recording() if self.recorder and mode == "eval" else None
            try:
                with hooks or contextlib.nullcontext():
                    images = [w.image for w in group]
                    outputs = forward_batch(
                        self.model, images, mode, self.spatial_dims, self.device
                    )
                    features = self.recorder.take() if hooks else []
            except torch.OutOfMemoryError:
                if mode == "eval" and self.batch[mode] > 1:
                    # Eval results do not depend on the batch: halve it and try again.
                    self.batch[mode] //= 2
                    torch.cuda.empty_cache()
                    continue
                raise NormcheckError(
                    f"one tile of {group[0].image.shape[1:]} voxels does not fit in GPU memory in "
                    f"the {mode} pass; use a smaller --tile"
                ) from None
            elapsed = time.perf_counter() - t0
            if mode == "eval":
                self.timing.forward_eval += elapsed
            else:
                self.timing.forward_train += elapsed
            for k, (w, o) in enumerate(zip(group, outputs)):
                w.outputs[mode] = o
                if features:
                    w.features = features[k]
            todo = todo[len(group) :]


def forward_batch(
    model: nn.Module, images: list[np.ndarray], mode: str, spatial_dims: int, device: torch.device
) -> np.ndarray:
    """Predict a batch of ``(C, z, y, x)`` windows in normalization ``mode``; returns float32 numpy."""
    batch = torch.from_numpy(np.stack(images))
    if spatial_dims == 2:
        batch = batch[:, :, 0]
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    with torch.inference_mode(), normalization_mode(model, mode):  # type: ignore[arg-type]
        output = first_tensor(model(batch))
    if tuple(output.shape[2:]) != tuple(batch.shape[2:]) or output.shape[0] != batch.shape[0]:
        raise NormcheckError(
            f"the model returned shape {tuple(output.shape)} for input {tuple(batch.shape)}: "
            "napari-normcheck needs outputs with the input's spatial shape (a segmentation network)"
        )
    if spatial_dims == 2:
        output = output[:, :, None]
    return output.float().cpu().numpy()


_warned_tuple_output = False


def first_tensor(output: Any) -> torch.Tensor:
    """The model's prediction: the output itself, or the first tensor of a tuple, list or dict."""
    global _warned_tuple_output
    if isinstance(output, torch.Tensor):
        return output
    values = (
        list(output.values())
        if isinstance(output, dict)
        else list(output)
        if isinstance(output, (tuple, list))
        else []
    )
    for value in values:
        if isinstance(value, torch.Tensor):
            if not _warned_tuple_output:
                warnings.warn(
                    f"the model returned a {type(output).__name__}; using its first tensor "
                    f"(shape {tuple(value.shape)}) as the prediction",
                    stacklevel=2,
                )
                _warned_tuple_output = True
            return value
    raise NormcheckError(
        f"the model returned {type(output).__name__} with no tensor; it must return a tensor"
    )


def probe_out_channels(
    model: nn.Module,
    in_channels: int,
    window: tuple[int, int, int],
    spatial_dims: int,
    device: torch.device,
    divisor: tuple[int, ...] | int | None = None,
) -> int:
    """Output channels from one eval forward on zeros (also checks channels and output shape).

    With the model's divisor known, the probe uses a small window (two divisors a side, at most
    the tile) so that it costs a fraction of a tile's forward.
    """
    if divisor is not None:
        divs = (divisor,) * spatial_dims if isinstance(divisor, int) else tuple(divisor)
        divs = (1,) * (3 - len(divs)) + divs
        window = tuple(min(w, 2 * d) for w, d in zip(window, divs))
    image = np.zeros((in_channels, *window), dtype=np.float32)
    try:
        return int(forward_batch(model, [image], "eval", spatial_dims, device).shape[1])
    except RuntimeError as error:
        raise NormcheckError(
            f"the model failed on a {spatial_dims}D input of {in_channels} channel(s) and shape "
            f"{window[3 - spatial_dims :]}: {str(error).splitlines()[0]} (check the channel count, "
            "--spatial-dims and the tile)"
        ) from None


def activate(values: np.ndarray, activation: str) -> np.ndarray:
    """Apply the activation over the channel axis (axis 1 of ``(modes, C, z, y, x)``)."""
    if activation == "none":
        return values
    tensor = torch.from_numpy(values)
    if activation == "sigmoid":
        return torch.sigmoid(tensor).numpy()
    return torch.softmax(tensor, dim=1).numpy()


def to_output_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast probabilities for storage; ``uint8`` stores probability x 255, rounded."""
    if dtype == "uint8":
        return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return values.astype(dtype, copy=False)
