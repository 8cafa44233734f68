"""Try the remedies: predict each over the check's tiles in the one tile loop, and compare.

Two ways in, one tile loop (:class:`~napari_normcheck.core.run.tileloop.TileLoop`):

- :func:`~napari_normcheck.core.remedies.check_remedies.check_with_remedies` (``run --remedies``):
  the remedies are predictions of the check itself, so they resume and run on a cluster with it;
- :func:`run_remedies` (the widget's Remedies tab): on a finished check's OUT.zarr, the remedies'
  predictions only, compared with the stored train-mode prediction as stored.

Each remedy is a named prediction (:mod:`~napari_normcheck.core.remedies.variants`): a recalibrated
copy of the model (:mod:`~napari_normcheck.core.remedies.recalibrate`), or eval with per-tile batch
statistics (:mod:`~napari_normcheck.core.remedies.batchstats`). Per remedy this measures the
disparity against the train-mode prediction (chunk by chunk), the tile mismatch and, with labels,
the Dice against ground truth (also of the eval and train predictions). Every number is reported as
measured: a remedy that lowers disparity may still lower Dice against ground truth, and the notes say
so.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
from torch import nn

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import running_stats_layers
from napari_normcheck.core.base.tiling import TilePlan, plan_tiles
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.store import OutputStore, is_complete, read_marker
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.remedies.recalibrate import (
    RecalibrationConfig,
    RecalibrationDone,
    RecalibrationResult,
    iter_recalibrate,
)
from napari_normcheck.core.remedies.table import (
    assemble_remedies,
    finish_remedies,
    prepare_labels,
    to_plain,
)
from napari_normcheck.core.remedies.variants import (
    REMEDIES,
    check_remedy_names,
    remedy_predictions,
    running_stats_of,
)
from napari_normcheck.core.run.forward import resolve_device
from napari_normcheck.core.run.predictions import bind_predictions
from napari_normcheck.core.run.registry import prediction_group
from napari_normcheck.core.run.runsetup import RunSetup
from napari_normcheck.core.run.runsteps import create_voxel_outputs
from napari_normcheck.core.run.tileloop import TileLoop
from napari_normcheck.core.run.timing import Timing


@dataclass(frozen=True)
class RemediesStarted:
    """The remedy models are ready and their outputs exist in the store."""

    out: Path
    remedies: tuple[str, ...]
    n_tiles: int


@dataclass(frozen=True)
class RemedyTileDone:
    """A tile was predicted by every remedy and stitched."""

    n_done: int
    n_total: int
    elapsed: float


@dataclass(frozen=True)
class RemediesFinished:
    """Emitted last; ``remedies`` is what the store's attributes now hold."""

    out: Path
    remedies: dict[str, Any]
    recalibration: RecalibrationResult | None


@dataclass(frozen=True)
class StoredRun:
    """What a finished check left in its OUT.zarr that the remedies need."""

    config: RunConfig
    plan: TilePlan
    transform: IntensityTransform
    spatial_dims: int
    summary: dict[str, Any]
    attrs: dict[str, Any]


def read_stored_run(out: str | Path) -> StoredRun:
    """Read plan, parameters, intensity transform and summary of a complete OUT.zarr.

    Raises
    ------
    NormcheckError
        When ``out`` is not a complete napari-normcheck output.
    """
    out = Path(out)
    if not is_complete(out):
        raise NormcheckError(
            f"{out} is not a finished napari-normcheck output; run the check to the end first"
        )
    attrs = dict(zarr.open_group(str(out), mode="r").attrs["normcheck"])
    stored = attrs["plan"]
    plan = plan_tiles(
        tuple(stored["volume_shape"]),
        tuple(stored["tile"]),
        overlap=stored["overlap"],
        blend=stored["blend"],
        halo=tuple(stored["halo"]),
        roi=tuple(zip(stored["roi_start"], stored["roi_stop"])),
    )
    return StoredRun(
        config=RunConfig.from_dict(attrs["params"]),
        plan=plan,
        transform=IntensityTransform.from_dict(attrs["intensity"]),
        spatial_dims=int(attrs.get("spatial_dims", 3)),
        summary=read_marker(out),
        attrs=attrs,
    )


def applicable_remedies(
    model: nn.Module, remedies: tuple[str, ...]
) -> tuple[tuple[str, ...], list]:
    """The remedies that can change anything, and a note when none can."""
    if remedies and not running_stats_layers(model):
        # Nothing switches statistics: eval already is train mode, and both remedies equal it.
        return (), [
            "the model has no normalization layers with running statistics: eval and train mode "
            "agree and there is nothing to remedy"
        ]
    return tuple(remedies), []


def recalibrate_for(
    model: nn.Module,
    volume: Volume,
    plan: TilePlan,
    config: RunConfig,
    transform: IntensityTransform,
    spatial_dims: int,
    *,
    recalibration: dict[str, Any] | None = None,
    source_model: dict[str, Any] | None = None,
    device: str | None = None,
    cancel: threading.Event | None = None,
) -> Generator[Any, None, RecalibrationResult | None]:
    """Recalibrate a copy of ``model`` with the run's window, batch and ROI.

    A generator of progress events (``recal = yield from recalibrate_for(...)``) that returns the
    result, or ``None`` when cancelled.
    """
    settings = {
        "tile": plan.window_shape,
        "batch_size": config.train_batch,
        "roi": tuple(zip(plan.roi_start, plan.roi_stop)),
        "activation": config.activation,
        "threshold": config.threshold,
        "device": device or config.device,
        **(recalibration or {}),
    }
    for event in iter_recalibrate(
        model,
        volume,
        RecalibrationConfig(**settings),
        transform=transform,
        spatial_dims=spatial_dims,
        source_model=source_model,
        cancel=cancel,
    ):
        if isinstance(event, RecalibrationDone):
            return event.result
        yield event
    return None


def run_remedies(
    out: str | Path,
    volume: Volume,
    model: nn.Module,
    *,
    remedies: tuple[str, ...] = REMEDIES,
    labels: Any = None,
    label_map: str | dict | None = None,
    ignore_labels: tuple[int, ...] = (),
    recalibration: dict[str, Any] | None = None,
    recalibrated: RecalibrationResult | None = None,
    device: str | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[Any]:
    """Predict each remedy over a finished check's tiles, write its prediction to OUT and compare.

    Parameters
    ----------
    out : path-like
        A complete OUT.zarr of :func:`~napari_normcheck.core.run.engine.run_check`.
    volume : Volume
        The volume of that run.
    model : torch.nn.Module
        The model of that run; never modified.
    remedies : tuple of str
        Any of ``"recalibrated"``, ``"batchstats"``; empty to compute only Dice vs labels.
    labels : path, array or Volume, optional
        Ground-truth labels on the input's voxel grid (or of the ROI's shape).
    label_map : str or dict, optional
        Label value(s) -> output channel (see :func:`~napari_normcheck.core.measure.labels.parse_label_map`).
    ignore_labels : tuple of int
        Label values outside the labelled region.
    recalibration : dict, optional
        :class:`~napari_normcheck.core.remedies.recalibrate.RecalibrationConfig` fields to change (``n_tiles``,
        ``variance``, ``mask_below``, ...); tile, batch size and ROI default to the run's.
    recalibrated : RecalibrationResult, optional
        Use this recalibrated model instead of computing one.
    device : str, optional
        Defaults to the run's device.
    cancel : threading.Event, optional
        Set it to stop between tiles; the store keeps the run's own results.

    Yields
    ------
    RecalibrationProgress, RemediesStarted, RemedyTileDone, RemediesFinished
        Progress events; the last holds the ``remedies`` dictionary.
    """
    t_start = time.perf_counter()
    out = Path(out)
    run = read_stored_run(out)
    plan, config = run.plan, run.config
    check_remedy_names(remedies)
    if tuple(volume.spatial_shape) != tuple(plan.volume_shape):
        raise NormcheckError(
            f"the volume has shape {volume.spatial_shape} but {out} was computed on "
            f"{tuple(plan.volume_shape)}; give the volume of that run"
        )
    label_volume, mapping, offset = prepare_labels(labels, label_map, plan)
    remedies, notes = applicable_remedies(model, remedies)
    device_ = resolve_device(device or config.device)

    recal_result = recalibrated
    if "recalibrated" in remedies and recal_result is None:
        recal_result = yield from recalibrate_for(
            model,
            volume,
            plan,
            config,
            run.transform,
            run.spatial_dims,
            recalibration=recalibration,
            source_model=run.attrs.get("model"),
            device=str(device_),
            cancel=cancel,
        )
        if recal_result is None:
            return
    stats = running_stats_of(recal_result.model) if recal_result is not None else None
    predictions = remedy_predictions(remedies, stats)

    store = OutputStore(out, out)
    # Results of an earlier remedies pass no longer describe the predictions about to be replaced.
    attrs = dict(store.root.attrs["normcheck"])
    if attrs.pop("remedies", None) is not None:
        store.root.attrs["normcheck"] = attrs
    n_out = int(store.array("pred_eval").shape[0])
    eval_batch = config.eval_batch or 1
    setup = RunSetup(plan, run.spatial_dims, device_, eval_batch, run.transform, n_out)
    names = tuple(p.name for p in predictions)
    tiles = plan.tiles() if predictions else []
    measured: dict[str, Any] = {}
    if predictions:
        worker = model if device_.type == "cpu" else _on_device(model, device_)
        arrays = create_voxel_outputs(store, config, setup, volume, names)
        loop = TileLoop(
            volume,
            setup,
            config,
            bind_predictions(worker, predictions, config),
            arrays,
            Timing(),
            out / ".scratch-remedies",
            reference=store.pyramid(prediction_group("train")),
        )
        yield RemediesStarted(out, names, len(tiles))
        try:
            with contextlib.closing(loop.run(tiles)) as results:
                for n_done, _ in enumerate(results, start=1):
                    yield RemedyTileDone(n_done, len(tiles), time.perf_counter() - t_start)
                    if cancel is not None and cancel.is_set():
                        return
            loop.flush()
        finally:
            loop.close()
        mismatch = loop.mismatch.result()
        measured = {
            name: {
                "prediction": prediction_group(name),
                "disparity_vs_train": loop.disparity[name].result(),
                "mismatch": mismatch[name],
            }
            for name in names
        }
    else:
        yield RemediesStarted(out, (), 0)
    result = assemble_remedies(run.summary, measured, recal_result)
    finish_remedies(store, result, label_volume, mapping, offset, ignore_labels, config, notes)
    result["seconds"] = round(time.perf_counter() - t_start, 3)
    result = json.loads(json.dumps(result, default=to_plain))
    store.root.attrs["normcheck"] = dict(store.root.attrs["normcheck"]) | {"remedies": result}
    yield RemediesFinished(out, result, recal_result)


def _on_device(model: nn.Module, device: Any) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device)
