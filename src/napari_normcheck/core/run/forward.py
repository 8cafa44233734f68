"""Model forwards: devices, batches in eval and train normalization, outputs and activations."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import MODES, normalization_mode
from napari_normcheck.core.measure.features import FeatureRecorder
from napari_normcheck.core.models.outputs import first_tensor
from napari_normcheck.core.models.per_sample_norm import per_sample_train_norm
from napari_normcheck.core.run.precision import precision_context, precision_disparity
from napari_normcheck.core.run.staging import HostStaging
from napari_normcheck.core.run.tile_io import TileWork

if TYPE_CHECKING:
    from napari_normcheck.core.run.timing import Timing


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
    """The eval and train forwards of pending tiles, batched, with feature hooks in the eval pass.

    Parameters
    ----------
    model : torch.nn.Module
        The model on ``device``.
    eval_batch, train_batch : int
        Tiles per forward in each mode. Tiles of one train batch share batch statistics.
    spatial_dims : int
        2 or 3.
    device : torch.device
        Where the forwards run.
    timing : Timing
        Seconds per stage, updated.
    recorder : FeatureRecorder or None
        Feature hooks, active in the eval pass.
    precision : str
        ``fp32``, ``tf32``, ``bf16`` or ``fp16`` (see :mod:`~napari_normcheck.core.run.precision`).
    fuse_train : bool
        With ``train_batch == 1``: run the train pass ``eval_batch`` tiles at a time with per-sample
        normalization (:mod:`~napari_normcheck.core.models.per_sample_norm`), which gives the batch-1
        result in fewer, larger forwards.
    """

    def __init__(
        self,
        model: nn.Module,
        eval_batch: int,
        train_batch: int,
        spatial_dims: int,
        device: torch.device,
        timing: Timing,
        recorder: FeatureRecorder | None,
        *,
        precision: str = "fp32",
        fuse_train: bool = False,
    ) -> None:
        self.model = model
        self.fuse_train = fuse_train and train_batch == 1
        self.batch = {"eval": eval_batch, "train": eval_batch if self.fuse_train else train_batch}
        self.spatial_dims = spatial_dims
        self.device = device
        self.timing = timing
        self.recorder = recorder
        self.precision = precision
        self.staging = HostStaging(device)

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
                        self.model,
                        images,
                        mode,
                        self.spatial_dims,
                        self.device,
                        precision=self.precision,
                        per_sample=mode == "train" and self.fuse_train,
                        staging=self.staging,
                    )
                    features = self.recorder.take() if hooks else []
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5 on, same class
                # Eval results, and fused train results, do not depend on the batch: halve it.
                independent = mode == "eval" or self.fuse_train
                if independent and self.batch[mode] > 1:
                    self.batch[mode] //= 2
                    torch.cuda.empty_cache()
                    continue
                several = len(group) > 1
                what = f"{len(group)} tiles" if several else "one tile"
                fix = "--tile or --train-batch" if several else "--tile"
                raise NormcheckError(
                    f"{what} of {group[0].image.shape[1:]} voxels {'do' if several else 'does'} "
                    f"not fit in GPU memory in the {mode} pass; use a smaller {fix}"
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
    model: nn.Module,
    images: list[np.ndarray],
    mode: str,
    spatial_dims: int,
    device: torch.device,
    *,
    precision: str = "fp32",
    per_sample: bool = False,
    staging: HostStaging | None = None,
) -> np.ndarray:
    """Predict a batch of ``(C, z, y, x)`` windows in normalization ``mode``; returns float32 numpy.

    Parameters
    ----------
    model : torch.nn.Module
        The model, on ``device``; restored after the forward.
    images : list of numpy.ndarray
        float32 windows of one shape.
    mode : {"eval", "train"}
        Normalization statistics.
    spatial_dims : int
        2 (the z axis of size 1 is dropped for the model) or 3.
    device : torch.device
        Where the forward runs.
    precision : str
        ``fp32``, ``tf32``, ``bf16`` or ``fp16``.
    per_sample : bool
        Train mode only: every tile normalized by its own statistics, as ``len(images)`` batch-1
        forwards would be (the model must satisfy
        :func:`~napari_normcheck.core.models.per_sample_norm.supports_per_sample`).
    staging : HostStaging, optional
        Reused pinned buffers for the host-to-device copy.

    Returns
    -------
    numpy.ndarray
        ``(N, C_out, z, y, x)`` float32.
    """
    batch = (staging or HostStaging(device)).to_device(images)
    if spatial_dims == 2:
        batch = batch[:, :, 0]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if per_sample:
            stack.enter_context(normalization_mode(model, "eval"))
            stack.enter_context(per_sample_train_norm(model))
        else:
            stack.enter_context(normalization_mode(model, mode))  # type: ignore[arg-type]
        stack.enter_context(precision_context(precision, device))
        output = first_tensor(model(batch), model, tuple(batch.shape[2:]))
    if tuple(output.shape[2:]) != tuple(batch.shape[2:]) or output.shape[0] != batch.shape[0]:
        raise NormcheckError(
            f"the model returned shape {tuple(output.shape)} for input {tuple(batch.shape)}: "
            "napari-normcheck needs outputs with the input's spatial shape (a segmentation network)"
        )
    if spatial_dims == 2:
        output = output[:, :, None]
    return output.float().cpu().numpy()


def probe_out_channels(
    model: nn.Module,
    in_channels: int,
    window: tuple[int, int, int],
    spatial_dims: int,
    device: torch.device,
    divisor: tuple[int, ...] | int | None = None,
) -> int:
    """Output channels from one forward of the run's window (batch 1, batch statistics).

    The window itself is tried, so a tile the model takes runs whatever the probed divisor says;
    where it fails, the error names the axis and the nearest sizes that work
    (:func:`~napari_normcheck.core.models.tilefit.check_window`).
    """
    from napari_normcheck.core.models.tilefit import check_window

    return check_window(model, in_channels, window, spatial_dims, device, divisor)


def activate(values: np.ndarray, activation: str) -> np.ndarray:
    """Apply the activation over the channel axis (axis 1 of ``(modes, C, z, y, x)``)."""
    if activation == "none":
        return values
    tensor = torch.from_numpy(values)
    if activation == "sigmoid":
        return torch.sigmoid(tensor).numpy()
    return torch.softmax(tensor, dim=1).numpy()


def activate_into(values: np.ndarray, activation: str, out: np.ndarray) -> None:
    """Apply the activation to one mode's ``(C, z, y, x)`` values, written into ``out`` (float32)."""
    if activation == "none":
        np.copyto(out, values)
        return
    source = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    target = torch.from_numpy(out)
    if activation == "sigmoid":
        torch.sigmoid(source, out=target)
    else:
        target.copy_(torch.softmax(source, dim=0))


def to_output_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast probabilities for storage; ``uint8`` stores probability x 255, rounded."""
    if dtype == "uint8":
        # torch: the same float32 operations as numpy's clip, * 255 and round-half-to-even, in one
        # multithreaded pass per operation and no float64 temporaries.
        scaled = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).clamp(0.0, 1.0)
        return scaled.mul_(255.0).round_().to(torch.uint8).numpy()
    return values.astype(dtype, copy=False)


def probe_eval_batch(
    model: nn.Module,
    in_channels: int,
    window: tuple[int, int, int],
    spatial_dims: int,
    device: torch.device,
    *,
    precision: str = "fp32",
    limit: int = 32,
) -> int:
    """The largest eval batch (a power of two up to ``limit``) whose forward fits in GPU memory.

    Forwards of zeros are as large as forwards of data, so doubling until out-of-memory finds the
    batch; the run still halves it if a later forward runs out (eval results do not depend on it).
    On the CPU there is nothing to probe: 1.

    Parameters
    ----------
    model : torch.nn.Module
        The model on ``device``.
    in_channels : int
        Input channels.
    window : tuple of int
        The model's input window ``(z, y, x)``.
    spatial_dims : int
        2 or 3.
    device : torch.device
        The device to probe.
    precision : str
        The run's precision (half precision fits larger batches).
    limit : int
        The largest batch tried (the number of tiles, say).

    Returns
    -------
    int
        A batch size of at least 1.
    """
    if device.type != "cuda":
        return 1
    image = np.zeros((in_channels, *window), dtype=np.float32)
    fits, batch = 1, 1
    while batch <= max(1, limit):
        try:
            forward_batch(model, [image] * batch, "eval", spatial_dims, device, precision=precision)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5 on, same class
            break
        fits, batch = batch, batch * 2
    torch.cuda.empty_cache()
    return fits


def measure_precision_effect(
    model: nn.Module,
    images: list[np.ndarray],
    spatial_dims: int,
    device: torch.device,
    precision: str,
    activation: str,
    threshold: float,
) -> dict[str, dict[str, list[float]]]:
    """Disparity of ``precision`` against fp32 on some windows, in both normalization modes.

    Reduced precision changes the predictions this tool compares; this measures by how much, with
    the same Dice as the train/eval disparity, so the report can set one against the other.

    Parameters
    ----------
    model : torch.nn.Module
        The model on ``device``.
    images : list of numpy.ndarray
        Input windows ``(C, z, y, x)``, each predicted on its own (batch 1).
    spatial_dims : int
        2 or 3.
    device : torch.device
        Where the forwards run.
    precision : str
        The reduced precision (``tf32``, ``bf16`` or ``fp16``).
    activation : str
        ``none``, ``sigmoid`` or ``softmax``.
    threshold : float
        Foreground threshold of the hard Dice.

    Returns
    -------
    dict
        ``{"eval": {"hard": [...], "soft": [...]}, "train": {...}}`` per channel.
    """
    effect = {}
    for mode in MODES:
        reference, reduced = [], []
        for image in images:
            for p, store in (("fp32", reference), (precision, reduced)):
                logits = forward_batch(model, [image], mode, spatial_dims, device, precision=p)
                store.append(activate(logits, activation)[0])
        effect[mode] = precision_disparity(
            reference, reduced, threshold, argmax=activation == "softmax"
        )
    return effect
