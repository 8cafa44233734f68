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
import threading
from collections.abc import Iterator

import numpy as np
import torch

from napari_normcheck.core.base.config import PRECISIONS
from napari_normcheck.core.measure.metrics import DisparityAccumulator

__all__ = ["PRECISIONS", "precision_context", "precision_disparity"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _TF32Flags:
    """PyTorch's process-wide TF32 flags, shared by the threads whose forwards are running.

    Forwards run in several threads at once (a distributed worker's blocks, the widget's run and
    its remedies): a thread that restored the flags as it found them while another thread's
    forward was still queuing convolutions would switch that forward's precision under it. The
    first thread in sets the flags and the last one out restores them; a thread that needs the
    other setting waits until the threads using this one are done.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._users = 0
        self._enabled: bool | None = None
        self._saved: tuple | None = None
        self._mine = threading.local()  # how deep this thread is inside

    @contextlib.contextmanager
    def using(self, enabled: bool) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        with self._lock:
            if depth and self._enabled != enabled:
                raise RuntimeError("TF32 switched inside a forward of the other precision")
            while self._users and self._enabled != enabled:
                self._lock.wait()
            if self._users == 0:
                self._saved = _set_tf32(enabled)
                self._enabled = enabled
            self._users += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    _restore_tf32(self._saved)
                    self._enabled = self._saved = None
                    self._lock.notify_all()


def _set_tf32(enabled: bool) -> tuple:
    """Set TF32 for convolutions and matrix products; the settings before."""
    # PyTorch >= 2.9 has per-backend fp32_precision settings and refuses to mix them with the legacy
    # allow_tf32 flags; use the new ones where they exist.
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = ("fp32_precision", conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision = matmul.fp32_precision = "tf32" if enabled else "ieee"
        return saved
    saved = ("allow_tf32", torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = enabled
    return saved


def _restore_tf32(saved: tuple) -> None:
    kind, conv_value, matmul_value = saved
    if kind == "fp32_precision":
        torch.backends.cudnn.conv.fp32_precision = conv_value
        torch.backends.cuda.matmul.fp32_precision = matmul_value
    else:
        torch.backends.cudnn.allow_tf32 = conv_value
        torch.backends.cuda.matmul.allow_tf32 = matmul_value


_TF32 = _TF32Flags()


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
            stack.enter_context(_TF32.using(precision == "tf32"))
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
