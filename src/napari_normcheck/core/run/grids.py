"""Per-tile results: disparity and feature records, and the tile grids placed over the volume."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.scratch import ScratchBuffer
from napari_normcheck.core.base.tiling import TilePlan
from napari_normcheck.core.io.store import OutputStore
from napari_normcheck.core.measure.features import FeatureLayer, tile_feature_summary
from napari_normcheck.core.measure.mismatch import MismatchTracker, prediction_box
from napari_normcheck.core.measure.support import MinForeground, judged_mask
from napari_normcheck.core.measure.tile_metrics import TileView
from napari_normcheck.core.run.forward import activate_into
from napari_normcheck.core.run.registry import TileMetric
from napari_normcheck.core.run.report import tile_hard_value
from napari_normcheck.core.run.staging import HostCopies
from napari_normcheck.core.run.tile_io import TileWork

if TYPE_CHECKING:
    from napari_normcheck.core.run.timing import Timing


def tile_record(
    work: TileWork,
    plan: TilePlan,
    config: RunConfig,
    mismatch: MismatchTracker,
    timing: Timing,
    feature_layers: list[FeatureLayer],
    metrics: tuple[TileMetric, ...],
    host: HostCopies | None = None,
    scratch: ScratchBuffer | None = None,
) -> dict[str, Any]:
    """A tile's record: its metrics over the voxels it writes, and its feature statistics.

    The tile's predictions (tensors on the run's device) are activated there over the tile's whole
    prediction box and cross to the host once (through ``host``), or, without ``host``, stay there:
    the Dice and pair sums then run on the device too and only the sums cross. They go on to the
    mismatch tracker, in the tracker's order of prediction names. ``scratch`` lends the memory of
    the activated box (the calling thread's, reused from tile to tile).
    """
    t0 = time.perf_counter()
    tile = work.tile
    box_start, box_stop = prediction_box(plan, tile)
    window = tuple(slice(a - w, b - w) for a, b, w in zip(box_start, box_stop, tile.window_start))
    names = mismatch.names
    first = work.outputs[names[0]]
    # Activated where the prediction is (the run's device); one copy of the box to the host.
    shape = (len(names), first.shape[0], *(b - a for a, b in zip(box_start, box_stop)))
    # Nothing below keeps the activated box past this call (the slab store copies what waits).
    activated = (scratch or ScratchBuffer()).empty(shape, first.device)
    for m, name in enumerate(names):
        activate_into(work.outputs[name][(slice(None), *window)], config.activation, activated[m])
    # Without ``host`` the metrics run where the prediction is (a GPU); else on the host's copy.
    probabilities = activated if host is None else host.to_host(activated)
    mismatch.add(tile, probabilities)
    written = (
        slice(None),
        *(slice(a - s, b - s) for a, b, s in zip(tile.write_start, tile.write_stop, box_start)),
    )
    view = TileView(
        {name: probabilities[m][written] for m, name in enumerate(names)},
        config.threshold,
        argmax=config.activation == "softmax",
    )
    record: dict[str, Any] = {
        "index": tile.index,
        "grid": list(tile.grid),
        "start": list(tile.write_start),
        "stop": list(tile.write_stop),
    }
    for metric in metrics:
        value = metric.compute(view) if metric.compute is not None else None
        if value is not None:
            record[metric.key] = value
    features = tile_feature_summary(feature_layers, work.features)
    timing.metrics += time.perf_counter() - t0
    return record | {"feature_z": overlay_z(features, feature_layers), "features": features}


def add_pair_metrics(records: list[dict[str, Any]], mismatch: MismatchTracker) -> None:
    """Add each tile's mean mismatch with its neighbours, from the tracker's pair sums.

    Per prediction: ``mismatch_<name>`` (hard) and ``mismatch_<name>_soft``.
    """
    for record in records:
        tile_mismatch = mismatch.tile_mismatch(record["index"])
        for name in mismatch.names:
            record[f"mismatch_{name}"] = tile_mismatch[f"{name}_hard"]
            record[f"mismatch_{name}_soft"] = tile_mismatch[f"{name}_soft"]


def add_support(
    records: list[dict[str, Any]], mismatch: MismatchTracker, min_foreground: MinForeground
) -> None:
    """Add whether each tile's hard values are judged, per channel (enough foreground for a Dice).

    ``judged``: the tile's hard disparity, from its ``foreground_voxels`` over the voxels it
    writes; ``mismatch_<name>_judged``: its hard mismatch, from the foreground of its tile pairs
    together over the voxels they share. A record without ``foreground_voxels`` (progress saved
    before the counts existed) is judged as before the rule. The values themselves stay exact.
    """
    for record in records:
        foreground = record.get("foreground_voxels")
        n_voxels = int(np.prod([b - a for a, b in zip(record["start"], record["stop"])]))
        if foreground is not None:
            record["judged"] = judged_mask(foreground, n_voxels, min_foreground)
        for name in mismatch.names:
            if record.get(f"mismatch_{name}") is not None:
                record[f"mismatch_{name}_judged"] = mismatch.judged(
                    name, min_foreground, record["index"]
                )


def overlay_z(features: dict[str, dict], layers: list[FeatureLayer]) -> dict[str, Any] | None:
    """The report's per-tile feature z summary for the overlay layer (the first with running stats)."""
    for layer in layers:
        z = features.get(layer.name, {}).get("z")
        if z is not None:
            absolute = np.abs(np.asarray(z))
            return {
                "layer": layer.name,
                "mean_abs": float(absolute.mean()),
                "max_abs": float(absolute.max()),
                "max_channel": int(absolute.argmax()),
            }
    return None


def tile_cell_transform(
    plan: TilePlan, scale: tuple[float, ...], volume_translation: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Scale and translation that place cell ``(iz, iy, ix)`` of a tile grid over that tile."""
    step = []
    for d, n in enumerate(plan.grid_shape):
        starts = plan.window_starts[:, d]
        step.append(
            max((starts.max() - starts.min()) / (n - 1), 1.0) if n > 1 else plan.roi_shape[d]
        )
    first = plan.get_tile(0)
    cell_scale = tuple(float(s) * v for s, v in zip(step, scale))
    # Voxel centres sit at index * scale + translation (OME-Zarr and napari): centre each cell on
    # the span of its tile.
    cell_translation = tuple(
        t + (w + (st - 1) / 2) * v
        for t, w, st, v in zip(volume_translation, first.write_start, step, scale)
    )
    return cell_scale, cell_translation


def write_tile_grids(
    store: OutputStore,
    plan: TilePlan,
    records: list[dict[str, Any]],
    n_out: int,
    cell_transform: tuple[tuple[float, ...], tuple[float, ...]],
    metrics: tuple[TileMetric, ...],
) -> None:
    """The grid of each tile metric that has one: one cell per tile, placed over its tile.

    Cells of hard values that are not judged (too little foreground, :func:`add_support`) hold
    NaN, as do tiles without the metric, so napari draws nothing there.
    """
    for metric in metrics:
        if metric.grid is None:
            continue
        grid = np.full((n_out, *plan.grid_shape), np.nan, dtype=np.float32)
        for record in records:
            if record.get(metric.key) is not None:
                grid[(slice(None), *record["grid"])] = [
                    np.nan if v is None else v
                    for v in (
                        tile_hard_value(record, metric.key, c)
                        for c in range(len(record[metric.key]))
                    )
                ]
        array = store.create_image(
            metric.grid,
            grid.shape,
            grid.shape,
            "float32",
            *cell_transform,
            attrs={"meaning": metric.meaning},
        )
        array[...] = grid


def write_feature_grid(
    store: OutputStore,
    plan: TilePlan,
    records: list[dict[str, Any]],
    layers: list[FeatureLayer],
    cell_transform: tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    """``feature_z`` (layer, channel, tiles_z, tiles_y, tiles_x) for layers with running statistics."""
    z_layers = [layer for layer in layers if layer.running_mean is not None]
    if not z_layers:
        return
    n_channels = max(layer.channels or 0 for layer in z_layers)
    grid = np.full((len(z_layers), n_channels, *plan.grid_shape), np.nan, dtype=np.float32)
    for record in records:
        for li, layer in enumerate(z_layers):
            z = record["features"].get(layer.name, {}).get("z")
            if z is not None:
                grid[(li, slice(0, len(z)), *record["grid"])] = z
    array = store.create_image(
        "feature_z",
        grid.shape,
        grid.shape,
        "float32",
        *cell_transform,
        attrs={
            "layers": [layer.to_dict() for layer in z_layers],
            "meaning": "(tile mean - running mean) / sqrt(running var + eps) of each layer's input",
        },
        axes=("l", "c", "z", "y", "x"),
    )
    array[...] = grid
