"""``run --remedies``: the check and its remedies in one run of the tile loop.

The remedies are predictions of the check itself (:mod:`~napari_normcheck.core.remedies.variants`),
so each tile is read once, and the remedies resume, run on a cluster and report progress exactly
as the check does. Recalibration comes first (it needs the run's window and input normalization);
its statistics are stored in OUT's attributes, so a resumed run predicts with the same ones.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.store import OutputStore, check_output_target
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.remedies.recalibrate import RecalibrationResult
from napari_normcheck.core.remedies.remedy_run import (
    RemediesFinished,
    applicable_remedies,
    recalibrate_for,
)
from napari_normcheck.core.remedies.table import (
    assemble_remedies,
    finish_remedies,
    prepare_labels,
    to_plain,
)
from napari_normcheck.core.remedies.variants import (
    RecalibratedVariant,
    check_remedy_names,
    remedy_predictions,
    running_stats_of,
)
from napari_normcheck.core.run.distributed import run_events
from napari_normcheck.core.run.events import RunFinished
from napari_normcheck.core.run.forward import resolve_device
from napari_normcheck.core.run.planning import prepare_run
from napari_normcheck.core.run.predictions import CHECK


def check_with_remedies(
    volume: Volume,
    loaded: Any,
    config: RunConfig,
    out: str | Path,
    *,
    remedies: tuple[str, ...] = (),
    labels: Any = None,
    label_map: str | dict | None = None,
    ignore_labels: tuple[int, ...] = (),
    recalibration: dict[str, Any] | None = None,
    cancel: threading.Event | None = None,
    extra_attrs: dict[str, Any] | None = None,
    resume: bool = False,
    spatial_dims: int | None = None,
    divisor: tuple[int, ...] | int | None = None,
    **run_options: Any,
) -> Iterator[Any]:
    """The check with the remedies' predictions in the same tile loop, then the remedies table.

    Parameters
    ----------
    volume : Volume
        The input.
    loaded : LoadedModel
        From :func:`~napari_normcheck.core.models.models.load_model`; never modified.
    config : RunConfig
        The run's settings.
    out : path-like
        The OUT.zarr.
    remedies : tuple of str
        Any of ``"recalibrated"``, ``"batchstats"``; empty for the check with Dice vs labels.
    labels, label_map, ignore_labels, recalibration
        As for :func:`~napari_normcheck.core.remedies.remedy_run.run_remedies`.
    cancel : threading.Event, optional
        Set it to stop (between recalibration batches or tiles); ``resume`` continues.
    extra_attrs : dict, optional
        More metadata for the store.
    resume : bool
        Continue an interrupted run (its recalibrated statistics are reused).
    spatial_dims, divisor
        As for :func:`~napari_normcheck.core.run.engine.run_check`.
    **run_options
        ``overwrite``, ``scheduler``, ``n_workers``, ``volume_source``, ``trust_pickle``, ... of
        :func:`~napari_normcheck.core.run.distributed.run_events`.

    Yields
    ------
    RecalibrationProgress, RunStarted, TileDone, BlockDone, RunFinished, RemediesFinished
        The check's events with the remedies inside them; ``RemediesFinished`` last.
    """
    t_start = time.perf_counter()
    check_remedy_names(remedies)
    # Before the recalibration, not after it: an OUT that cannot be written fails at once.
    check_output_target(out, overwrite=bool(run_options.get("overwrite")), resume=resume)
    model = loaded.module
    try:
        device = resolve_device(config.device)
    except NormcheckError:  # a cluster's client need not have the workers' GPUs
        device = torch.device("cpu")
    setup = prepare_run(volume, config, spatial_dims=spatial_dims, divisor=divisor, device=device)
    label_volume, mapping, offset = prepare_labels(labels, label_map, setup.plan)
    remedies, notes = applicable_remedies(model, remedies)
    source_model = (extra_attrs or {}).get("model")

    recal_result: RecalibrationResult | None = None
    stored = _stored_recalibration(out) if resume else None
    if "recalibrated" in remedies and stored is not None:
        recal_result = RecalibrationResult(
            RecalibratedVariant(stored["stats"])(model), stored["provenance"], stored["holdout"]
        )
    elif "recalibrated" in remedies:
        recal_result = yield from recalibrate_for(
            model,
            volume,
            setup.plan,
            config,
            setup.transform,
            setup.spatial_dims,
            recalibration=recalibration,
            source_model=source_model,
            device=str(device),
            cancel=cancel,
        )
        if recal_result is None:
            return
    stats = running_stats_of(recal_result.model) if recal_result is not None else None
    attrs = dict(extra_attrs or {})
    if recal_result is not None:
        attrs["recalibration"] = json.loads(
            json.dumps(
                {
                    "stats": stats,
                    "provenance": recal_result.provenance,
                    "holdout": recal_result.holdout,
                },
                default=to_plain,
            )
        )
    predictions = CHECK + remedy_predictions(remedies, stats)
    finished = None
    for event in run_events(
        volume,
        loaded,
        config,
        out,
        cancel=cancel,
        extra_attrs=attrs,
        resume=resume,
        spatial_dims=setup.spatial_dims,
        divisor=divisor,
        transform=setup.transform,
        predictions=predictions,
        **run_options,
    ):
        if isinstance(event, RunFinished):
            finished = event
        yield event
    if finished is None:
        return
    store = OutputStore(finished.out, finished.out)
    summary = finished.summary
    result = assemble_remedies(summary, summary.get("predictions", {}), recal_result)
    finish_remedies(store, result, label_volume, mapping, offset, ignore_labels, config, notes)
    result["seconds"] = round(time.perf_counter() - t_start, 3)
    result = json.loads(json.dumps(result, default=to_plain))
    store.root.attrs["normcheck"] = dict(store.root.attrs["normcheck"]) | {"remedies": result}
    yield RemediesFinished(finished.out, result, recal_result)


def _stored_recalibration(out: str | Path) -> dict[str, Any] | None:
    """The recalibration an interrupted run of ``out`` stored, if any."""
    target = Path(out)
    for path in (target.with_name(target.name + ".inprogress"), target):
        try:
            attrs = zarr.open_group(str(path), mode="r").attrs["normcheck"]
        except Exception:  # noqa: BLE001 (no store there, or not ours)
            continue
        return attrs.get("recalibration")
    return None
