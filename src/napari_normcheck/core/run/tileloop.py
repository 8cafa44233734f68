"""The tile loop of a single-process run and of a distributed block: read, predict, stitch, record.

:class:`TileLoop` owns the per-run state that tiles feed: the blending accumulator, global disparity
sums, pairwise mismatch sums, per-tile records and the background writer of finished chunks and
seams. A single-process run gives it every tile; a distributed block gives it the block's tiles and
its box, and it then writes only chunks inside the box and keeps records only of the tiles the block
owns.

Data flow (memory depends on tile size and tiles in flight only):
reader thread (lazy read + intensity normalization + padding) -> eval/train forwards in batches ->
:class:`~napari_normcheck.core.run.stitch.ChunkAccumulator` -> finished chunks -> activation -> zarr.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.modes import MODES
from napari_normcheck.core.base.tiling import Tile, TilePlan
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.io.writer import BackgroundWriter
from napari_normcheck.core.measure.features import FeatureRecorder
from napari_normcheck.core.measure.metrics import DisparityAccumulator
from napari_normcheck.core.measure.mismatch import MismatchTracker
from napari_normcheck.core.run.blocks import Block, ChunkIndex
from napari_normcheck.core.run.forward import Passes, activate, to_output_dtype
from napari_normcheck.core.run.grids import tile_record
from napari_normcheck.core.run.stitch import ChunkAccumulator
from napari_normcheck.core.run.tile_io import TileReader, TileWork
from napari_normcheck.core.run.timing import Timing

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TileResult:
    """A stitched tile: its record (``None`` if another block owns it) and chunks it finished."""

    tile: Tile
    record: dict[str, Any] | None
    chunks_written: int


class TileLoop:
    """Predict tiles in both modes and feed every output of a run (or of one block of it).

    Parameters
    ----------
    volume : Volume
        The input.
    model : torch.nn.Module
        The model on ``device``; its state is restored after every forward.
    config : RunConfig
        The run's settings.
    plan : TilePlan
        The global tile plan.
    arrays : dict
        Output zarr arrays: ``eval``, ``train``, ``disparity``, ``seams_eval``, ``seams_train``.
    n_out : int
        Output channels of the model.
    weights : numpy.ndarray
        Importance map of one window.
    transform : IntensityTransform
        Input normalization.
    spatial_dims : int
        2 or 3.
    device : torch.device
        Where the forwards run.
    eval_batch : int
        Tiles per eval forward.
    timing : Timing
        Seconds per stage, added to.
    recorder : FeatureRecorder or None
        Feature hooks for the eval pass.
    scratch_dir : path-like
        Spill folder of the blending accumulator.
    block : Block, optional
        Restrict writes to this block's chunks and records to the tiles it owns.
    tiles : list of int, optional
        The tiles that will run (a block's); defaults to all tiles.
    done_chunks : set of ChunkIndex, optional
        Chunks finished by an interrupted run (single-process resume).
    """

    def __init__(
        self,
        volume: Volume,
        model: nn.Module,
        config: RunConfig,
        plan: TilePlan,
        arrays: dict[str, Any],
        n_out: int,
        weights: np.ndarray,
        transform: IntensityTransform,
        spatial_dims: int,
        device: torch.device,
        eval_batch: int,
        timing: Timing,
        recorder: FeatureRecorder | None,
        scratch_dir: str | Path,
        *,
        block: Block | None = None,
        tiles: list[int] | None = None,
        done_chunks: set[ChunkIndex] | None = None,
    ) -> None:
        self.volume = volume
        self.model = model
        self.config = config
        self.plan = plan
        self.arrays = arrays
        self.n_out = n_out
        self.transform = transform
        self.spatial_dims = spatial_dims
        self.device = device
        self.eval_batch = eval_batch
        self.timing = timing
        self.recorder = recorder
        self.feature_layers = recorder.layers if recorder else []
        self.block = block
        self.writer = BackgroundWriter()
        self._metrics_thread = ThreadPoolExecutor(1, thread_name_prefix="normcheck-metrics")
        self._metrics_timing = Timing()  # the metrics thread's own seconds (overlap stitching)
        self.records: dict[int, dict[str, Any]] = {}
        self.chunk_sums: dict[ChunkIndex, dict[str, np.ndarray]] = {}
        self.chunks_written = 0
        self.disparity = DisparityAccumulator(
            n_out, config.threshold, argmax=config.activation == "softmax"
        )
        self.mismatch = MismatchTracker(
            plan,
            n_out,
            config.threshold,
            on_pair=self._write_seams if "seams_eval" in arrays else None,
            tiles=tiles,
            # Slabs pending for later neighbours: half the chunk cache again, then to disk.
            max_slab_bytes=config.cache_mb * 2**20 // 2,
            scratch_dir=Path(scratch_dir) / "slabs",
        )
        chunk_box = None if block is None else (block.chunk_start, block.chunk_stop)
        self.accumulator = ChunkAccumulator(
            plan,
            len(MODES) * n_out,
            weights,
            self._write_chunk,
            scratch_dir,
            max_bytes=config.cache_mb * 2**20,
            done_chunks=done_chunks,
            chunk_box=chunk_box,
            tiles=tiles,
        )

    def run(self, tiles: list[Tile]) -> Iterator[TileResult]:
        """Run ``tiles`` (in scan order); yield each one once it is stitched.

        Close the generator to stop early: the reader thread is stopped in every case.
        """
        config = self.config
        reader = TileReader(
            self.volume,
            self.plan,
            tiles,
            self.transform,
            depth=max(config.prefetch, self.eval_batch, config.train_batch),
        )
        pending: deque[TileWork] = deque()
        passes = Passes(
            self.model,
            self.eval_batch,
            config.train_batch,
            self.spatial_dims,
            self.device,
            self.timing,
            self.recorder,
            precision=config.precision,
            # Per-sample fused train batches pay off only on a GPU; on CPU one tile at a time.
            fuse_train=config.fuse_train and self.device.type == "cuda",
        )
        try:
            reader.start()
            for work in reader:
                pending.append(work)
                passes.run_ready(pending, final=False)
                yield from self._finish_ready(pending)
            passes.run_ready(pending, final=True)
            yield from self._finish_ready(pending)
        finally:
            reader.stop()
            self.timing.read += reader.seconds
            self.timing.read_wait += reader.waited

    def _finish_ready(self, pending: deque[TileWork]) -> Iterator[TileResult]:
        # Tiles are stitched in scan order: the blending arithmetic stays identical to MONAI's.
        while pending and len(pending[0].outputs) == len(MODES):
            work = pending.popleft()
            before = self.chunks_written
            # The tile's metrics (its own disparity, the pairs it completes) run on the metrics
            # thread while this one stitches it: both are NumPy work that releases the GIL.
            future = self._metrics_thread.submit(
                tile_record,
                work,
                self.plan,
                self.config,
                self.mismatch,
                self._metrics_timing,
                self.feature_layers,
            )
            self._stitch(work)
            t0 = time.perf_counter()
            record = future.result()
            self.timing.metrics += time.perf_counter() - t0
            if self.owns_tile(work.tile):
                self.records[record["index"]] = record
            else:
                record = None
            yield TileResult(work.tile, record, self.chunks_written - before)

    def owns_tile(self, tile: Tile) -> bool:
        """Whether this loop keeps ``tile``'s record: a block keeps those whose origin it holds."""
        return self.block is None or self.block.holds_voxel(tile.write_start)

    def owned_pair_sums(self) -> dict[str, dict]:
        """Pair sums (as :meth:`MismatchTracker.to_dict`) of the pairs this loop owns."""
        pairs = self.mismatch.to_dict()
        if self.block is None:
            return pairs
        owned = {}
        for key, sums in pairs.items():
            i, j = (int(v) for v in key.split(","))
            start, _ = self.mismatch.shared_box(j, i)
            if self.block.holds_voxel(start):
                owned[key] = sums
        return owned

    def _stitch(self, work: TileWork) -> None:
        t0 = time.perf_counter()
        before = self.timing.write + self.timing.write_wait + self.timing.metrics
        self.accumulator.add(work.tile, [work.outputs[m] for m in MODES])
        after = self.timing.write + self.timing.write_wait + self.timing.metrics
        self.timing.stitch += time.perf_counter() - t0 - (after - before)

    def _write_chunk(
        self, chunk: ChunkIndex, slices: tuple[slice, ...], values: np.ndarray
    ) -> None:
        # The chunk's activation, disparity sums and storage run on the writer thread, in chunk
        # completion order (the global sums add up in the same order as before), while this
        # thread stitches and predicts the next tiles.
        t0 = time.perf_counter()
        self._submit(self._finish_chunk, chunk, slices, values)
        self.chunks_written += 1
        self.timing.write += time.perf_counter() - t0

    def _finish_chunk(
        self, chunk: ChunkIndex, slices: tuple[slice, ...], values: np.ndarray
    ) -> None:
        t0 = time.perf_counter()
        stacked = values.reshape(len(MODES), self.n_out, *values.shape[1:])
        probabilities = activate(stacked, self.config.activation)
        self.chunk_sums[chunk] = self.disparity.add(probabilities[1], probabilities[0])
        self._store_chunk(slices, probabilities)
        self.timing.writer += time.perf_counter() - t0

    def _submit(self, job, *args) -> None:
        # Time blocked on a full queue is the run waiting for the writer thread.
        waited = self.writer.submit(job, *args)
        self.timing.write_wait += waited
        self.timing.write -= waited

    def write_after_pending(self, job, *args) -> None:
        """Run ``job(*args)`` on the writer thread once every write queued before it is done."""
        t0 = time.perf_counter()
        self._submit(job, *args)
        self.timing.write += time.perf_counter() - t0

    def _store_chunk(self, slices: tuple[slice, ...], probabilities: np.ndarray) -> None:
        # On the writer thread: compress and write (with the chunk's pyramid levels) while the
        # model predicts the next tiles.
        box = (slice(None), *slices)
        dtype = self.config.output_dtype

        def store_as(values: np.ndarray) -> np.ndarray:
            return to_output_dtype(values, dtype)

        for m, mode in enumerate(MODES):
            self.arrays[mode].write_chunk(box, probabilities[m], store_as)
        difference = np.abs(probabilities[1] - probabilities[0])
        self.arrays["disparity"].write_chunk(box, difference, store_as)

    def _write_seams(
        self, start: tuple[int, ...], stop: tuple[int, ...], difference: np.ndarray
    ) -> None:
        if self.block is not None:
            # A block writes only its own chunks; the other parts of this pair's box are written by
            # the blocks holding them, which run the same pair.
            lo = tuple(max(a, b) for a, b in zip(start, self.block.start))
            hi = tuple(min(a, b) for a, b in zip(stop, self.block.stop))
            if any(a >= b for a, b in zip(lo, hi)):
                return
            local = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
            difference = difference[(slice(None), slice(None), *local)]
            start, stop = lo, hi
        t0 = time.perf_counter()
        self._submit(self._store_seams, start, stop, difference)
        self.timing.write += time.perf_counter() - t0

    def _store_seams(
        self, start: tuple[int, ...], stop: tuple[int, ...], difference: np.ndarray
    ) -> None:
        t0 = time.perf_counter()
        self._store_seams_box(start, stop, difference)
        self.timing.writer += time.perf_counter() - t0

    def _store_seams_box(
        self, start: tuple[int, ...], stop: tuple[int, ...], difference: np.ndarray
    ) -> None:
        # The largest disagreement of any tile pair covering a voxel; max is idempotent on resume
        # and on a retried block. Jobs run in submission order, so read-modify-write is safe.
        roi_start = self.plan.roi_start
        box = (slice(None), *(slice(a - r, b - r) for a, b, r in zip(start, stop, roi_start)))
        dtype = self.config.output_dtype
        for m, mode in enumerate(MODES):
            seams = self.arrays[f"seams_{mode}"]
            current = seams[box].astype(np.float32)
            if dtype == "uint8":
                current = current / 255.0
            seams[box] = to_output_dtype(np.maximum(current, difference[m]), dtype)

    def flush(self) -> None:
        """Wait until every submitted chunk and seam is written (counted as ``write_wait``)."""
        t0 = time.perf_counter()
        self.writer.flush()
        self.timing.write_wait += time.perf_counter() - t0

    def close(self) -> None:
        """Finish pending writes, stop the writer and drop spilled partial chunks."""
        try:
            self._metrics_thread.shutdown(wait=True)
            self.writer.close()
        finally:
            self.accumulator.close()
