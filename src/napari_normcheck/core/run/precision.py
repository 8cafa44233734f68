"""Numerical precision of the forwards: fp32 (default), TF32, or autocast to bf16 / fp16.

Reduced precision changes the numbers this tool reports, so a run in reduced precision also measures
that change on a few tiles (:func:`precision_disparity`) and the report states it. The model is never
converted: autocast computes convolutions in half precision while BatchNorm weights and running
statistics stay float32.

PyTorch lets cuDNN convolutions use TF32 by default on Ampere and newer GPUs; ``fp32`` switches that
off for the run so that "fp32" means IEEE float32, and every flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from napari_normcheck.core.base.config import PRECISIONS
from napari_normcheck.core.measure.metrics import DisparityAccumulator

__all__ = ["PRECISIONS", "precision_context", "precision_disparity"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _tf32_flags(enabled: bool) -> Iterator[None]:
    # PyTorch >= 2.9 has per-backend fp32_precision settings and refuses to mix them with the legacy
    # allow_tf32 flags; use the new ones where they exist.
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = (conv.fp32_precision, matmul.fp32_precision)
        value = "tf32" if enabled else "ieee"
        try:
            conv.fp32_precision = value
            matmul.fp32_precision = value
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = enabled
        matmul.allow_tf32 = enabled
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Run the forwards inside in ``precision`` on ``device``; global flags are restored on exit.

    Parameters
    ----------
    precision : {"fp32", "tf32", "bf16", "fp16"}
        ``fp32``: IEEE float32 (TF32 off on CUDA). ``tf32``: TF32 tensor cores for convolutions and
        matrix products on CUDA (no effect on the CPU). ``bf16`` / ``fp16``: ``torch.autocast``.
    device : torch.device
        Where the forwards run.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(_tf32_flags(precision == "tf32"))
        if precision in AUTOCAST_DTYPES:
            stack.enter_context(torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]))
        yield


def precision_disparity(
    reference: list[np.ndarray], reduced: list[np.ndarray], threshold: float, argmax: bool
) -> dict[str, list[float]]:
    """``1 - Dice`` per channel between fp32 and reduced-precision probabilities of the same tiles.

    Parameters
    ----------
    reference, reduced : list of numpy.ndarray
        ``(C, ...)`` probabilities per tile, in fp32 and in the reduced precision.
    threshold : float
        Foreground threshold of the hard Dice.
    argmax : bool
        Also the argmax Dice (softmax outputs).

    Returns
    -------
    dict
        ``{"hard": [...], "soft": [...](, "argmax": [...])}``, summed over the tiles as the
        train/eval disparity is.
    """
    n_channels = reference[0].shape[0] if reference else 0
    accumulator = DisparityAccumulator(n_channels, threshold, argmax)
    for a, b in zip(reference, reduced):
        accumulator.add(b, a)
    return accumulator.result()
