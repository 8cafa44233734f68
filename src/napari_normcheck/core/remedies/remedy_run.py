"""Try the remedies on a finished check: predict with each over the same tiles and compare.

Given an OUT.zarr written by :func:`~napari_normcheck.core.run.engine.run_check`, the model and the volume,
:func:`run_remedies` reads the run's plan, parameters and intensity transform from the store, builds
each remedy (a recalibrated copy of the model, see :mod:`~napari_normcheck.core.remedies.recalibrate`; eval with
per-tile batch statistics, see :mod:`~napari_normcheck.core.remedies.batchstats`), predicts the same tiles with
the same blending, writes ``pred_recalibrated`` / ``pred_batchstats`` beside ``pred_eval``, and measures
per remedy the disparity against the stored train-mode prediction (chunk by chunk), the tile mismatch,
and, with labels, the Dice against ground truth (also of the eval and train predictions).

Every number is reported as measured: a remedy that lowers disparity may still lower Dice against
ground truth, and the notes say so.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from torch import nn

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import running_stats_layers
from napari_normcheck.core.base.tiling import TilePlan, plan_tiles
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.store import OutputStore, is_complete, read_marker
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.measure.labels import (
    LabelDice,
    dice_of_stored,
    label_box,
    open_labels,
    parse_label_map,
    read_labels,
    stored_probabilities,
)
from napari_normcheck.core.measure.metrics import DisparityAccumulator
from napari_normcheck.core.measure.mismatch import MismatchTracker, prediction_box
from napari_normcheck.core.remedies.batchstats import batch_stats_copy
from napari_normcheck.core.remedies.recalibrate import (
    RecalibrationConfig,
    RecalibrationDone,
    RecalibrationResult,
    iter_recalibrate,
)
from napari_normcheck.core.run.forward import (
    activate,
    forward_batch,
    resolve_device,
    to_output_dtype,
)
from napari_normcheck.core.run.stitch import ChunkAccumulator, importance_map
from napari_normcheck.core.run.tile_io import read_window

REMEDIES = ("recalibrated", "batchstats")
ROWS = ("eval", "train", "recalibrated", "batchstats")
ROW_TITLES = {
    "eval": "eval",
    "train": "train",
    "recalibrated": "recalibrated eval",
    "batchstats": "batch-stats eval",
}
PREDICTION_NAMES = {
    "eval": "pred_eval",
    "train": "pred_train",
    "recalibrated": "pred_recalibrated",
    "batchstats": "pred_batchstats",
}


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
    """Predict each remedy over the run's tiles, write its prediction to OUT and compare.

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
    unknown = [r for r in remedies if r not in REMEDIES]
    if unknown:
        raise NormcheckError(f"unknown remedy {unknown[0]!r}; use {', '.join(REMEDIES)}")
    if tuple(volume.spatial_shape) != tuple(plan.volume_shape):
        raise NormcheckError(
            f"the volume has shape {volume.spatial_shape} but {out} was computed on "
            f"{tuple(plan.volume_shape)}; give the volume of that run"
        )
    label_volume, mapping, offset = _prepare_labels(labels, label_map, plan)
    notes = []
    if remedies and not running_stats_layers(model):
        # Nothing switches statistics: eval already is train mode, and both remedies equal it.
        notes.append(
            "the model has no normalization layers with running statistics: eval and train mode "
            "agree and there is nothing to remedy"
        )
        remedies = ()
    device_ = resolve_device(device or config.device)
    argmax = config.activation == "softmax"

    recal_result = recalibrated
    if "recalibrated" in remedies and recal_result is None:
        settings = {
            "tile": plan.window_shape,
            "batch_size": config.train_batch,
            "roi": tuple(zip(plan.roi_start, plan.roi_stop)),
            "activation": config.activation,
            "threshold": config.threshold,
            "device": str(device_),
            **(recalibration or {}),
        }
        for event in iter_recalibrate(
            model,
            volume,
            RecalibrationConfig(**settings),
            transform=run.transform,
            spatial_dims=run.spatial_dims,
            source_model=run.attrs.get("model"),
            cancel=cancel,
        ):
            if isinstance(event, RecalibrationDone):
                recal_result = event.result
            else:
                yield event
        if recal_result is None:
            return
    models = {}
    for remedy in remedies:
        worker = recal_result.model if remedy == "recalibrated" else batch_stats_copy(model)
        models[remedy] = worker if device_.type == "cpu" else copy.deepcopy(worker).to(device_)

    store = OutputStore(out, out)
    # Results of an earlier remedies pass no longer describe the predictions about to be replaced.
    attrs = dict(store.root.attrs["normcheck"])
    if attrs.pop("remedies", None) is not None:
        store.root.attrs["normcheck"] = attrs
    reference = store.array("pred_eval")
    n_out = int(reference.shape[0])
    arrays = {
        remedy: _create_like(store, PREDICTION_NAMES[remedy], remedy, config) for remedy in remedies
    }
    train_array = store.array("pred_train")
    disparity = {r: DisparityAccumulator(n_out, config.threshold, argmax) for r in remedies}
    mismatch = {r: MismatchTracker(plan, n_out, config.threshold) for r in remedies}
    label_dice = {
        r: LabelDice(mapping, n_out, config.threshold, argmax, tuple(ignore_labels))
        for r in remedies
        if label_volume is not None
    }

    def on_chunk(_chunk: Any, slices: tuple[slice, ...], values: np.ndarray) -> None:
        stacked = values.reshape(len(remedies), n_out, *values.shape[1:])
        box = (slice(None), *slices)
        train = stored_probabilities(np.asarray(train_array[box]))
        truth = read_labels(label_volume, offset, slices) if label_volume is not None else None
        for k, remedy in enumerate(remedies):
            stored = to_output_dtype(
                activate(stacked[k][None], config.activation)[0], config.output_dtype
            )
            arrays[remedy][box] = stored
            # Compared as stored, exactly as the eval and train predictions are.
            probabilities = stored_probabilities(stored)
            disparity[remedy].add(train, probabilities)
            if truth is not None:
                label_dice[remedy].add(probabilities, truth)

    accumulator = ChunkAccumulator(
        plan,
        len(remedies) * n_out,
        importance_map(plan.window_shape, plan.blend, run.spatial_dims),
        on_chunk,
        out / ".scratch-remedies",
        max_bytes=config.cache_mb * 2**20,
    )
    eval_batch = config.eval_batch or 1
    tiles = plan.tiles() if remedies else []
    yield RemediesStarted(out, tuple(remedies), len(tiles))
    try:
        for first in range(0, len(tiles), eval_batch):
            group = tiles[first : first + eval_batch]
            images = [read_window(volume, plan, tile, run.transform) for tile in group]
            outputs = {
                r: forward_batch(models[r], images, "eval", run.spatial_dims, device_)
                for r in remedies
            }
            for k, tile in enumerate(group):
                _add_mismatch(
                    plan,
                    tile,
                    [outputs[r][k] for r in remedies],
                    remedies,
                    mismatch,
                    config.activation,
                )
                accumulator.add(tile, np.concatenate([outputs[r][k] for r in remedies]))
                yield RemedyTileDone(first + k + 1, len(tiles), time.perf_counter() - t_start)
            if cancel is not None and cancel.is_set():
                return
    finally:
        accumulator.close()

    result = _assemble(run, remedies, disparity, mismatch, label_dice, recal_result)
    if label_volume is not None:
        for row in ("eval", "train"):
            result[row]["dice_vs_labels"] = dice_of_stored(
                store.array(PREDICTION_NAMES[row]),
                label_volume,
                mapping,
                offset=offset,
                threshold=config.threshold,
                argmax=argmax,
                ignore=tuple(ignore_labels),
            )
        result["labels"] = {
            "source": label_volume.source,
            "mapping": {str(c): list(v) for c, v in mapping.items()},
            "ignore": list(ignore_labels),
        }
    result["notes"] = notes + remedy_notes(result)
    result["seconds"] = round(time.perf_counter() - t_start, 3)
    result = json.loads(json.dumps(result, default=_plain))
    store.root.attrs["normcheck"] = dict(store.root.attrs["normcheck"]) | {"remedies": result}
    yield RemediesFinished(out, result, recal_result)


def _prepare_labels(labels: Any, label_map: Any, plan: TilePlan):
    if labels is None:
        if label_map is not None:
            raise NormcheckError("--label-map needs --labels (the ground-truth label volume)")
        return None, {}, (0, 0, 0)
    if label_map is None:
        raise NormcheckError(
            "labels need a mapping from label values to output channels: add --label-map '{\"1\": 0}'"
        )
    label_volume = labels if isinstance(labels, Volume) else open_labels(labels)
    mapping = parse_label_map(label_map) if not _is_parsed(label_map) else label_map
    offset = label_box(label_volume, plan.volume_shape, plan.roi_start, plan.roi_stop)
    return label_volume, mapping, offset


def _is_parsed(mapping: Any) -> bool:
    return isinstance(mapping, dict) and all(
        isinstance(k, int) and isinstance(v, tuple) for k, v in mapping.items()
    )


def _create_like(store: OutputStore, name: str, remedy: str, config: RunConfig) -> zarr.Array:
    """An image group with ``pred_eval``'s shape, chunks, dtype, voxel size and translation."""
    reference = store.array("pred_eval")
    datasets = store.root["pred_eval"].attrs["ome"]["multiscales"][0]["datasets"][0]
    transforms = {t["type"]: t[t["type"]] for t in datasets["coordinateTransformations"]}
    return store.create_image(
        name,
        tuple(reference.shape),
        tuple(reference.chunks),
        str(reference.dtype),
        tuple(transforms["scale"][1:]),
        tuple(transforms["translation"][1:]),
        attrs={"mode": remedy, "remedy": ROW_TITLES[remedy], "activation": config.activation},
    )


def _add_mismatch(plan, tile, outputs, remedies, mismatch, activation) -> None:
    """Feed each remedy's own tile prediction to its tracker (as both of the tracker's two modes)."""
    start, stop = prediction_box(plan, tile)
    window = tuple(slice(a - w, b - w) for a, b, w in zip(start, stop, tile.window_start))
    for remedy, output in zip(remedies, outputs):
        probabilities = activate(output[(slice(None), *window)][None], activation)[0]
        mismatch[remedy].add(tile, np.stack([probabilities, probabilities]))


def _assemble(run, remedies, disparity, mismatch, label_dice, recal_result) -> dict[str, Any]:
    summary = run.summary
    n_out = len(summary["disparity"]["hard"])
    result: dict[str, Any] = {
        "eval": {
            "prediction": "pred_eval",
            "disparity_vs_train": summary["disparity"],
            "mismatch": summary["mismatch_eval"],
            "dice_vs_labels": None,
        },
        "train": {
            "prediction": "pred_train",
            "disparity_vs_train": {"hard": [0.0] * n_out, "soft": [0.0] * n_out},
            "mismatch": summary["mismatch_train"],
            "dice_vs_labels": None,
        },
    }
    for remedy in remedies:
        result[remedy] = {
            "prediction": PREDICTION_NAMES[remedy],
            "disparity_vs_train": disparity[remedy].result(),
            "mismatch": mismatch[remedy].result()["eval"],
            "dice_vs_labels": label_dice[remedy].result() if remedy in label_dice else None,
        }
    if recal_result is not None and "recalibrated" in remedies:
        provenance = recal_result.provenance
        result["recalibration"] = {
            key: provenance.get(key)
            for key in ("date", "variance", "n_batches", "tiles", "holdout_tiles", "notes")
        } | {
            "batch_size": provenance["config"]["batch_size"],
            "holdout": recal_result.holdout,
        }
    return result


def _mean(values: list[float] | None) -> float | None:
    return float(np.mean(values)) if values else None


def remedy_notes(result: dict[str, Any]) -> list[str]:
    """One plain sentence per remedy: what it changed against eval, better or worse, nothing hidden."""
    notes = []
    base = result["eval"]
    for remedy in REMEDIES:
        row = result.get(remedy)
        if row is None:
            continue
        parts = []
        for key, label, kind, higher_is_better in (
            ("disparity_vs_train", "disparity vs train", "hard", False),
            ("mismatch", "tile mismatch", "hard", False),
            ("dice_vs_labels", "Dice vs labels", "hard", True),
        ):
            before = _mean((base.get(key) or {}).get(kind))
            after = _mean((row.get(key) or {}).get(kind))
            if before is None or after is None:
                continue
            if abs(after - before) < 1e-4:
                verdict = "unchanged"
            else:
                better = (after > before) == higher_is_better
                verdict = (
                    f"{'higher' if after > before else 'lower'}: {'better' if better else 'worse'}"
                )
            parts.append(f"{label} {before:.3f} -> {after:.3f} ({verdict})")
        if parts:
            notes.append(f"{ROW_TITLES[remedy]} vs eval: " + "; ".join(parts))
    return notes


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    with contextlib.suppress(Exception):
        return float(value)
    return str(value)
