"""The tile loop: read each tile once, predict it in eval and in train normalization mode, stitch both.

:func:`run_check` is a generator of small progress events; the command line wraps it in a progress bar
and the napari widget in a ``thread_worker``. Stopping it between tiles (``close()`` or the ``cancel``
event) leaves a valid, incomplete OUT.zarr; the model is restored in every case.

Data flow (memory depends on tile size and tiles in flight only):
reader thread (lazy read + intensity normalization + padding) -> eval/train forwards in batches ->
:class:`~napari_normcheck.core.stitch.ChunkAccumulator` -> finished chunks -> activation -> zarr.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_normcheck import __version__
from napari_normcheck.core.config import RunConfig
from napari_normcheck.core.errors import NormcheckError
from napari_normcheck.core.features import (
    FeatureLayer,
    FeatureRecorder,
    default_feature_layers,
    tile_feature_summary,
)
from napari_normcheck.core.intensity import IntensityTransform, resolve_intensity
from napari_normcheck.core.metrics import DisparityAccumulator, tile_disparity
from napari_normcheck.core.mismatch import MismatchTracker, prediction_box
from napari_normcheck.core.modes import normalization_mode
from napari_normcheck.core.stitch import ChunkAccumulator, importance_map
from napari_normcheck.core.store import OutputStore, is_complete
from napari_normcheck.core.tiling import Tile, TilePlan, plan_tiles
from napari_normcheck.core.volume import Volume

MODES = ("eval", "train")
PREDICTION_NAMES = {"eval": "pred_eval", "train": "pred_train"}
DEFAULT_TILE_3D = (64, 128, 128)
DEFAULT_TILE_2D = (1, 256, 256)


@dataclass(frozen=True)
class RunStarted:
    """Emitted once the plan is fixed and the output store exists."""

    out: Path
    plan: TilePlan
    device: str
    eval_batch: int


@dataclass(frozen=True)
class TileDone:
    """Emitted after a tile's two predictions have been stitched."""

    tile: Tile
    n_done: int
    n_total: int
    elapsed: float
    chunks_written: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFinished:
    """Emitted last, after the completion marker; ``summary`` is what the marker holds."""

    out: Path
    summary: dict[str, Any]


@dataclass
class Timing:
    """Seconds spent per stage (the reader thread's time overlaps the forwards)."""

    read: float = 0.0
    forward_eval: float = 0.0
    forward_train: float = 0.0
    stitch: float = 0.0
    metrics: float = 0.0
    write: float = 0.0
    total: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """Rounded seconds per stage."""
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class _TileWork:
    tile: Tile
    image: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)


def resolve_device(choice: str) -> torch.device:
    """``auto`` gives CUDA when available, else CPU; an explicit CUDA choice without CUDA is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise NormcheckError(
            "device cuda was requested but no CUDA GPU is available; use --device cpu"
        )
    return torch.device(choice)


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
    """Raise a :class:`NormcheckError` suggesting the nearest valid tile when a side is not divisible."""
    if spatial_dims == 2 and window_shape[0] != 1:
        raise NormcheckError(
            f"a 2D model runs plane by plane: the tile's z size must be 1, not {window_shape[0]} "
            f"(use --tile 1,{window_shape[1]},{window_shape[2]})"
        )
    if divisor is None:
        return
    divs = (divisor,) * spatial_dims if isinstance(divisor, int) else tuple(divisor)
    sides = window_shape[3 - spatial_dims :]
    bad = [(s, d) for s, d in zip(sides, divs) if s % d]
    if bad:
        nearest = [max(d, round(s / d) * d) for s, d in zip(sides, divs)]
        shown = ",".join(str(v) for v in ((1,) if spatial_dims == 2 else ()) + tuple(nearest))
        raise NormcheckError(
            f"the model's input window {window_shape} is not divisible by its downsampling factor "
            f"{divs}: use a tile like {shown} (in crop mode the window is tile + 2 x halo)"
        )


def run_check(
    volume: Volume,
    model: nn.Module,
    config: RunConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    spatial_dims: int | None = None,
    divisor: tuple[int, ...] | int | None = None,
    transform: IntensityTransform | None = None,
    cancel: threading.Event | None = None,
    extra_attrs: dict[str, Any] | None = None,
    resume: bool = False,
) -> Iterator[RunStarted | TileDone | RunFinished]:
    """Run the two-mode tiled check of ``model`` over ``volume``, writing OUT.zarr.

    Parameters
    ----------
    volume : Volume
        The input, lazily opened (``(C, Z, Y, X)``).
    model : torch.nn.Module
        The user's model; its state is restored bitwise after the run, whatever happens.
    config : RunConfig
        Tiling, batching, normalization and output settings.
    out : path-like
        The OUT.zarr to write.
    overwrite : bool
        Replace an earlier napari-normcheck output at ``out`` (swapped in only when complete).
    spatial_dims : int, optional
        2 or 3; defaults to ``config.spatial_dims``, then 3 when the volume has z > 1.
    divisor : int or tuple of int, optional
        The model's downsampling factor; tiles are checked against it.
    transform : IntensityTransform, optional
        Input normalization; resolved from ``config.normalize`` when not given.
    cancel : threading.Event, optional
        Set it to stop after the current tile.
    extra_attrs : dict, optional
        More metadata for the store (model file hash, inventory, ...).
    resume : bool
        Continue an interrupted run in ``out`` with the same parameters: finished output chunks and
        their metrics are kept, and only tiles that contribute to unfinished chunks run again.

    Yields
    ------
    RunStarted, TileDone, RunFinished
        Progress events.
    """
    t_start = time.perf_counter()
    timing = Timing()
    spatial_dims = spatial_dims or config.spatial_dims or 3
    if spatial_dims not in (2, 3):
        raise NormcheckError(f"spatial dims must be 2 or 3, not {spatial_dims}")
    device = resolve_device(config.device)
    eval_batch = config.eval_batch or (4 if device.type == "cuda" else 1)
    tile_shape = config.tile or default_tile(volume.spatial_shape, spatial_dims, divisor or 16)
    halo = config.halo if config.blend == "crop" else (0, 0, 0)
    if spatial_dims == 2:
        halo = (0, *halo[1:])
    plan = plan_tiles(
        volume.spatial_shape,
        tile_shape,
        overlap=config.overlap,
        blend=config.blend,  # type: ignore[arg-type]
        halo=halo,
        roi=config.roi,
    )
    check_tile(plan.window_shape, spatial_dims, divisor)
    if transform is None:
        transform = resolve_intensity(config.normalize, volume.data)

    worker_model = model if device.type == "cpu" else copy.deepcopy(model).to(device)
    feature_names = list(
        dict.fromkeys(default_feature_layers(worker_model) + list(config.feature_layers))
    )
    # Forward hooks cannot be added to a compiled TorchScript graph: no feature statistics there.
    scripted = isinstance(worker_model, torch.jit.ScriptModule)
    recorder = (
        FeatureRecorder(worker_model, feature_names) if feature_names and not scripted else None
    )
    feature_layers = recorder.layers if recorder else []
    weights = importance_map(plan.window_shape, plan.blend, spatial_dims)
    probe = _probe_out_channels(
        worker_model, volume.n_channels, plan.window_shape, spatial_dims, device
    )
    n_out = probe

    scale = tuple(volume.scale)
    translation = tuple(t + r * s for t, r, s in zip(volume.translation, plan.roi_start, scale))
    attrs = {
        "version": __version__,
        "params": config.to_dict() | {"eval_batch": eval_batch, "device": str(device)},
        "plan": plan.to_dict(),
        "intensity": transform.to_dict(),
        "spatial_dims": spatial_dims,
        "source": volume.source,
        "complete": False,
        **(extra_attrs or {}),
    }
    out_shape = (n_out, *plan.roi_shape)
    out_chunks = (1, *plan.chunk_shape)
    if resume:
        store = OutputStore.reopen(out, attrs, same=("params", "plan", "intensity", "source"))
        names = (*PREDICTION_NAMES.values(), "disparity", "seams_eval", "seams_train")
        arrays = {name: store.array(name) for name in names}
        arrays["eval"], arrays["train"] = arrays.pop("pred_eval"), arrays.pop("pred_train")
    else:
        store = OutputStore.create(out, overwrite=overwrite, attrs=attrs)
        arrays = _create_voxel_outputs(store, config, out_shape, out_chunks, scale, translation)
    disparity = DisparityAccumulator(n_out, config.threshold, argmax=config.activation == "softmax")
    tile_records: dict[int, dict[str, Any]] = {}
    roi_start = plan.roi_start

    def write_seams(start: tuple[int, ...], stop: tuple[int, ...], difference: np.ndarray) -> None:
        # The largest disagreement of any tile pair covering a voxel; max is idempotent on resume.
        t0 = time.perf_counter()
        box = (slice(None), *(slice(a - r, b - r) for a, b, r in zip(start, stop, roi_start)))
        for m, mode in enumerate(MODES):
            seams = arrays[f"seams_{mode}"]
            current = seams[box].astype(np.float32)
            if config.output_dtype == "uint8":
                current = current / 255.0
            seams[box] = _to_output_dtype(np.maximum(current, difference[m]), config.output_dtype)
        timing.write += time.perf_counter() - t0

    mismatch = MismatchTracker(plan, n_out, config.threshold, on_pair=write_seams)
    progress = store.read_progress() if resume else {}
    disparity.load(progress.get("disparity_sums", {}))
    mismatch.load(progress.get("pair_sums", {}))
    tile_records.update({int(k): v for k, v in progress.get("tiles", {}).items()})
    chunks_written = 0
    last_save = time.perf_counter()

    def save_progress() -> None:
        # Written after the chunks it lists: a chunk is either listed and on disk, or recomputed.
        nonlocal last_save
        store.write_progress(
            {
                "done_chunks": sorted(accumulator.done_chunks),
                "disparity_sums": disparity.to_dict(),
                "pair_sums": mismatch.to_dict(),
                "tiles": {str(k): v for k, v in tile_records.items()},
            }
        )
        last_save = time.perf_counter()

    def write_chunk(
        chunk: tuple[int, int, int], slices: tuple[slice, ...], values: np.ndarray
    ) -> None:
        nonlocal chunks_written
        t0 = time.perf_counter()
        stacked = values.reshape(len(MODES), n_out, *values.shape[1:])
        probabilities = _activate(stacked, config.activation)
        for m, mode in enumerate(MODES):
            arrays[mode][(slice(None), *slices)] = _to_output_dtype(
                probabilities[m], config.output_dtype
            )
        p_eval, p_train = probabilities[0], probabilities[1]
        arrays["disparity"][(slice(None), *slices)] = _to_output_dtype(
            np.abs(p_train - p_eval), config.output_dtype
        )
        disparity.add(p_train, p_eval)
        chunks_written += 1
        timing.write += time.perf_counter() - t0

    accumulator = ChunkAccumulator(
        plan,
        len(MODES) * n_out,
        weights,
        write_chunk,
        store.path / ".scratch",
        max_bytes=config.cache_mb * 2**20,
        done_chunks={tuple(c) for c in progress.get("done_chunks", [])},
    )
    yield RunStarted(out=Path(out), plan=plan, device=str(device), eval_batch=eval_batch)

    needed = {t.index for t in plan.tiles() if accumulator.needs(t)}
    # A pair's mismatch is computed when its later tile runs, from the earlier tile's overlap slab.
    needed |= {j for i in list(needed) for j in mismatch.missing_partners(i)}
    tiles = [plan.get_tile(i) for i in sorted(needed)]
    n_done = 0

    def finish_ready() -> Iterator[TileDone]:
        """Stitch the tiles whose two predictions are ready, in scan order; one event each."""
        nonlocal n_done
        for done in _pop_finished(pending):
            before = chunks_written
            _stitch(accumulator, done, timing)
            record = _tile_record(done, plan, config, mismatch, timing, feature_layers)
            tile_records[record["index"]] = record
            n_done += 1
            if time.perf_counter() - last_save > 2.0:
                save_progress()
            elapsed = time.perf_counter() - t_start
            yield TileDone(done.tile, n_done, len(tiles), elapsed, chunks_written - before, record)

    reader = _TileReader(
        volume, plan, tiles, transform, depth=max(config.prefetch, eval_batch, config.train_batch)
    )
    pending: deque[_TileWork] = deque()
    passes = _Passes(
        worker_model, eval_batch, config.train_batch, spatial_dims, device, timing, recorder
    )
    try:
        reader.start()
        for work in reader:
            pending.append(work)
            passes.run_ready(pending, final=False)
            for event in finish_ready():
                yield event
                if cancel is not None and cancel.is_set():
                    return
        passes.run_ready(pending, final=True)
        yield from finish_ready()
        records = [tile_records[i] for i in sorted(tile_records)]
        for record in records:
            tile_mismatch = mismatch.tile_mismatch(record["index"])
            record["mismatch_eval"] = tile_mismatch["eval_hard"]
            record["mismatch_train"] = tile_mismatch["train_hard"]
            record["mismatch_eval_soft"] = tile_mismatch["eval_soft"]
            record["mismatch_train_soft"] = tile_mismatch["train_soft"]
        cell_transform = tile_cell_transform(plan, scale, volume.translation)
        _write_tile_grid(store, plan, records, n_out, cell_transform)
        _write_feature_grid(store, plan, records, feature_layers, cell_transform)
        timing.read = reader.seconds
        timing.total = time.perf_counter() - t_start
        summary = {
            "out": str(out),
            "n_tiles": plan.n_tiles,
            "timing": timing.to_dict(),
            "spilled_chunks": accumulator.spill_count,
            "eval_batch": eval_batch,
            "disparity": disparity.result(),
            "disparity_sums": disparity.to_dict(),
            "mismatch_eval": mismatch.result()["eval"],
            "mismatch_train": mismatch.result()["train"],
            "n_tile_pairs": mismatch.n_pairs,
            "tiles": records,
        }
        store.root.attrs["normcheck"] = dict(store.root.attrs["normcheck"]) | {"complete": True}
        final_path = store.finish(summary)
        yield RunFinished(out=final_path, summary=summary)
    finally:
        reader.stop()
        if not is_complete(store.path):
            save_progress()
        accumulator.close()


class _Passes:
    """The eval and train forwards of pending tiles, batched, with feature hooks in the eval pass."""

    def __init__(
        self,
        model: nn.Module,
        eval_batch: int,
        train_batch: int,
        spatial_dims: int,
        device: torch.device,
        timing: Timing,
        recorder: FeatureRecorder | None,
    ) -> None:
        self.model = model
        self.batch = {"eval": eval_batch, "train": train_batch}
        self.spatial_dims = spatial_dims
        self.device = device
        self.timing = timing
        self.recorder = recorder

    def run_ready(self, pending: deque[_TileWork], *, final: bool) -> None:
        """Run each mode on consecutive pending tiles, a full batch at a time (a partial one at the end)."""
        for mode in MODES:
            self._run_mode(pending, mode, final)

    def _run_mode(self, pending: deque[_TileWork], mode: str, final: bool) -> None:
        todo = [w for w in pending if mode not in w.outputs]
        while todo and (len(todo) >= self.batch[mode] or final):
            group = todo[: self.batch[mode]]
            t0 = time.perf_counter()
            hooks = self.recorder.recording() if self.recorder and mode == "eval" else None
            try:
                with hooks or contextlib.nullcontext():
                    images = [w.image for w in group]
                    outputs = _forward(self.model, images, mode, self.spatial_dims, self.device)
                    features = self.recorder.take() if hooks else []
            except torch.OutOfMemoryError:
                if mode == "eval" and self.batch[mode] > 1:
                    # Eval results do not depend on the batch: halve it and try again.
                    self.batch[mode] //= 2
                    torch.cuda.empty_cache()
                    continue
                raise NormcheckError(
                    f"one tile of {group[0].image.shape[1:]} voxels does not fit in GPU memory in "
                    f"the {mode} pass; use a smaller --tile"
                ) from None
            elapsed = time.perf_counter() - t0
            if mode == "eval":
                self.timing.forward_eval += elapsed
            else:
                self.timing.forward_train += elapsed
            for k, (w, o) in enumerate(zip(group, outputs)):
                w.outputs[mode] = o
                if features:
                    w.features = features[k]
            todo = todo[len(group) :]


def _tile_record(
    work: _TileWork,
    plan: TilePlan,
    config: RunConfig,
    mismatch: MismatchTracker,
    timing: Timing,
    feature_layers: list[FeatureLayer],
) -> dict[str, Any]:
    """Per-tile disparity over the voxels a tile writes; its predictions go on to the mismatch tracker."""
    t0 = time.perf_counter()
    tile = work.tile
    box_start, box_stop = prediction_box(plan, tile)
    window = tuple(slice(a - w, b - w) for a, b, w in zip(box_start, box_stop, tile.window_start))
    own = np.stack([work.outputs[m][(slice(None), *window)] for m in MODES])
    probabilities = _activate(own, config.activation)
    mismatch.add(tile, probabilities)
    written = tuple(
        slice(a - s, b - s) for a, b, s in zip(tile.write_start, tile.write_stop, box_start)
    )
    values = tile_disparity(
        probabilities[1][(slice(None), *written)],
        probabilities[0][(slice(None), *written)],
        config.threshold,
        argmax=config.activation == "softmax",
    )
    features = tile_feature_summary(feature_layers, work.features)
    timing.metrics += time.perf_counter() - t0
    return {
        "index": tile.index,
        "grid": list(tile.grid),
        "start": list(tile.write_start),
        "stop": list(tile.write_stop),
        "disparity_hard": values["hard"],
        "disparity_soft": values["soft"],
        **({"disparity_argmax": values["argmax"]} if "argmax" in values else {}),
        "feature_z": _overlay_z(features, feature_layers),
        "features": features,
    }


def _overlay_z(features: dict[str, dict], layers: list[FeatureLayer]) -> dict[str, Any] | None:
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
    cell_translation = tuple(
        t + w * v for t, w, v in zip(volume_translation, first.write_start, scale)
    )
    return cell_scale, cell_translation


def _write_tile_grid(
    store: OutputStore,
    plan: TilePlan,
    records: list[dict[str, Any]],
    n_out: int,
    cell_transform: tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    """Per-tile grids of disparity and mismatch: one cell per tile, placed over its tile."""
    for name, key in (
        ("tile_disparity", "disparity_hard"),
        ("tile_disparity_soft", "disparity_soft"),
        ("tile_mismatch_eval", "mismatch_eval"),
        ("tile_mismatch_train", "mismatch_train"),
    ):
        grid = np.full((n_out, *plan.grid_shape), np.nan, dtype=np.float32)
        for record in records:
            if record.get(key) is not None:
                grid[(slice(None), *record["grid"])] = record[key]
        array = store.create_image(
            name,
            grid.shape,
            grid.shape,
            "float32",
            *cell_transform,
            attrs={"meaning": f"per-tile {key.replace('_', ' ')} (1 - Dice)"},
        )
        array[...] = grid


def _write_feature_grid(
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


def _create_voxel_outputs(
    store: OutputStore,
    config: RunConfig,
    out_shape: tuple[int, ...],
    out_chunks: tuple[int, ...],
    scale: tuple[float, ...],
    translation: tuple[float, ...],
) -> dict[str, Any]:
    """``pred_eval``, ``pred_train`` and ``disparity`` images, chunked along the tile grid."""
    arrays = {}
    for mode in MODES:
        arrays[mode] = store.create_image(
            PREDICTION_NAMES[mode],
            out_shape,
            out_chunks,
            config.output_dtype,
            scale,
            translation,
            attrs={
                "mode": mode,
                "activation": config.activation,
                "train_batch": config.train_batch,
            },
        )
    arrays["disparity"] = store.create_image(
        "disparity",
        out_shape,
        out_chunks,
        config.output_dtype,
        scale,
        translation,
        attrs={"meaning": "|P_train - P_eval| per channel"},
    )
    for mode in MODES:
        arrays[f"seams_{mode}"] = store.create_image(
            f"seams_{mode}",
            out_shape,
            out_chunks,
            config.output_dtype,
            scale,
            translation,
            attrs={
                "meaning": f"largest |P_A - P_B| of overlapping tiles A, B ({mode} mode); "
                "zero where one tile covers a voxel"
            },
        )
    return arrays


def _pop_finished(pending: deque[_TileWork]) -> Iterator[_TileWork]:
    # Tiles are stitched in scan order, which keeps the blending arithmetic identical to MONAI's.
    while pending and len(pending[0].outputs) == len(MODES):
        yield pending.popleft()


def _stitch(accumulator: ChunkAccumulator, work: _TileWork, timing: Timing) -> None:
    t0 = time.perf_counter()
    prediction = np.concatenate([work.outputs[m] for m in MODES], axis=0)
    write_before = timing.write
    accumulator.add(work.tile, prediction)
    timing.stitch += time.perf_counter() - t0 - (timing.write - write_before)


def _forward(
    model: nn.Module, images: list[np.ndarray], mode: str, spatial_dims: int, device: torch.device
) -> np.ndarray:
    """Predict a batch of ``(C, z, y, x)`` windows in normalization ``mode``; returns float32 numpy."""
    batch = torch.from_numpy(np.stack(images))
    if spatial_dims == 2:
        batch = batch[:, :, 0]
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    with torch.inference_mode(), normalization_mode(model, mode):  # type: ignore[arg-type]
        output = first_tensor(model(batch))
    if tuple(output.shape[2:]) != tuple(batch.shape[2:]) or output.shape[0] != batch.shape[0]:
        raise NormcheckError(
            f"the model returned shape {tuple(output.shape)} for input {tuple(batch.shape)}: "
            "napari-normcheck needs outputs with the input's spatial shape (a segmentation network)"
        )
    if spatial_dims == 2:
        output = output[:, :, None]
    return output.float().cpu().numpy()


_warned_tuple_output = False


def first_tensor(output: Any) -> torch.Tensor:
    """The model's prediction: the output itself, or the first tensor of a tuple, list or dict."""
    global _warned_tuple_output
    if isinstance(output, torch.Tensor):
        return output
    values = (
        list(output.values())
        if isinstance(output, dict)
        else list(output)
        if isinstance(output, (tuple, list))
        else []
    )
    for value in values:
        if isinstance(value, torch.Tensor):
            if not _warned_tuple_output:
                warnings.warn(
                    f"the model returned a {type(output).__name__}; using its first tensor "
                    f"(shape {tuple(value.shape)}) as the prediction",
                    stacklevel=2,
                )
                _warned_tuple_output = True
            return value
    raise NormcheckError(
        f"the model returned {type(output).__name__} with no tensor; it must return a tensor"
    )


def _probe_out_channels(
    model: nn.Module,
    in_channels: int,
    window: tuple[int, int, int],
    spatial_dims: int,
    device: torch.device,
) -> int:
    """Output channels from one eval forward on zeros of the tile's shape (also checks the shape)."""
    image = np.zeros((in_channels, *window), dtype=np.float32)
    try:
        return int(_forward(model, [image], "eval", spatial_dims, device).shape[1])
    except RuntimeError as error:
        raise NormcheckError(
            f"the model failed on a {spatial_dims}D input of {in_channels} channel(s) and shape "
            f"{window[3 - spatial_dims :]}: {str(error).splitlines()[0]} (check the channel count, "
            "--spatial-dims and the tile)"
        ) from None


def _activate(values: np.ndarray, activation: str) -> np.ndarray:
    """Apply the activation over the channel axis (axis 1 of ``(modes, C, z, y, x)``)."""
    if activation == "none":
        return values
    tensor = torch.from_numpy(values)
    if activation == "sigmoid":
        return torch.sigmoid(tensor).numpy()
    return torch.softmax(tensor, dim=1).numpy()


def _to_output_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return values.astype(dtype, copy=False)


class _TileReader:
    """A thread that reads, normalizes and pads the next tiles while the model works."""

    def __init__(
        self,
        volume: Volume,
        plan: TilePlan,
        tiles: list[Tile],
        transform: IntensityTransform,
        depth: int,
    ) -> None:
        self.volume = volume
        self.plan = plan
        self.tiles = tiles
        self.transform = transform
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="normcheck-reader", daemon=True)
        self.seconds = 0.0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join(timeout=10)

    def __iter__(self) -> Iterator[_TileWork]:
        for _ in self.tiles:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self) -> None:
        try:
            for tile in self.tiles:
                if self.stopped.is_set():
                    return
                t0 = time.perf_counter()
                image = read_window(self.volume, self.plan, tile, self.transform)
                self.seconds += time.perf_counter() - t0
                while not self.stopped.is_set():
                    try:
                        self.queue.put(_TileWork(tile, image), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the consumer, which raises it
            self.queue.put(error)


def read_window(
    volume: Volume, plan: TilePlan, tile: Tile, transform: IntensityTransform
) -> np.ndarray:
    """Read the model input window of ``tile``: normalized float32 ``(C, *window_shape)``.

    Blend modes see only the region of interest, zero-padded outside it in normalized space (as MONAI
    pads its input). Crop mode sees real context from the whole volume, reflect-padded only beyond the
    volume border.
    """
    start = tile.window_start
    stop = tuple(s + w for s, w in zip(start, plan.window_shape))
    if plan.blend == "crop":
        # Reflect about the volume border (numpy's "reflect" of the whole volume), whatever the halo.
        index = [
            _reflect_index(np.arange(a, b), n) for a, b, n in zip(start, stop, plan.volume_shape)
        ]
        lo = tuple(int(i.min()) for i in index)
        hi = tuple(int(i.max()) + 1 for i in index)
    else:
        lo = tuple(max(s, a) for s, a in zip(start, plan.roi_start))
        hi = tuple(min(s, b) for s, b in zip(stop, plan.roi_stop))
    block = volume.data[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    block = np.asarray(
        block.compute(scheduler="synchronous") if hasattr(block, "compute") else block
    )
    image = transform.apply(block)
    n_bad = image.size - int(np.count_nonzero(np.isfinite(image)))
    if n_bad:
        raise NormcheckError(
            f"the volume holds {n_bad} NaN or Inf value(s) in the box z {lo[0]}:{hi[0]}, "
            f"y {lo[1]}:{hi[1]}, x {lo[2]}:{hi[2]}; fill or mask them before running"
        )
    if plan.blend == "crop":
        if image.shape[1:] != plan.window_shape or any(a != s for a, s in zip(lo, start)):
            image = image[np.ix_(range(image.shape[0]), *[i - a for i, a in zip(index, lo)])]
    else:
        pad = [(0, 0)] + [(a - s, e - b) for s, a, b, e in zip(start, lo, hi, stop)]
        if any(p != (0, 0) for p in pad):
            image = np.pad(image, pad, mode="constant", constant_values=0.0)
    return np.ascontiguousarray(image, dtype=np.float32)


def _reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map coordinates outside ``[0, size)`` to their mirror image (no edge repeat), periodically."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)
