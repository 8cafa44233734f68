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
import threading
import time
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
    FeatureRecorder,
    default_feature_layers,
)
from napari_normcheck.core.forward import (
    Passes,
    activate,
    probe_out_channels,
    resolve_device,
    to_output_dtype,
)
from napari_normcheck.core.grids import (
    tile_cell_transform,
    tile_record,
    write_feature_grid,
    write_tile_grids,
)
from napari_normcheck.core.intensity import IntensityTransform, resolve_intensity
from napari_normcheck.core.metrics import DisparityAccumulator
from napari_normcheck.core.mismatch import MismatchTracker
from napari_normcheck.core.stitch import ChunkAccumulator, importance_map
from napari_normcheck.core.store import OutputStore, is_complete
from napari_normcheck.core.tile_io import TileReader, TileWork
from napari_normcheck.core.tiling import Tile, TilePlan, plan_tiles
from napari_normcheck.core.volume import Volume
from napari_normcheck.core.writer import BackgroundWriter

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
    n_out = probe_out_channels(
        worker_model, volume.n_channels, plan.window_shape, spatial_dims, device, divisor
    )

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
        writer.submit(store_seams, start, stop, difference)

    def store_seams(start: tuple[int, ...], stop: tuple[int, ...], difference: np.ndarray) -> None:
        # The largest disagreement of any tile pair covering a voxel; max is idempotent on resume.
        # Jobs run in submission order, so read-modify-write of overlapping boxes is safe.
        box = (slice(None), *(slice(a - r, b - r) for a, b, r in zip(start, stop, roi_start)))
        for m, mode in enumerate(MODES):
            seams = arrays[f"seams_{mode}"]
            current = seams[box].astype(np.float32)
            if config.output_dtype == "uint8":
                current = current / 255.0
            seams[box] = to_output_dtype(np.maximum(current, difference[m]), config.output_dtype)

    mismatch = MismatchTracker(plan, n_out, config.threshold, on_pair=write_seams)
    progress = store.read_progress() if resume else {}
    disparity.load(progress.get("disparity_sums", {}))
    mismatch.load(progress.get("pair_sums", {}))
    tile_records.update({int(k): v for k, v in progress.get("tiles", {}).items()})
    chunks_written = 0
    writer = BackgroundWriter()
    last_save = time.perf_counter()

    def save_progress() -> None:
        # Written after the chunks it lists: a chunk is either listed and on disk, or recomputed.
        nonlocal last_save
        writer.flush()  # the chunks listed as done must be on disk first
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
        probabilities = activate(stacked, config.activation)
        p_eval, p_train = probabilities[0], probabilities[1]
        disparity.add(p_train, p_eval)
        writer.submit(store_chunk, slices, probabilities)
        chunks_written += 1
        timing.write += time.perf_counter() - t0

    def store_chunk(slices: tuple[slice, ...], probabilities: np.ndarray) -> None:
        # On the writer thread: compress and write while the model predicts the next tiles.
        box = (slice(None), *slices)
        for m, mode in enumerate(MODES):
            arrays[mode][box] = to_output_dtype(probabilities[m], config.output_dtype)
        difference = np.abs(probabilities[1] - probabilities[0])
        arrays["disparity"][box] = to_output_dtype(difference, config.output_dtype)

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
            record = tile_record(done, plan, config, mismatch, timing, feature_layers)
            tile_records[record["index"]] = record
            n_done += 1
            if time.perf_counter() - last_save > 2.0:
                save_progress()
            elapsed = time.perf_counter() - t_start
            yield TileDone(done.tile, n_done, len(tiles), elapsed, chunks_written - before, record)

    reader = TileReader(
        volume, plan, tiles, transform, depth=max(config.prefetch, eval_batch, config.train_batch)
    )
    pending: deque[TileWork] = deque()
    passes = Passes(
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
        write_tile_grids(store, plan, records, n_out, cell_transform)
        write_feature_grid(store, plan, records, feature_layers, cell_transform)
        timing.read = reader.seconds
        timing.total = time.perf_counter() - t_start
        global_mismatch = mismatch.result()
        summary = {
            "out": str(out),
            "n_tiles": plan.n_tiles,
            "timing": timing.to_dict(),
            "spilled_chunks": accumulator.spill_count,
            "eval_batch": eval_batch,
            "disparity": disparity.result(),
            "disparity_sums": disparity.to_dict(),
            "mismatch_eval": global_mismatch["eval"],
            "mismatch_train": global_mismatch["train"],
            "n_tile_pairs": mismatch.n_pairs,
            "tiles": records,
        }
        store.root.attrs["normcheck"] = dict(store.root.attrs["normcheck"]) | {"complete": True}
        writer.flush()
        final_path = store.finish(summary)
        yield RunFinished(out=final_path, summary=summary)
    finally:
        reader.stop()
        # A failed write must not be listed as done: then the progress is not saved at all.
        with contextlib.suppress(Exception):
            if not is_complete(store.path):
                save_progress()
        with contextlib.suppress(Exception):
            writer.close()
        accumulator.close()


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


def _pop_finished(pending: deque[TileWork]) -> Iterator[TileWork]:
    # Tiles are stitched in scan order, which keeps the blending arithmetic identical to MONAI's.
    while pending and len(pending[0].outputs) == len(MODES):
        yield pending.popleft()


def _stitch(accumulator: ChunkAccumulator, work: TileWork, timing: Timing) -> None:
    t0 = time.perf_counter()
    prediction = np.concatenate([work.outputs[m] for m in MODES], axis=0)
    write_before = timing.write
    accumulator.add(work.tile, prediction)
    timing.stitch += time.perf_counter() - t0 - (timing.write - write_before)
