"""The forwards of pending tiles: every named prediction, batched by its own rule."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.run.forward import forward_tensor
from napari_normcheck.core.run.predictions import BoundPrediction
from napari_normcheck.core.run.staging import HostStaging
from napari_normcheck.core.run.tile_io import TileWork

if TYPE_CHECKING:
    from napari_normcheck.core.run.timing import Timing


class Passes:
    """Each prediction's forwards of pending tiles, batched, with feature hooks where asked for.

    Parameters
    ----------
    predictions : sequence of BoundPrediction
        What each tile gets, in order; models on ``device``.
    eval_batch, train_batch : int
        Tiles per forward of independent predictions and of batch-sharing ones (train mode:
        tiles of one batch share batch statistics).
    spatial_dims : int
        2 or 3.
    device : torch.device
        Where the forwards run.
    timing : Timing
        Seconds per stage, updated (each prediction's ``stage``).
    precision : str
        ``fp32``, ``tf32``, ``bf16`` or ``fp16`` (see :mod:`~napari_normcheck.core.run.precision`).
    fuse_train : bool
        With ``train_batch == 1``: run batch-sharing predictions ``eval_batch`` tiles at a time with
        per-sample normalization (:mod:`~napari_normcheck.core.models.per_sample_norm`), which gives
        the batch-1 result in fewer, larger forwards.
    """

    def __init__(
        self,
        predictions: Sequence[BoundPrediction],
        eval_batch: int,
        train_batch: int,
        spatial_dims: int,
        device: torch.device,
        timing: Timing,
        *,
        precision: str = "fp32",
        fuse_train: bool = False,
    ) -> None:
        self.predictions = list(predictions)
        self.fuse_train = fuse_train and train_batch == 1
        self.batch = {
            p.name: train_batch if p.prediction.shares_batch and not self.fuse_train else eval_batch
            for p in self.predictions
        }
        self.spatial_dims = spatial_dims
        self.device = device
        self.timing = timing
        self.precision = precision
        self.staging = HostStaging(device)

    def run_ready(self, pending: deque[TileWork], *, final: bool) -> None:
        """Run each prediction on consecutive pending tiles, a full batch at a time.

        With ``final``, a last partial batch runs too.
        """
        for bound in self.predictions:
            self._run(pending, bound, final)

    def _run(self, pending: deque[TileWork], bound: BoundPrediction, final: bool) -> None:
        name, prediction, recorder = bound.name, bound.prediction, bound.recorder
        per_sample = prediction.shares_batch and self.fuse_train
        todo = [w for w in pending if name not in w.outputs and not w.external]
        while todo and (len(todo) >= self.batch[name] or final):
            group = todo[: self.batch[name]]
            t0 = time.perf_counter()
            hooks = recorder.recording() if recorder else None
            try:
                with hooks or contextlib.nullcontext():
                    outputs = forward_tensor(
                        bound.model,
                        [w.image for w in group],
                        prediction.mode,
                        self.spatial_dims,
                        self.device,
                        precision=self.precision,
                        per_sample=per_sample,
                        staging=self.staging,
                    )
                    features = recorder.take() if recorder else []
                    if self.device.type == "cuda":
                        # CUDA runs the forward after this returns: waited for here, so that its
                        # time is the forward's and not that of whatever waits for the GPU next
                        # (a metrics or spill copy). One wait per batch, where the feature hooks
                        # waited once per layer before their statistics stayed on the GPU.
                        torch.cuda.current_stream(self.device).synchronize()
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5 on, same class
                # Independent results, and fused train results, do not depend on the batch: halve it.
                independent = not prediction.shares_batch or self.fuse_train
                if independent and self.batch[name] > 1:
                    self.batch[name] //= 2
                    torch.cuda.empty_cache()
                    continue
                several = len(group) > 1
                what = f"{len(group)} tiles" if several else "one tile"
                fix = "--tile or --train-batch" if several else "--tile"
                raise NormcheckError(
                    f"{what} of {group[0].image.shape[1:]} voxels {'do' if several else 'does'} "
                    f"not fit in GPU memory in the {name} pass; use a smaller {fix}"
                ) from None
            elapsed = time.perf_counter() - t0
            setattr(self.timing, prediction.stage, getattr(self.timing, prediction.stage) + elapsed)
            for k, (w, o) in enumerate(zip(group, outputs)):
                w.outputs[name] = o
                if features:
                    w.features = features[k]
            todo = todo[len(group) :]
