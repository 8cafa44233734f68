"""Model forwards: devices, batches in eval and train normalization, outputs and activations."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import MODES, normalization_mode
from napari_normcheck.core.base.scratch import ScratchBuffer
from napari_normcheck.core.models.outputs import first_tensor
from napari_normcheck.core.models.per_sample_norm import per_sample_train_norm
from napari_normcheck.core.run.precision import precision_context, precision_disparity
from napari_normcheck.core.run.staging import HostStaging


def resolve_device(choice: str) -> torch.device:
    """``auto`` gives CUDA when available, else CPU; an explicit CUDA choice without CUDA is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise NormcheckError(
            "device cuda was requested but no CUDA GPU is available; use --device cpu"
        )
    return torch.device(choice)


def forward_batch(
    model: nn.Module,
    images: list[np.ndarray],
    mode: str,
    spatial_dims: int,
    device: torch.device,
    **options: Any,
) -> np.ndarray:
    """:func:`forward_tensor` (the same arguments) copied to the host: float32 NumPy."""
    return forward_tensor(model, images, mode, spatial_dims, device, **options).cpu().numpy()


def forward_tensor(
    model: nn.Module,
    images: list[np.ndarray],
    mode: str,
    spatial_dims: int,
    device: torch.device,
    *,
    precision: str = "fp32",
    per_sample: bool = False,
    staging: HostStaging | None = None,
) -> torch.Tensor:
    """Predict a batch of ``(C, z, y, x)`` windows in normalization ``mode``, on ``device``.

    The prediction stays where the model made it: the run blends, activates and measures it there
    (:mod:`~napari_normcheck.core.run.stitch`), and only finished chunks cross to the host.

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
    torch.Tensor
        ``(N, C_out, z, y, x)`` float32 on ``device``.
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
    return output.float()


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
    return activate_tensor(torch.from_numpy(values), activation).numpy()


def activate_tensor(values: torch.Tensor, activation: str, in_place: bool = False) -> torch.Tensor:
    """:func:`activate` on a tensor, where it is (``(modes, C, z, y, x)``, channels on axis 1).

    ``values`` should be contiguous: torch's CPU kernels compute the last elements of each
    contiguous run without vector instructions, whose exponential may round differently, so the same
    layout gives the same bits. ``in_place`` lets a sigmoid overwrite ``values`` (the same kernel,
    the same bits, no new memory); a softmax always returns new values.
    """
    if activation == "none":
        return values
    if activation == "sigmoid":
        return sigmoid_into(values, values if in_place else torch.empty_like(values))
    return torch.softmax(values, dim=1)


#: Values per sigmoid call on the CPU: below torch's grain size (32768), so each call runs on one
#: thread, and a multiple of 32 (two AVX-512 vectors of float32, the step of torch's vector loop),
#: so every value but the tensor's last few is computed with vector instructions, whatever the
#: number of threads. 0.57 ms per million values here, against 0.23 ms on 2 threads in one call.
SERIAL_SIGMOID_VALUES = 32768 - 32


def sigmoid_into(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = sigmoid(values)`` (``out`` may be ``values``), the same bits for any number of threads.

    torch splits an element-wise kernel among its threads, and each thread computes the last
    values of its share without vector instructions, whose exponential rounds differently: with
    2 threads a few values in 10,000 of some tensor sizes (a 2x2x9x33x35 chunk) differed from 1
    thread, so a run's sums depended on ``--threads`` and a distributed run (workers of one thread)
    differed from one process. Contiguous CPU tensors are therefore computed in slices that each
    run on one thread: the bits of one thread. Elsewhere (a GPU computes every value alike, and a
    strided layout is the caller's to avoid) one call.
    """
    if values.device.type != "cpu" or not (values.is_contiguous() and out.is_contiguous()):
        return torch.sigmoid(values, out=out)
    source, target = values.view(-1), out.view(-1)
    for start in range(0, source.numel(), SERIAL_SIGMOID_VALUES):
        stop = start + SERIAL_SIGMOID_VALUES
        torch.sigmoid(source[start:stop], out=target[start:stop])
    return out


def activate_into(
    values: torch.Tensor | np.ndarray, activation: str, out: torch.Tensor | np.ndarray
) -> None:
    """Apply the activation to one mode's ``(C, z, y, x)`` values, written into ``out`` (float32).

    ``values`` (a view of a tile's prediction, say) is made contiguous first, so the activation
    sees the layout of ``out`` whatever the view's strides; tensors stay on their device.
    """
    target = torch.as_tensor(out)
    if activation == "none":
        target.copy_(torch.as_tensor(values))  # one copy, whatever the strides
        return
    source = torch.as_tensor(values, dtype=torch.float32).contiguous()
    if activation == "sigmoid":
        sigmoid_into(source, target)
    else:
        target.copy_(torch.softmax(source, dim=0))


def to_output_dtype(
    values: np.ndarray | torch.Tensor, dtype: str, scratch: ScratchBuffer | None = None
) -> np.ndarray | torch.Tensor:
    """Cast probabilities for storage; ``uint8`` stores probability x 255, rounded.

    A tensor is cast where it is (and stays a tensor); an array comes back as an array.
    ``scratch`` lends the memory of the uint8 conversion's float32 steps (the calling thread's).
    """
    if isinstance(values, np.ndarray):
        if dtype != "uint8":
            return values.astype(dtype, copy=False)
        return to_output_dtype(
            torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), dtype
        ).numpy()
    if dtype == "uint8":
        # The same float32 operations as numpy's clip, * 255 and round-half-to-even, in one
        # multithreaded pass per operation and no float64 temporaries.
        source = values.float().contiguous()
        scaled = (scratch or ScratchBuffer()).empty(tuple(source.shape), source.device)
        torch.clamp(source, 0.0, 1.0, out=scaled)
        return scaled.mul_(255.0).round_().to(torch.uint8)
    return values.to(getattr(torch, dtype))


def probe_eval_batch(
    model: nn.Module,
    in_channels: int,
    window: tuple[int, int, int],
    spatial_dims: int,
    device: torch.device,
    *,
    precision: str = "fp32",
    limit: int = 32,
    reserve_bytes: int = 0,
) -> int:
    """The largest eval batch (a power of two up to ``limit``) whose forward fits in GPU memory.

    Forwards of zeros are as large as forwards of data, so doubling until out-of-memory finds the
    batch; the run still halves it if a later forward runs out (each tile's eval result is its
    own, equal to a batch-1 forward up to the float32 rounding of the convolution kernels that
    cuDNN or oneDNN pick for the batch size: a BasicUNet on the NEUBIAS LM volume, eval batch 3
    against 1 on the CPU, moved some stored uint8 voxels by one step).
    ``reserve_bytes`` are held on the GPU while probing: what the run keeps there beside the
    forwards (chunk sums, slabs, chunks being written), which only the forwards can make room for.
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
    reserve_bytes : int
        GPU memory the rest of the run needs beside the forwards.

    Returns
    -------
    int
        A batch size of at least 1.
    """
    if device.type != "cuda":
        return 1
    image = np.zeros((in_channels, *window), dtype=np.float32)
    fits, batch = 1, 1
    try:
        # Held while probing: the batch found leaves that much for the run's other tensors.
        held = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError:
        held = None  # not even that: batch 1, and the run halves nothing further
        limit = 1
    while batch <= max(1, limit):
        try:
            forward_batch(model, [image] * batch, "eval", spatial_dims, device, precision=precision)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5 on, same class
            break
        fits, batch = batch, batch * 2
    del held
    torch.cuda.empty_cache()
    return fits


def run_memory_bytes(
    n_values: int,
    window: tuple[int, ...],
    chunk: tuple[int, ...],
    cache_mb: int,
    chunks_queued: int = 8,
    tiles_held: int = 3,
) -> int:
    """GPU memory a run holds beside its forwards (float32 values, ``n_values`` per voxel).

    The unfinished chunks' sums (``cache_mb``, and one chunk beyond it), the overlap slabs (half of
    ``cache_mb``), finished chunks queued for the writer, and tiles whose predictions wait for
    their metrics or for stitching.
    """
    value_bytes = 4 * n_values
    chunk_bytes = value_bytes * math.prod(chunk)
    tile_bytes = value_bytes * math.prod(window)
    budgets = (cache_mb + cache_mb // 2) * 2**20
    return budgets + (chunks_queued + 1) * chunk_bytes + tiles_held * tile_bytes


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
