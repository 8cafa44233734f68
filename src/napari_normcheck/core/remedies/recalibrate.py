"""Recalibrate running statistics on the user's volume (precise BatchNorm / AdaBN), on a copy of the model.

Small-batch training leaves running statistics that are an exponential average of a few noisy batch
statistics; eval mode then normalizes every tile with values that fit few of them. Recalibration
replaces them by exact averages over many tiles of the volume at hand:

1. a deep copy of the model gets, for every layer with running statistics, ``momentum = 1``, so that
   one train-mode forward leaves exactly that batch's statistics in the running buffers (PyTorch's own
   batch mean and *unbiased* batch variance; for InstanceNorm their average over the instances);
2. tiles sampled over the volume (see :mod:`~napari_normcheck.core.run.tile_sampling`) go through the copy
   in batches of the training batch size, with only the normalization layers in train mode (dropout
   off); after each batch its statistics are read out and summed in float64;
3. the running buffers are set to the cumulative averages (``momentum=None`` semantics: every batch
   weighs the same) and ``num_batches_tracked`` to the number of batches.

Two variance estimates: ``mean`` (default) is the average of the per-batch unbiased variances, exactly
what ``momentum=None`` accumulates; ``pooled`` is the unbiased variance of all sampled voxels of a
channel, which adds the spread of the batch means: with ``K`` batches of ``n`` values per channel,
``((n - 1) * sum(v_b) + n * sum((m_b - M)^2)) / (K * n - 1)`` (``n`` is read from the layer's input;
scripted layers hide it and get the large-``n`` limit; for InstanceNorm with more than one tile per
batch the spread between the tiles of one batch is not included). Held-out tiles measure the effect:
the disparity between eval and train mode on them, before and after.
"""

from __future__ import annotations

import copy
import datetime
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_normcheck import __version__
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import running_stats_layers
from napari_normcheck.core.base.tiling import Tile
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.measure.metrics import dice_sums, disparity_from_sums
from napari_normcheck.core.run.forward import activate, forward_batch, resolve_device
from napari_normcheck.core.run.precision import precision_context
from napari_normcheck.core.run.tile_sampling import (
    ContentMask,
    read_tiles,
    sample_tiles,
    window_plan,
)

VARIANCE_ESTIMATES = ("mean", "pooled")


@dataclass(frozen=True)
class RecalibrationConfig:
    """How running statistics are re-estimated.

    Attributes
    ----------
    tile : tuple of int
        The model's input window ``(z, y, x)``: the training tile size (``z = 1`` for a 2D model).
    batch_size : int
        Tiles per forward, as in training; only full batches are used.
    n_tiles : int
        Tiles to estimate the statistics from (rounded down to whole batches).
    holdout : int
        Further tiles, not used for the estimate, on which the effect is measured (0: none).
    variance : {"mean", "pooled"}
        Average of per-batch variances, or the variance of all sampled voxels.
    seed : int
        Seed of the tile positions.
    roi : tuple of (int, int) or None
        Region to sample from; the whole volume by default.
    mask_below, mask_above : float or None
        Raw intensity window of content voxels (see :class:`~napari_normcheck.core.run.tile_sampling.ContentMask`).
    min_content : float
        Fraction of a tile's voxels that must be content for the tile to be used.
    activation, threshold : str, float
        How held-out predictions become probabilities and masks for the disparity.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    """

    tile: tuple[int, int, int]
    batch_size: int = 1
    n_tiles: int = 32
    holdout: int = 4
    variance: str = "mean"
    seed: int = 0
    roi: tuple[tuple[int, int], ...] | None = None
    mask_below: float | None = None
    mask_above: float | None = None
    min_content: float = 0.5
    activation: str = "none"
    threshold: float = 0.5
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.variance not in VARIANCE_ESTIMATES:
            raise NormcheckError(f"unknown variance estimate {self.variance!r}; use mean or pooled")
        if self.batch_size < 1:
            raise NormcheckError("the recalibration batch size must be at least 1")
        if self.n_tiles < self.batch_size:
            raise NormcheckError(
                f"{self.n_tiles} tiles do not fill one batch of {self.batch_size}; "
                "give more --tiles"
            )
        if self.holdout < 0:
            raise NormcheckError("--holdout must be 0 or more")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {
            "tile": list(self.tile),
            "batch_size": self.batch_size,
            "n_tiles": self.n_tiles,
            "holdout": self.holdout,
            "variance": self.variance,
            "seed": self.seed,
            "roi": [list(p) for p in self.roi] if self.roi is not None else None,
            "mask_below": self.mask_below,
            "mask_above": self.mask_above,
            "min_content": self.min_content,
            "activation": self.activation,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class RecalibrationProgress:
    """Emitted after each calibration batch and each held-out batch."""

    stage: str
    n_done: int
    n_total: int


@dataclass
class RecalibrationResult:
    """A recalibrated copy of the model and what it was computed from.

    Attributes
    ----------
    model : torch.nn.Module
        The copy, in eval mode, on the CPU; the user's model is untouched.
    provenance : dict
        Volume, ROI, tiles (window starts), batches, variance estimate, date, versions.
    holdout : dict or None
        Disparity vs train mode on the held-out tiles, ``before`` and ``after`` (hard/soft per channel).
    calibration_tiles, holdout_tiles : list of Tile
        The windows used (``window_start`` in volume voxels).
    """

    model: nn.Module
    provenance: dict[str, Any]
    holdout: dict[str, Any] | None
    calibration_tiles: list[Tile] = field(default_factory=list)
    holdout_tiles: list[Tile] = field(default_factory=list)


@dataclass(frozen=True)
class RecalibrationDone:
    """Emitted last by :func:`iter_recalibrate`."""

    result: RecalibrationResult


def iter_recalibrate(
    model: nn.Module,
    volume: Volume,
    config: RecalibrationConfig,
    *,
    transform: IntensityTransform,
    spatial_dims: int = 3,
    source_model: dict[str, Any] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[RecalibrationProgress | RecalibrationDone]:
    """Recalibrate a copy of ``model`` on ``volume``; a generator of progress events.

    Parameters
    ----------
    model : torch.nn.Module
        The user's model (eager or scripted TorchScript); never modified.
    volume : Volume
        The volume to sample tiles from.
    config : RecalibrationConfig
        Tiles, batches, variance estimate, masks.
    transform : IntensityTransform
        The input normalization the model expects (as in the check run).
    spatial_dims : int
        2 or 3.
    source_model : dict, optional
        Where the model came from (path, sha256), for the provenance.
    cancel : threading.Event, optional
        Set it to stop between batches (nothing is returned then).

    Yields
    ------
    RecalibrationProgress, RecalibrationDone
        Progress, then the result.

    Raises
    ------
    NormcheckError
        When the model has no running statistics or too few tiles pass the content mask.
    """
    device = resolve_device(config.device)
    worker = copy.deepcopy(model)
    if device.type != "cpu":
        worker = worker.to(device)
    layers = running_stats_layers(worker)
    if not layers:
        raise NormcheckError(
            "the model has no normalization layers with running statistics (GroupNorm, LayerNorm "
            "or InstanceNorm without tracking): there is nothing to recalibrate"
        )
    plan = window_plan(volume, config.tile, config.roi)
    mask = ContentMask(config.mask_below, config.mask_above, config.min_content)
    tiles, n_rejected = sample_tiles(
        volume, plan, config.n_tiles + config.holdout, seed=config.seed, mask=mask
    )
    n_holdout = min(config.holdout, max(len(tiles) - config.batch_size, 0))
    holdout_tiles, calibration_tiles = tiles[:n_holdout], tiles[n_holdout:]
    n_batches = len(calibration_tiles) // config.batch_size
    if n_batches == 0:
        raise NormcheckError(
            f"only {len(tiles)} distinct tile(s) of {config.tile} fit the region and pass the "
            f"content mask ({n_rejected} skipped), fewer than a batch of {config.batch_size}; "
            "lower --mask-below / raise --mask-above, or sample a larger region"
        )
    calibration_tiles = calibration_tiles[: n_batches * config.batch_size]

    state = _CalibrationState(worker, layers)
    try:
        for b in range(n_batches):
            group = calibration_tiles[b * config.batch_size : (b + 1) * config.batch_size]
            state.forward(read_tiles(volume, plan, group, transform), spatial_dims, device)
            yield RecalibrationProgress("calibration", b + 1, n_batches)
            if cancel is not None and cancel.is_set():
                return
        moments = state.finish(config.variance)
    finally:
        state.restore()
    worker.eval()

    holdout = None
    if holdout_tiles:
        images = read_tiles(volume, plan, holdout_tiles, transform)
        original = model if device.type == "cpu" else copy.deepcopy(model).to(device)
        holdout = yield from _holdout_disparity(
            original, worker, images, config, spatial_dims, device
        )
    provenance = {
        "kind": "napari-normcheck recalibrated running statistics",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "volume": volume.source,
        "volume_shape": list(volume.spatial_shape),
        "roi": [list(pair) for pair in zip(plan.roi_start, plan.roi_stop)],
        "intensity": transform.to_dict(),
        "config": config.to_dict(),
        "variance": config.variance,
        "n_batches": n_batches,
        "tiles": [list(t.window_start) for t in calibration_tiles],
        "holdout_tiles": [list(t.window_start) for t in holdout_tiles],
        "tiles_rejected_by_mask": n_rejected,
        "layers": [name for name, _ in layers],
        "moments": moments,
        "notes": (
            [
                "pooled variance of scripted layers uses the large-sample limit (their input size is "
                "hidden): exact only for many values per channel"
            ]
            if config.variance == "pooled" and any(m["values_per_batch"] is None for m in moments)
            else []
        ),
        "source_model": source_model,
        "versions": {"napari-normcheck": __version__, "torch": torch.__version__},
    }
    result = RecalibrationResult(
        model=(worker if device.type == "cpu" else worker.cpu()).eval(),
        provenance=provenance,
        holdout=holdout,
        calibration_tiles=calibration_tiles,
        holdout_tiles=holdout_tiles,
    )
    yield RecalibrationDone(result)


def recalibrate(
    model: nn.Module, volume: Volume, config: RecalibrationConfig, **kwargs: Any
) -> RecalibrationResult:
    """Run :func:`iter_recalibrate` to the end and return its result (same arguments)."""
    for event in iter_recalibrate(model, volume, config, **kwargs):
        if isinstance(event, RecalibrationDone):
            return event.result
    raise NormcheckError("the recalibration was cancelled")


class _CalibrationState:
    """Per-layer float64 sums of batch statistics, read out of the copy after every batch."""

    def __init__(self, worker: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
        self.worker = worker
        self.layers = layers
        self.momenta = [layer.momentum for _, layer in layers]
        self.sums: list[dict[str, Any]] = [
            {"mean": 0.0, "var": 0.0, "mean_sq": 0.0, "count": None} for _ in layers
        ]
        self.n_batches = 0
        self.hooks = []
        self.factors: list[float] = []
        worker.eval()
        for (_, layer), sums in zip(layers, self.sums):
            # momentum 1: after a forward the running buffers hold exactly this batch's statistics.
            # Scripted layers keep momentum as a constant: their buffers are zeroed before each
            # forward and divided by the momentum afterwards.
            try:
                layer.momentum = 1.0
            except RuntimeError:
                pass
            self.factors.append(1.0 if layer.momentum is None else float(layer.momentum))
            layer.training = True
            if not isinstance(layer, torch.jit.ScriptModule):
                # Values per channel per batch, for the exact pooled variance (hooks need eager code).
                self.hooks.append(layer.register_forward_pre_hook(_count_hook(sums)))

    def forward(self, images: list[np.ndarray], spatial_dims: int, device: torch.device) -> None:
        batch = torch.from_numpy(np.stack(images))
        if spatial_dims == 2:
            batch = batch[:, :, 0]
        with torch.no_grad():
            for _, layer in self.layers:
                layer.running_mean.zero_()
                layer.running_var.zero_()
                tracked = getattr(layer, "num_batches_tracked", None)
                if tracked is not None:
                    tracked.zero_()  # momentum None then weighs this batch by 1 / 1
            # IEEE float32 like the check's forwards (cuDNN convolutions default to TF32 on
            # Ampere and newer GPUs: statistics 1e-3 off).
            with precision_context("fp32", device):
                self.worker(batch.to(device))
        for (_, layer), sums, factor in zip(self.layers, self.sums, self.factors):
            mean = layer.running_mean.detach().double().cpu().numpy() / factor
            var = layer.running_var.detach().double().cpu().numpy() / factor
            sums["mean"] = sums["mean"] + mean
            sums["var"] = sums["var"] + var
            sums["mean_sq"] = sums["mean_sq"] + mean * mean
        self.n_batches += 1

    def finish(self, variance: str) -> list[dict[str, Any]]:
        """Write the averages into the running buffers; returns per-layer summary numbers."""
        k = self.n_batches
        summary = []
        for (name, layer), sums in zip(self.layers, self.sums):
            mean = sums["mean"] / k
            var = sums["var"] / k
            n = sums["count"]
            if variance == "pooled":
                spread = np.maximum(sums["mean_sq"] - k * mean * mean, 0.0)
                if n is None:
                    # Scripted layers hide their input size: the large-n limit (relative error ~1/n).
                    var = var + spread / k
                else:
                    var = ((n - 1) * sums["var"] + n * spread) / (k * n - 1)
            with torch.no_grad():
                layer.running_mean.copy_(torch.from_numpy(mean).to(layer.running_mean.dtype))
                layer.running_var.copy_(torch.from_numpy(var).to(layer.running_var.dtype))
                tracked = getattr(layer, "num_batches_tracked", None)
                if tracked is not None:
                    tracked.fill_(k)
            summary.append(
                {
                    "layer": name,
                    "values_per_batch": n,
                    "mean_abs_running_mean": float(np.abs(mean).mean()),
                    "mean_running_var": float(var.mean()),
                }
            )
        return summary

    def restore(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for (_, layer), momentum in zip(self.layers, self.momenta):
            if layer.momentum != momentum:
                layer.momentum = momentum
            layer.training = False


def _count_hook(sums: dict[str, Any]):
    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        sums["count"] = int(x.numel() // x.shape[1])

    return hook


def _holdout_disparity(
    original: nn.Module,
    recalibrated: nn.Module,
    images: list[np.ndarray],
    config: RecalibrationConfig,
    spatial_dims: int,
    device: torch.device,
) -> Iterator[RecalibrationProgress]:
    """Disparity vs train mode (train batch = ``config.batch_size``) of eval before and after."""
    argmax = config.activation == "softmax"
    sums: dict[str, dict[str, np.ndarray]] = {"before": {}, "after": {}}
    step = config.batch_size
    n_groups = -(-len(images) // step)
    for g in range(n_groups):
        group = images[g * step : (g + 1) * step]
        train = forward_batch(original, group, "train", spatial_dims, device)
        before = forward_batch(original, group, "eval", spatial_dims, device)
        after = forward_batch(recalibrated, group, "eval", spatial_dims, device)
        for k in range(len(group)):
            probs = activate(np.stack([train[k], before[k], after[k]]), config.activation)
            for which, index in (("before", 1), ("after", 2)):
                for kind, value in dice_sums(
                    probs[0], probs[index], config.threshold, argmax
                ).items():
                    sums[which][kind] = sums[which].get(kind, 0.0) + value
        yield RecalibrationProgress("holdout", g + 1, n_groups)
    return {
        "n_tiles": len(images),
        **{
            which: {kind: disparity_from_sums(s) for kind, s in values.items()}
            for which, values in sums.items()
        },
    }
