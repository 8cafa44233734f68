"""What a run fixes before its first tile: the plan, device, eval batch and input normalization.

It also measures how much reduced precision changes the predictions.

:func:`prepare_run` is called by the single-process run, the distributed run and the remedies;
:func:`plan_run_tiles` is pure and cheap (the widget outlines the tiles with it before a run).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import TilePlan, plan_tiles
from napari_normcheck.core.io.intensity import IntensityTransform, resolve_intensity
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.run.forward import (
    measure_precision_effect,
    probe_eval_batch,
    resolve_device,
    run_memory_bytes,
)
from napari_normcheck.core.run.runsetup import RunSetup
from napari_normcheck.core.run.tile_io import read_window

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
    n_predictions: int = 2,
) -> RunSetup:
    """On CUDA without ``--eval-batch``: the largest eval batch that fits, probed once per run.

    The probe leaves room for what the run keeps on the GPU beside the forwards
    (:func:`~napari_normcheck.core.run.forward.run_memory_bytes` of ``n_predictions`` predictions
    of ``setup.n_out`` channels): a batch that took all of it ran out of memory later, in the
    metrics or the writer, where no smaller batch can be tried. A resumed run keeps the batch its
    interrupted run recorded (the parameters must match), so the probe runs only for a new output.
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
        reserve_bytes=run_memory_bytes(
            n_predictions * max(1, setup.n_out),
            setup.plan.window_shape,
            setup.plan.chunk_shape,
            config.cache_mb,
        ),
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
