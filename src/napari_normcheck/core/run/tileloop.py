"""The one tile loop: read each tile once, run every named prediction on it, stitch, record.

:class:`TileLoop` owns the per-run state that tiles feed: the blending accumulator, global disparity
sums, pairwise mismatch sums, per-tile records and the background writer of finished chunks and
seams. It serves the single-process check, a distributed block (the block's tiles and box: it then
writes only chunks inside the box and keeps records only of the tiles the block owns) and the
remedies alike (:mod:`~napari_normcheck.core.run.predictions`); what it writes and records is what
the registry lists for its predictions (:mod:`~napari_normcheck.core.run.registry`).

Data flow (memory depends on tile size and tiles in flight only):
reader thread (lazy read + intensity normalization + padding) -> each prediction's forwards in
batches -> :class:`~napari_normcheck.core.run.stitch.ChunkAccumulator` -> finished chunks (writer
thread) -> activation, disparity sums, registry outputs -> zarr.

Predictions stay on the run's device: they are blended there, activated there (the finished chunks
on the writer thread, each tile's prediction box on the metrics thread), and cross to the host once,
activated (:class:`~napari_normcheck.core.run.staging.HostCopies`). On a GPU a tile's metrics
(Dice sums, overlap slabs, pair sums) run there as well and only their sums cross
(:data:`METRICS_ON_DEVICE`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.scratch import ScratchBuffer
from napari_normcheck.core.base.tiling import Tile
from napari_normcheck.core.io.pyramid import write_all
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.io.writer import BackgroundWriter
from napari_normcheck.core.measure.labels import stored_probabilities
from napari_normcheck.core.measure.metrics import DisparityAccumulator
from napari_normcheck.core.measure.mismatch import MismatchTracker
from napari_normcheck.core.run.forward import activate_tensor, to_output_dtype
from napari_normcheck.core.run.grids import tile_record
from napari_normcheck.core.run.heap import HeapTrimmer
from napari_normcheck.core.run.passes import Passes
from napari_normcheck.core.run.predictions import BoundPrediction
from napari_normcheck.core.run.region import ChunkIndex, ChunkRegion
from napari_normcheck.core.run.registry import tile_metrics_of, voxel_outputs
from napari_normcheck.core.run.runsetup import RunSetup
from napari_normcheck.core.run.staging import HostCopies
from napari_normcheck.core.run.stitch import ChunkAccumulator, importance_map
from napari_normcheck.core.run.sums import RunSums
from napari_normcheck.core.run.threads import intra_op_threads
from napari_normcheck.core.run.tile_io import ForwardExchange, TileReader, TileWork
from napari_normcheck.core.run.timing import Timing


@dataclass(frozen=True)
class TileResult:
    """A stitched tile: its record (``None`` if another block owns it) and chunks it finished."""

    tile: Tile
    record: dict[str, Any] | None
    chunks_written: int


#: Where a tile's metrics run (its Dice sums, the overlap slabs and pair sums): on the run's device
#: (``True``), on the host's copy of its activated prediction (``False``), or on a CUDA device and
#: else on the host (``None``: on the CPU NumPy's kernels sum faster than torch's, with the same bits;
#: other accelerators may lack the float64 the sums need).
METRICS_ON_DEVICE: bool | None = None

#: Tiles whose metrics may still run on the metrics thread while the next tiles are read,
#: predicted and stitched: the metrics of one tile then overlap the next tile's forwards instead
#: of holding them up. One tile's outputs more in memory.
METRICS_IN_FLIGHT = 1

#: Tiles predicted ahead while the next tile to stitch is another loop's, not yet published
#: (:mod:`~napari_normcheck.core.run.shared_forwards`); then the loop waits for it.
SHARED_LOOKAHEAD = 2


@dataclass
class _Stitched:
    """A tile stitched on this thread whose record the metrics thread computes (or computed)."""

    tile: Tile
    future: Future
    chunks_written: int
    record: dict[str, Any] | None = None
    done: bool = False


class TileLoop:
    """Predict tiles with every named prediction and feed every output of a run (or of a block).

    Parameters
    ----------
    volume : Volume
        The input.
    setup : RunSetup
        The plan, device, eval batch, input normalization and output channels of the run.
    config : RunConfig
        The run's settings.
    predictions : sequence of BoundPrediction
        What each tile gets (``eval`` and ``train``, and the remedies'), with their models on the
        device; model states are restored after every forward.
    arrays : dict
        Output pyramids by group name (``pred_eval``, ``disparity``, ``seams_eval``, ...), those of
        :func:`~napari_normcheck.core.run.registry.voxel_outputs` for these predictions.
    timing : Timing
        Seconds per stage, added to.
    scratch_dir : path-like
        Spill folder of the blending accumulator and the overlap slabs.
    region : ChunkRegion, optional
        Restrict writes to this box's chunks and records to the tiles and pairs it owns (a
        distributed block's).
    tiles : list of int, optional
        The tiles that will run (a block's); defaults to all tiles.
    done_chunks : set of ChunkIndex, optional
        Chunks finished by an interrupted run (single-process resume).
    reference : Pyramid, optional
        A stored ``train`` prediction to compare with when ``train`` is not among the predictions
        (the remedies of a finished check).
    grid_shift : ShiftComparer, optional
        Compares each finished chunk with the shifted grid's prediction (``--grid-shift``; a
        :class:`~napari_normcheck.core.run.grid_shift.ShiftComparer`, typed loosely because that
        module builds on this one).
    shared : ForwardExchange, optional
        Tiles that other loops run too (a distributed block's border tiles) are predicted once:
        here when this loop claims them first, else received from the loop that did
        (:class:`~napari_normcheck.core.run.shared_forwards.SharedForwards`).
    """

    def __init__(
        self,
        volume: Volume,
        setup: RunSetup,
        config: RunConfig,
        predictions: Sequence[BoundPrediction],
        arrays: dict[str, Any],
        timing: Timing,
        scratch_dir: str | Path,
        *,
        region: ChunkRegion | None = None,
        tiles: list[int] | None = None,
        done_chunks: set[ChunkIndex] | None = None,
        reference: Any = None,
        grid_shift: Any = None,
        shared: ForwardExchange | None = None,
    ) -> None:
        self.volume = volume
        self.setup = setup
        self.plan = plan = setup.plan
        self.config = config
        self.predictions = list(predictions)
        self.names = tuple(p.name for p in self.predictions)
        self.arrays = arrays
        self.n_out = n_out = setup.n_out
        self.timing = timing
        self.region = region
        self.reference = reference
        self.grid_shift = grid_shift
        self.shared = shared
        recorder = next((p.recorder for p in self.predictions if p.recorder), None)
        self.feature_layers = recorder.layers if recorder else []
        self.outputs = voxel_outputs(self.names, config)
        self.tile_metrics = tile_metrics_of(self.names)
        self.writer = BackgroundWriter()
        self.host = HostCopies(setup.device)
        on_device = METRICS_ON_DEVICE
        self.metrics_on_device = setup.device.type == "cuda" if on_device is None else on_device
        self._metrics_thread = ThreadPoolExecutor(1, thread_name_prefix="normcheck-metrics")
        self._metrics_scratch = ScratchBuffer()  # used on the metrics thread only
        self._writer_scratch = ScratchBuffer()  # used on the writer thread only
        self._metrics_timing = Timing()  # the metrics thread's own seconds (overlap stitching)
        self.records: dict[int, dict[str, Any]] = {}
        self._in_flight: deque[_Stitched] = deque()
        self.chunk_sums: dict[ChunkIndex, dict[str, dict[str, np.ndarray]]] = {}
        self.chunks_written = 0
        argmax = config.activation == "softmax"
        # Every prediction but train against train, chunk by chunk: eval's is the disparity.
        compared = "train" in self.names or reference is not None
        self.disparity = {
            name: DisparityAccumulator(n_out, config.threshold, argmax=argmax)
            for name in self.names
            if name != "train" and compared
        }
        seams = any(o.compute is None for o in self.outputs)
        self.mismatch = MismatchTracker(
            plan,
            n_out,
            config.threshold,
            on_pair=self._write_seams if seams else None,
            tiles=tiles,
            # Slabs pending for later neighbours: half the chunk cache again, then to disk.
            max_slab_bytes=config.cache_mb * 2**20 // 2,
            scratch_dir=Path(scratch_dir) / "slabs",
            names=self.names,
        )
        chunk_box = None if region is None else (region.chunk_start, region.chunk_stop)
        self.accumulator = ChunkAccumulator(
            plan,
            len(self.names) * n_out,
            importance_map(plan.window_shape, plan.blend, setup.spatial_dims),
            self._write_chunk,
            scratch_dir,
            max_bytes=config.cache_mb * 2**20,
            done_chunks=done_chunks,
            chunk_box=chunk_box,
            tiles=tiles,
            device=setup.device,
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
            self.setup.transform,
            depth=max(config.prefetch, self.setup.eval_batch, config.train_batch),
        )
        pending: deque[TileWork] = deque()
        device = self.setup.device
        passes = Passes(
            self.predictions,
            self.setup.eval_batch,
            config.train_batch,
            self.setup.spatial_dims,
            device,
            self.timing,
            precision=config.precision,
            # Per-sample fused train batches pay off only on a GPU; on CPU one tile at a time.
            fuse_train=config.fuse_train and device.type == "cuda",
        )
        # torch's intra-op threads (--threads) for the forwards and the per-voxel work, and the
        # process setting back when the loop ends.
        heap = HeapTrimmer()
        with intra_op_threads(config.threads):
            try:
                reader.start()
                for work in reader:
                    if self.shared is not None and not self.shared.claim(work.tile.index):
                        work.external = True  # another loop predicts it
                    pending.append(work)
                    self._predict(passes, pending, final=False)
                    yield from self._finish_ready(pending, passes)
                    heap.tick()
                self._predict(passes, pending, final=True)
                yield from self._finish_ready(pending, passes, in_flight=0)
            finally:
                reader.stop()
                self.timing.read += reader.seconds
                self.timing.read_wait += reader.waited
                self.timing.trim += heap.seconds

    def _predict(self, passes: Passes, pending: deque[TileWork], *, final: bool) -> None:
        """Forwards of the pending tiles; the shared ones this loop claimed are published."""
        t0 = time.perf_counter()
        passes.run_ready(pending, final=final)
        if self.shared is None:
            return
        self.shared.longest_forward = max(self.shared.longest_forward, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for work in pending:
            if not work.external and not work.published and len(work.outputs) == len(self.names):
                self.shared.publish(work)
                work.published = True
        self.timing.shared_wait += time.perf_counter() - t0

    def _predicted(self, pending: deque[TileWork], passes: Passes, final: bool) -> bool:
        """Whether the next tile to stitch has every prediction (received, if another loop's)."""
        work = pending[0]
        if len(work.outputs) == len(self.names):
            return True
        if not work.external:
            return False
        # Another loop's tile: the next tiles are predicted meanwhile, up to a few, then wait.
        shared = self.shared
        if not shared.ready(work):
            if not (final or len(pending) > SHARED_LOOKAHEAD):
                return False
            # Before waiting, the tiles this loop claimed are predicted and shared even in a
            # partial batch: the other loop may be waiting for one of them (a deadlock else).
            self._predict(passes, pending, final=True)
        t0 = time.perf_counter()
        received = shared.receive(work)
        self.timing.shared_wait += time.perf_counter() - t0
        if not received:  # it did not come: predicted here, and shared from here
            work.external = False
            self._predict(passes, deque([work]), final=True)
        return True

    def _finish_ready(
        self, pending: deque[TileWork], passes: Passes, in_flight: int = METRICS_IN_FLIGHT
    ) -> Iterator[TileResult]:
        # Tiles are stitched in scan order: the blending arithmetic stays identical to MONAI's.
        final = in_flight == 0
        while pending and self._predicted(pending, passes, final):
            work = pending.popleft()
            before = self.chunks_written
            # The tile's metrics (its own disparity, the pairs it completes) run on the metrics
            # thread while this one stitches it and goes on to the next tiles: both are NumPy
            # work that releases the GIL. One thread, in scan order: the pair sums add up as
            # before.
            future = self._metrics_thread.submit(
                tile_record,
                work,
                self.plan,
                self.config,
                self.mismatch,
                self._metrics_timing,
                self.feature_layers,
                self.tile_metrics,
                None if self.metrics_on_device else self.host,
                self._metrics_scratch,
            )
            self._stitch(work)
            self._in_flight.append(_Stitched(work.tile, future, self.chunks_written - before))
            while len(self._in_flight) > in_flight:
                yield self._result(self._in_flight.popleft())
        while len(self._in_flight) > in_flight:
            yield self._result(self._in_flight.popleft())

    def _settle(self, stitched: _Stitched) -> None:
        """Wait for a stitched tile's metrics; keep its record (when this loop owns the tile)."""
        if stitched.done:
            return
        t0 = time.perf_counter()
        record = stitched.future.result()
        self.timing.metrics += time.perf_counter() - t0
        stitched.done = True
        if self.owns_tile(stitched.tile):
            self.records[record["index"]] = record
            stitched.record = record

    def _result(self, stitched: _Stitched) -> TileResult:
        self._settle(stitched)
        return TileResult(stitched.tile, stitched.record, stitched.chunks_written)

    def _settle_all(self) -> None:
        """Every stitched tile's metrics done: records and pair sums match the chunks stitched."""
        for stitched in self._in_flight:
            self._settle(stitched)

    def sums(self) -> RunSums:
        """The records and sums the tiles fed so far (what :func:`finish_run` writes)."""
        self._settle_all()
        return RunSums(
            self.records,
            self.mismatch,
            self.disparity,
            self.feature_layers,
            self.accumulator.spill_count,
        )

    def progress(self) -> dict[str, Any]:
        """A resumable snapshot: finished chunks, pair sums and records.

        The metrics of tiles stitched so far are waited for first, so that the records and pair
        sums are those of every tile whose chunks are listed (a resumed run reruns no tile whose
        chunks are finished). The chunks' disparity sums are added on the writer thread
        (:meth:`chunk_progress`).
        """
        self._settle_all()
        return {
            "done_chunks": sorted(self.accumulator.done_chunks),
            "pair_sums": self.mismatch.to_dict(),
            "tiles": {str(k): v for k, v in self.records.items()},
        }

    def chunk_progress(self) -> dict[str, Any]:
        """The disparity sums of the chunks written so far (call it on the writer thread)."""
        sums = {name: acc.to_dict() for name, acc in self.disparity.items()}
        shift = {} if self.grid_shift is None else {"grid_shift_sums": self.grid_shift.to_dict()}
        return {"disparity_sums": sums.pop("eval", {}), "prediction_sums": sums, **shift}

    def load_progress(self, progress: dict[str, Any]) -> None:
        """Continue from a snapshot of :meth:`progress` and :meth:`chunk_progress`."""
        sums = {"eval": progress.get("disparity_sums", {}), **progress.get("prediction_sums", {})}
        for name, accumulator in self.disparity.items():
            accumulator.load(sums.get(name, {}))
        self.mismatch.load(progress.get("pair_sums", {}))
        self.records.update({int(k): v for k, v in progress.get("tiles", {}).items()})
        if self.grid_shift is not None:
            self.grid_shift.load(progress.get("grid_shift_sums", {}))

    def owns_tile(self, tile: Tile) -> bool:
        """Whether this loop keeps ``tile``'s record: a region keeps those whose origin it holds."""
        return self.region is None or self.region.holds_voxel(tile.write_start)

    def owned_pair_sums(self) -> dict[str, dict]:
        """Pair sums (as :meth:`MismatchTracker.to_dict`) of the pairs this loop owns."""
        pairs = self.mismatch.to_dict()
        if self.region is None:
            return pairs
        owned = {}
        for key, sums in pairs.items():
            i, j = (int(v) for v in key.split(","))
            start, _ = self.mismatch.shared_box(j, i)
            if self.region.holds_voxel(start):
                owned[key] = sums
        return owned

    def _stitch(self, work: TileWork) -> None:
        t0 = time.perf_counter()
        before = self.timing.write + self.timing.write_wait + self.timing.metrics
        spilled = self.accumulator.spill_seconds
        self.accumulator.add(work.tile, [work.outputs[name] for name in self.names])
        after = self.timing.write + self.timing.write_wait + self.timing.metrics
        spill = self.accumulator.spill_seconds - spilled
        self.timing.spill += spill
        self.timing.stitch += time.perf_counter() - t0 - (after - before) - spill

    def _write_chunk(
        self, chunk: ChunkIndex, slices: tuple[slice, ...], values: torch.Tensor
    ) -> None:
        # The chunk's activation, disparity sums and storage run on the writer thread, in chunk
        # completion order (the global sums add up in the same order as before), while this
        # thread stitches and predicts the next tiles.
        t0 = time.perf_counter()
        self._submit(self._finish_chunk, chunk, slices, values)
        self.chunks_written += 1
        self.timing.write += time.perf_counter() - t0

    def _finish_chunk(
        self, chunk: ChunkIndex, slices: tuple[slice, ...], values: torch.Tensor
    ) -> None:
        t0 = time.perf_counter()
        # Activated, summed, converted and downsampled on the device; what crosses to the host is
        # each output's stored values (uint8 by default). The shifted grid and a stored train
        # prediction are read on the host, so with those the chunk crosses once, activated.
        stacked = values.reshape(len(self.names), self.n_out, *values.shape[1:])
        # The chunk's blended values are this job's alone: a sigmoid overwrites them.
        activated = activate_tensor(stacked, self.config.activation, in_place=True)
        if self.grid_shift is not None or (self.disparity and "train" not in self.names):
            activated = self.host.to_host(activated)
        probabilities = dict(zip(self.names, activated))
        if self.grid_shift is not None:
            probabilities |= self.grid_shift.add_chunk(chunk, slices, probabilities)
        compared = probabilities
        if self.disparity and "train" not in probabilities:
            # Against a stored train prediction: compared as stored, both of them.
            stored = self.reference.arrays[0][(slice(None), *slices)]
            compared = {
                name: stored_probabilities(to_output_dtype(p, self.config.output_dtype))
                for name, p in probabilities.items()
            }
            compared["train"] = stored_probabilities(np.asarray(stored))
        self.chunk_sums[chunk] = {
            name: accumulator.add(compared["train"], compared[name])
            for name, accumulator in self.disparity.items()
        }
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

    def _store_chunk(self, slices: tuple[slice, ...], probabilities: dict[str, Any]) -> None:
        # On the writer thread: compress and write (with the chunk's pyramid levels) while the
        # model predicts the next tiles.
        box = (slice(None), *slices)
        dtype = self.config.output_dtype

        def store_as(values: Any) -> np.ndarray:
            # Converted where the values are; only the stored dtype crosses to the host.
            stored = to_output_dtype(values, dtype, self._writer_scratch)
            return stored if isinstance(stored, np.ndarray) else self.host.to_host(stored)

        writes = []
        for output in self.outputs:
            # An output without an array here is not this loop's to write (the shifted grid's).
            if output.compute is not None and output.name in self.arrays:
                pyramid = self.arrays[output.name]
                writes += pyramid.chunk_writes(box, output.compute(probabilities), store_as)
        write_all(writes)

    def _write_seams(
        self, start: tuple[int, ...], stop: tuple[int, ...], difference: np.ndarray
    ) -> None:
        if self.region is not None:
            # A region writes only its own chunks; the other parts of this pair's box are written
            # by the regions holding them, which run the same pair.
            lo = tuple(max(a, b) for a, b in zip(start, self.region.start))
            hi = tuple(min(a, b) for a, b in zip(stop, self.region.stop))
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
        for m, name in enumerate(self.names):
            seams = self.arrays.get(f"seams_{name}")
            if seams is None:
                continue
            current = seams[box].astype(np.float32)
            if dtype == "uint8":
                current = current / 255.0
            seams[box] = to_output_dtype(np.maximum(current, difference[m]), dtype)

    def flush(self) -> None:
        """Wait until every submitted chunk and seam is written (counted as ``write_wait``)."""
        t0 = time.perf_counter()
        self.writer.flush()
        self.timing.write_wait += time.perf_counter() - t0
        # Every tile's metrics have finished (each tile waits for its own): the count is final.
        self.timing.slab_spill = self.mismatch.slab_spill_seconds

    def close(self) -> None:
        """Finish pending writes, stop the writer and drop spilled partial chunks."""
        try:
            self._metrics_thread.shutdown(wait=True)
            self.writer.close()
        finally:
            self._metrics_scratch.release()
            self._writer_scratch.release()
            self.mismatch.close()
            self.accumulator.close()
