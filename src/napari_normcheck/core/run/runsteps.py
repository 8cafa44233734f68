"""The steps every run shares, single-process or distributed: fix the plan, open OUT, finish OUT.

:func:`prepare_run` fixes the tile plan, the device, the eval batch and the input normalization;
:func:`open_outputs` creates OUT.zarr (or reopens an interrupted run's); :func:`finish_run` writes
the per-tile grids, the summary and, last, the completion marker. Both
:func:`~napari_normcheck.core.run.engine.run_check` and
:func:`~napari_normcheck.core.run.distributed.run_check_distributed` call them, so their outputs share
one layout and one summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from torch import nn

from napari_normcheck import __version__
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import TilePlan, plan_tiles
from napari_normcheck.core.io.intensity import IntensityTransform, resolve_intensity
from napari_normcheck.core.io.pyramid import Pyramid, n_levels
from napari_normcheck.core.io.store import OutputStore
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.run.forward import (
    measure_precision_effect,
    probe_eval_batch,
    resolve_device,
)
from napari_normcheck.core.run.grids import (
    add_pair_metrics,
    tile_cell_transform,
    write_feature_grid,
    write_tile_grids,
)
from napari_normcheck.core.run.registry import (
    VOXEL_OUTPUTS,
    prediction_group,
    tile_metrics_of,
    voxel_outputs,
)
from napari_normcheck.core.run.runsetup import RunSetup
from napari_normcheck.core.run.sums import RunSums
from napari_normcheck.core.run.tile_io import read_window

if TYPE_CHECKING:
    from napari_normcheck.core.run.timing import Timing

DEFAULT_TILE_3D = (64, 128, 128)
DEFAULT_TILE_2D = (1, 256, 256)
# The largest eval batch the CUDA probe tries: beyond it the GPU is busy anyway.
EVAL_BATCH_LIMIT = 32


def default_tile(
    spatial_shape: tuple[int, int, int], spatial_dims: int, divisor: tuple[int, ...] | int = 16
) -> tuple[int, int, int]:
    """A tile that fits the volume (rounded up to the model's divisor) and is not larger than typical.

    Parameters
    ----------
    spatial_shape : tuple of int
        Volume shape ``(Z, Y, X)``.
    spatial_dims : int
        2 or 3.
    divisor : int or tuple of int
        The model's downsampling factor per spatial axis.

    Returns
    -------
    tuple of int
        ``(z, y, x)``; ``z = 1`` for a 2D model.
    """
    target = DEFAULT_TILE_2D if spatial_dims == 2 else DEFAULT_TILE_3D
    divs = (divisor,) * spatial_dims if isinstance(divisor, int) else tuple(divisor)
    divs = (1,) * (3 - len(divs)) + divs
    tile = []
    for size, want, d in zip(spatial_shape, target, divs):
        fit = -(-size // d) * d
        tile.append(max(d, min(want - want % d or d, fit)))
    if spatial_dims == 2:
        tile[0] = 1
    return tuple(tile)  # type: ignore[return-value]


def check_tile(
    window_shape: tuple[int, int, int], spatial_dims: int, divisor: tuple[int, ...] | int | None
) -> None:
    """Check what needs no model: a 2D model's window has ``z = 1``.

    Whether the model takes the window is decided by one forward of it before the first tile
    (:func:`~napari_normcheck.core.models.tilefit.check_window`): ``divisor`` is advice, never a reason
    to refuse a window that works.
    """
    if spatial_dims == 2 and window_shape[0] != 1:
        raise NormcheckError(
            f"a 2D model runs plane by plane: the tile's z size must be 1, not {window_shape[0]} "
            f"(use --tile 1,{window_shape[1]},{window_shape[2]})"
        )


def prepare_run(
    volume: Volume,
    config: RunConfig,
    *,
    spatial_dims: int | None = None,
    divisor: tuple[int, ...] | int | None = None,
    transform: IntensityTransform | None = None,
    device: torch.device | None = None,
) -> RunSetup:
    """Fix the plan, the device, the eval batch and the intensity transform of a run.

    Parameters
    ----------
    volume : Volume
        The input.
    config : RunConfig
        The run's settings.
    spatial_dims : int, optional
        2 or 3; defaults to ``config.spatial_dims``, then 3.
    divisor : int or tuple of int, optional
        The model's downsampling factor; tiles are checked against it.
    transform : IntensityTransform, optional
        Input normalization; resolved from ``config.normalize`` when not given.
    device : torch.device, optional
        Where the forwards run; resolved from ``config.device`` when not given.

    Returns
    -------
    RunSetup
    """
    spatial_dims = spatial_dims or config.spatial_dims or 3
    if spatial_dims not in (2, 3):
        raise NormcheckError(f"spatial dims must be 2 or 3, not {spatial_dims}")
    device = device or resolve_device(config.device)
    # On CUDA the engine then probes the largest batch that fits (resolve_eval_batch).
    eval_batch = config.eval_batch or (4 if device.type == "cuda" else 1)
    plan = plan_run_tiles(volume.spatial_shape, config, spatial_dims, divisor)
    if transform is None:
        transform = resolve_intensity(config.normalize, volume.data)
    return RunSetup(plan, spatial_dims, device, eval_batch, transform)


def plan_run_tiles(
    spatial_shape: tuple[int, int, int],
    config: RunConfig,
    spatial_dims: int,
    divisor: tuple[int, ...] | int | None = None,
) -> TilePlan:
    """The tile plan a run of ``config`` makes on a volume of ``spatial_shape`` (checked tiles).

    Pure and cheap: the widget outlines the tiles with it before the run starts.

    Raises
    ------
    NormcheckError
        When the model's input window is not divisible by its downsampling factor.
    """
    tile_shape = config.tile or default_tile(spatial_shape, spatial_dims, divisor or 16)
    halo = config.halo if config.blend == "crop" else (0, 0, 0)
    if spatial_dims == 2:
        halo = (0, *halo[1:])
    plan = plan_tiles(
        spatial_shape,
        tile_shape,
        overlap=config.overlap,
        blend=config.blend,  # type: ignore[arg-type]
        halo=halo,
        roi=config.roi,
    )
    check_tile(plan.window_shape, spatial_dims, divisor)
    return plan


def resolve_eval_batch(
    setup: RunSetup,
    model: nn.Module,
    volume: Volume,
    config: RunConfig,
    out: str | Path,
    *,
    resume: bool,
) -> RunSetup:
    """On CUDA without ``--eval-batch``: the largest eval batch that fits, probed once per run.

    A resumed run keeps the batch its interrupted run recorded (the parameters must match), so the
    probe runs only for a new output.
    """
    if config.eval_batch is not None or setup.device.type != "cuda":
        return setup
    recorded = _recorded_eval_batch(out) if resume else None
    eval_batch = recorded or probe_eval_batch(
        model,
        volume.n_channels,
        setup.plan.window_shape,
        setup.spatial_dims,
        setup.device,
        precision=config.precision,
        limit=min(EVAL_BATCH_LIMIT, setup.plan.n_tiles),
    )
    return dataclasses.replace(setup, eval_batch=eval_batch)


def _recorded_eval_batch(out: str | Path) -> int | None:
    target = Path(out)
    for path in (target.with_name(target.name + ".inprogress"), target):
        with contextlib.suppress(Exception):
            attrs = zarr.open_group(str(path), mode="r").attrs["normcheck"]
            return int(attrs["params"]["eval_batch"])
    return None


def precision_effect(
    model: nn.Module, volume: Volume, config: RunConfig, setup: RunSetup, n_tiles: int = 4
) -> dict[str, Any] | None:
    """How much reduced precision changes the predictions, on tiles spread over the plan.

    Returns ``None`` for fp32; otherwise ``{"precision", "tiles", "eval", "train"}`` where the
    modes hold ``1 - Dice`` per channel of the reduced-precision prediction against fp32.
    """
    if config.precision == "fp32":
        return None
    plan = setup.plan
    indices = sorted({int(i) for i in np.linspace(0, plan.n_tiles - 1, min(n_tiles, plan.n_tiles))})
    images = [read_window(volume, plan, plan.get_tile(i), setup.transform) for i in indices]
    effect = measure_precision_effect(
        model,
        images,
        setup.spatial_dims,
        setup.device,
        config.precision,
        config.activation,
        config.threshold,
    )
    return {"precision": config.precision, "tiles": indices, **effect}


def run_attrs(
    volume: Volume,
    config: RunConfig,
    setup: RunSetup,
    extra_attrs: dict[str, Any] | None,
    device_name: str | None = None,
) -> dict[str, Any]:
    """The root ``normcheck`` metadata of OUT.zarr (parameters, plan, intensity, source, ...)."""
    return {
        "version": __version__,
        "params": config.to_dict()
        | {"eval_batch": setup.eval_batch, "device": device_name or str(setup.device)},
        "plan": setup.plan.to_dict(),
        "intensity": setup.transform.to_dict(),
        "spatial_dims": setup.spatial_dims,
        "source": volume.source,
        "complete": False,
        **(extra_attrs or {}),
    }


RESUME_SAME = ("params", "plan", "intensity", "source")


def open_outputs(
    out: str | Path,
    attrs: dict[str, Any],
    config: RunConfig,
    setup: RunSetup,
    volume: Volume,
    predictions: tuple[str, ...],
    *,
    overwrite: bool,
    resume: bool,
) -> tuple[OutputStore, dict[str, Any]]:
    """Create OUT.zarr with the voxel outputs of ``predictions``, or reopen an interrupted run's.

    Returns
    -------
    store : OutputStore
    arrays : dict
        Every level of each voxel output, by group name (see
        :func:`~napari_normcheck.core.run.registry.voxel_outputs`).
    """
    if resume:
        store = OutputStore.reopen(out, attrs, same=RESUME_SAME)
        return store, output_arrays(store, predictions, config)
    store = OutputStore.create(out, overwrite=overwrite, attrs=attrs)
    return store, create_voxel_outputs(store, config, setup, volume, predictions)


def output_arrays(
    store: OutputStore, predictions: tuple[str, ...], config: RunConfig
) -> dict[str, Pyramid]:
    """The voxel outputs of ``predictions`` in an existing store (every level), by group name."""
    return {
        o.name: store.pyramid(o.name)
        for o in voxel_outputs(predictions, config)
        if o.name in store.root
    }


def finish_run(
    store: OutputStore,
    volume: Volume,
    setup: RunSetup,
    sums: RunSums,
    *,
    out: str | Path,
    timing: Timing,
    before_marker: Callable[[], None] | None = None,
    extra_summary: dict[str, Any] | None = None,
    run_started: float | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write the tile grids, the summary and, last, the completion marker.

    Parameters
    ----------
    store : OutputStore
        The run's store.
    volume : Volume
        The input (placement of the tile grids).
    setup : RunSetup
        The plan, eval batch and output channels.
    sums : RunSums
        Records and sums of every tile, chunk and tile pair.
    out : path-like
        The OUT the user named (the summary's ``out``).
    timing : Timing
        Seconds per stage; ``total`` is set here.
    before_marker : callable, optional
        Called just before the marker is written (to flush pending writes).
    extra_summary : dict, optional
        More summary keys.
    run_started : float, optional
        ``time.perf_counter()`` when the run started: then ``timing.finish`` and ``timing.total``
        are set here (a distributed run sets its own total).

    Returns
    -------
    path : Path
        Where OUT now is.
    summary : dict
        What the marker holds.
    """
    t_finish = time.perf_counter()
    plan, n_out, mismatch = setup.plan, setup.n_out, sums.mismatch
    ordered = [sums.records[i] for i in sorted(sums.records)]
    add_pair_metrics(ordered, mismatch)
    cell_transform = tile_cell_transform(plan, tuple(volume.scale), volume.translation)
    metrics = tile_metrics_of(mismatch.names)
    write_tile_grids(store, plan, ordered, n_out, cell_transform, metrics)
    write_feature_grid(store, plan, ordered, sums.feature_layers, cell_transform)
    global_mismatch = mismatch.result()
    if run_started is not None:
        now = time.perf_counter()
        timing.finish += now - t_finish
        timing.total = now - run_started
    summary = {
        "out": str(out),
        "n_tiles": plan.n_tiles,
        "timing": timing.to_dict(),
        "spilled_chunks": sums.spilled_chunks,
        "eval_batch": setup.eval_batch,
        "disparity": sums.disparity["eval"].result(),
        "disparity_sums": sums.disparity["eval"].to_dict(),
        "mismatch_eval": global_mismatch["eval"],
        "mismatch_train": global_mismatch["train"],
        "n_tile_pairs": mismatch.n_pairs,
        **out_size(store, plan, n_out),
        "tiles": ordered,
        **(extra_summary or {}),
    }
    others = [name for name in mismatch.names if name not in ("eval", "train")]
    if others:
        # The remedies' predictions, as measured in the same tile loop.
        summary["predictions"] = {
            name: {
                "prediction": prediction_group(name),
                "disparity_vs_train": sums.disparity[name].result(),
                "mismatch": global_mismatch[name],
            }
            for name in others
        }
    store.root.attrs["normcheck"] = dict(store.root.attrs["normcheck"]) | {"complete": True}
    if before_marker is not None:
        before_marker()
    return store.finish(summary), summary


def create_voxel_outputs(
    store: OutputStore,
    config: RunConfig,
    setup: RunSetup,
    volume: Volume,
    predictions: tuple[str, ...],
    *,
    attrs: dict[str, Any] | None = None,
) -> dict[str, Pyramid]:
    """The registry's voxel outputs of ``predictions`` as images, chunked along the tile grid.

    They are multiscale (:mod:`~napari_normcheck.core.io.pyramid`) when the ROI is wider than
    ``config.pyramid_side``; the seams, written pair by pair, have level 0 only. ``attrs`` are
    added to every group's attributes.
    """
    plan = setup.plan
    scale = tuple(volume.scale)
    translation = tuple(t + r * s for t, r, s in zip(volume.translation, plan.roi_start, scale))
    out_shape = (setup.n_out, *plan.roi_shape)
    out_chunks = (1, *plan.chunk_shape)
    levels = (
        n_levels(out_shape[-2:], out_chunks[-2:], config.pyramid_side)
        if config.pyramid_side > 0
        else 0
    )
    arrays = {}
    for output in voxel_outputs(predictions, config):
        prediction = output.name.removeprefix("pred_") if output.name.startswith("pred_") else None
        described = (
            {"mode": prediction, "activation": config.activation, "train_batch": config.train_batch}
            if prediction
            else {"meaning": output.meaning}
        )
        store.create_image(
            output.name,
            out_shape,
            out_chunks,
            config.output_dtype,
            scale,
            translation,
            attrs=described | (attrs or {}),
            levels=levels if output.pyramid else 0,
        )
        arrays[output.name] = store.pyramid(output.name)
    return arrays


def out_size(store: OutputStore, plan: TilePlan, n_out: int) -> dict[str, float]:
    """Uncompressed bytes the voxel outputs (every level) hold per input voxel of the ROI."""
    n_bytes = 0
    for output in VOXEL_OUTPUTS:
        if output.name in store.root:
            for array in store.pyramid(output.name).arrays:
                n_bytes += int(np.prod(array.shape)) * array.dtype.itemsize
    per_voxel = n_bytes / int(np.prod(plan.roi_shape))
    return {
        "out_bytes_per_voxel": round(per_voxel, 3),
        "out_bytes_per_voxel_channel": round(per_voxel / n_out, 3),
    }
