"""The output steps every run shares, single-process or distributed: open OUT, finish OUT.

:func:`open_outputs` creates OUT.zarr with the registry's outputs of the run's predictions (or
reopens an interrupted run's); :func:`finish_run` writes the per-tile grids, the summary and, last,
the completion marker. The plan is fixed before them (:mod:`~napari_normcheck.core.run.planning`). Both
:func:`~napari_normcheck.core.run.engine.run_check` and
:func:`~napari_normcheck.core.run.distributed.run_check_distributed` call them, so their outputs share
one layout and one summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_normcheck import __version__
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.tiling import TilePlan
from napari_normcheck.core.io.lock import OutLock
from napari_normcheck.core.io.pyramid import Pyramid, n_levels
from napari_normcheck.core.io.store import OutputStore, check_output_target
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.run.grids import (
    add_pair_metrics,
    add_support,
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
from napari_normcheck.core.run.report import verdict, verdict_detail
from napari_normcheck.core.run.runsetup import RunSetup
from napari_normcheck.core.run.sums import RunSums
from napari_normcheck.core.run.support_summary import (
    min_foreground_of,
    predictions_are_probabilities,
    run_support,
)

if TYPE_CHECKING:
    from napari_normcheck.core.run.timing import Timing


#: RunConfig fields that change how fast a run goes, never what it writes (not stored in params).
MACHINE_SETTINGS = ("threads",)


def run_attrs(
    volume: Volume,
    config: RunConfig,
    setup: RunSetup,
    extra_attrs: dict[str, Any] | None,
    device_name: str | None = None,
    predictions: tuple[str, ...] = ("eval", "train"),
) -> dict[str, Any]:
    """The root ``normcheck`` metadata of OUT.zarr (parameters, plan, intensity, source, ...).

    ``predictions`` beyond the check's two (the remedies') are recorded: a resumed run must make
    the same ones.
    """
    extra = {} if predictions == ("eval", "train") else {"predictions": list(predictions)}
    # How many CPU threads ran it is no parameter of the results: a resume may use others.
    params = {k: v for k, v in config.to_dict().items() if k not in MACHINE_SETTINGS}
    return {
        "version": __version__,
        "params": params
        | {"eval_batch": setup.eval_batch, "device": device_name or str(setup.device)},
        "plan": setup.plan.to_dict(),
        "intensity": setup.transform.to_dict(),
        "spatial_dims": setup.spatial_dims,
        "source": volume.source,
        "complete": False,
        **extra,
        **(extra_attrs or {}),
    }


RESUME_SAME = ("params", "plan", "intensity", "source", "predictions")


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

    The store holds the run's lock on OUT (:class:`~napari_normcheck.core.io.lock.OutLock`);
    release it with ``store.release_lock()`` when the run stops writing.

    Returns
    -------
    store : OutputStore
    arrays : dict
        Every level of each voxel output, by group name (see
        :func:`~napari_normcheck.core.run.registry.voxel_outputs`).
    """
    # Checked first, writing nothing: a missing folder is said as such, not as a failed lock.
    check_output_target(out, overwrite=overwrite, resume=resume)
    lock = OutLock.acquire(out)  # held until the run stops writing (store.release_lock)
    try:
        if resume:
            store = OutputStore.reopen(out, attrs, same=RESUME_SAME)
            arrays = output_arrays(store, predictions, config)
        else:
            store = OutputStore.create(out, overwrite=overwrite, attrs=attrs)
            arrays = create_voxel_outputs(store, config, setup, volume, predictions)
    except BaseException:
        lock.release()
        raise
    store.lock = lock
    return store, arrays


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
    attrs = store.root.attrs["normcheck"]
    min_foreground = min_foreground_of(attrs.get("params"))
    add_support(ordered, mismatch, min_foreground)
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
    summary["support"] = run_support(
        sums.disparity["eval"],
        mismatch,
        int(np.prod(plan.roi_shape)),
        min_foreground,
        probabilities=predictions_are_probabilities(attrs),
    )
    if not summary["support"]["probabilities"]:
        for entry in (summary.get("grid_shift") or {}).values():
            entry["soft_judged"] = [False] * len(entry["soft_judged"])
    summary["verdict_detail"] = verdict_detail(summary)
    summary["verdict"] = verdict(summary)
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
