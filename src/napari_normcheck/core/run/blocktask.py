"""The worker side of a distributed run: the model loaded once per worker, and one task per block.

A :class:`RunPlugin` (a dask.distributed ``WorkerPlugin``) carries a :class:`BlockContext` to every
worker, including workers that join or restart later; its ``setup`` loads the model from its
:class:`~napari_normcheck.core.models.modelspec.ModelSpec` (a file the worker can read, never a pickled
user module unless asked for explicitly) and opens the volume and OUT.zarr once.
:func:`run_block_task` then runs one block with the shared
:class:`~napari_normcheck.core.run.tileloop.TileLoop`, writes the block's chunks, records the block in
the manifest and returns its metric sums.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.tiling import TilePlan
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.store import OutputStore
from napari_normcheck.core.io.volume import Volume, open_volume
from napari_normcheck.core.models.modelspec import ModelSpec
from napari_normcheck.core.run.blocks import Block, block_tiles, chunk_key
from napari_normcheck.core.run.forward import resolve_device
from napari_normcheck.core.run.grid_shift import open_comparer
from napari_normcheck.core.run.manifest import write_block_record
from napari_normcheck.core.run.predictions import (
    CHECK,
    BoundPrediction,
    Prediction,
    bind_predictions,
)
from napari_normcheck.core.run.runsetup import RunSetup
from napari_normcheck.core.run.runsteps import output_arrays
from napari_normcheck.core.run.shared_forwards import SharedForwards
from napari_normcheck.core.run.tileloop import TileLoop
from napari_normcheck.core.run.timing import Timing


@dataclass(frozen=True)
class BlockContext:
    """Everything the blocks of one run share; sent once per worker with the plugin.

    Attributes
    ----------
    key : str
        Unique name of this run (plugin name and worker cache key).
    model : ModelSpec
        How to load the model.
    volume : Volume or None
        The input itself (in-memory data), or ``None`` when ``volume_source`` reopens it.
    volume_source : dict or None
        Keyword arguments of :func:`~napari_normcheck.core.io.volume.open_volume` (``source`` first).
    config : RunConfig
        The run's settings.
    plan : TilePlan
        The global tile plan.
    transform : IntensityTransform
        Input normalization, estimated once by the client.
    spatial_dims : int
        2 or 3.
    n_out : int
        Output channels.
    store_path : str
        The OUT.zarr folder being written (shared by all workers).
    config_hash : str
        Tag of the block records.
    predictions : tuple of Prediction
        What each tile gets (the check's two, and the remedies' when asked for).
    needed_by : dict of int to tuple of int
        For each tile that several blocks run (on their borders), those blocks; its forwards are
        shared between them (:mod:`~napari_normcheck.core.run.shared_forwards`). Empty: each
        block predicts every tile it runs (train batches of several tiles).
    """

    key: str
    model: ModelSpec
    volume: Volume | None
    volume_source: dict[str, Any] | None
    config: RunConfig
    plan: TilePlan
    transform: IntensityTransform
    spatial_dims: int
    n_out: int
    store_path: str
    config_hash: str
    predictions: tuple[Prediction, ...] = CHECK
    needed_by: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def shared_folder(self) -> Path:
        """Where this run's blocks share the forwards of their border tiles."""
        return Path(self.store_path) / ".scratch" / f"shared-{self.key}"


# Runs set up in this worker process, by run key (a process may serve several runs in turn).
_RUNS: dict[str, WorkerRun] = {}


class RunPlugin(WorkerPlugin):
    """Loads the model and opens the data of one run on every worker, once."""

    def __init__(self, context: BlockContext) -> None:
        self.context = context
        self.name = f"napari-normcheck-{context.key}"

    def setup(self, worker: Any) -> None:
        """Load the model (once per worker process) and open the volume and outputs."""
        _RUNS[self.context.key] = WorkerRun(self.context)

    def teardown(self, worker: Any) -> None:
        """Forget the run (blocks still running keep their own reference)."""
        _RUNS.pop(self.context.key, None)


class WorkerRun:
    """One run on one worker process: its model copies, data and outputs."""

    def __init__(self, context: BlockContext) -> None:
        self.context = context
        self.device = resolve_device(context.config.device)
        model = context.model.load()
        self._base = model if self.device.type == "cpu" else model.to(self.device)
        self._models: dict[int, list[BoundPrediction]] = {}
        self._lock = threading.Lock()
        self.volume = context.volume or open_volume(**(context.volume_source or {}))
        store_path = Path(context.store_path)
        names = tuple(p.name for p in context.predictions)
        self.store = OutputStore(store_path, store_path)
        self.arrays = output_arrays(self.store, names, context.config)
        config = context.config
        self.setup = RunSetup(
            context.plan,
            context.spatial_dims,
            self.device,
            config.eval_batch or (4 if self.device.type == "cuda" else 1),
            context.transform,
            context.n_out,
        )

    def predictions_for_thread(self) -> list[BoundPrediction]:
        """Models per worker thread: normalization modes switch module state during forwards."""
        ident = threading.get_ident()
        with self._lock:
            if ident not in self._models:
                model = self._base if not self._models else copy.deepcopy(self._base)
                self._models[ident] = bind_predictions(
                    model, self.context.predictions, self.context.config
                )
            return self._models[ident]

    def run_block(self, block: Block, worker: Any = None) -> dict[str, Any]:
        """Run every tile touching ``block``, write its chunks, record it; return its sums.

        With a dask ``worker``, each owned tile's record is also sent to the client as it finishes
        (an event on :func:`progress_topic`), for live progress; the block's result repeats them.
        """
        t_start = time.perf_counter()
        context, plan = self.context, self.context.plan
        timing = Timing()
        tiles = block_tiles(plan, block, context.config.train_batch)
        names = tuple(p.name for p in context.predictions)
        shift = (
            open_comparer(self.store, plan, context.config, names, context.n_out)
            if context.config.grid_shift
            else None
        )
        stopped = _stop_signal(context.key)
        shared = (
            SharedForwards(
                context.shared_folder,
                block.index,
                context.needed_by,
                self.device,
                names,
                stopped=stopped,
            )
            if context.needed_by
            else None
        )
        loop = TileLoop(
            self.volume,
            self.setup,
            context.config,
            self.predictions_for_thread(),
            self.arrays,
            timing,
            Path(context.store_path) / ".scratch" / f"block_{block.index}",
            region=block,
            tiles=tiles,
            grid_shift=shift,
            shared=shared,
        )
        try:
            with contextlib.closing(loop.run([plan.get_tile(i) for i in tiles])) as results:
                for result in results:
                    if worker is not None and result.record is not None:
                        worker.log_event(progress_topic(context.key), {"record": result.record})
                    if stopped():
                        raise BlockStopped(f"block {block.index}: the run was stopped")
            loop.flush()  # the block is recorded only once its chunks are on disk
            if shared is not None:
                shared.flush()
        finally:
            loop.close()
            if shared is not None:
                shared.close()
        if not loop.accumulator.complete:
            raise RuntimeError(f"block {block.index} left chunks unfinished (a planning bug)")
        timing.total = time.perf_counter() - t_start
        record = {
            "config_hash": context.config_hash,
            "block": block.index,
            "chunk_sums": {
                chunk_key(c): {
                    name: {k: v.tolist() for k, v in kinds.items()} for name, kinds in sums.items()
                }
                for c, sums in loop.chunk_sums.items()
            },
            "pair_sums": loop.owned_pair_sums(),
            "records": {str(k): v for k, v in loop.records.items()},
            "timing": timing.to_dict(),
            "spilled_chunks": loop.accumulator.spill_count,
            # Forwards run here: the border tiles received from other blocks are not counted.
            "tiles_run": len(tiles) - (shared.received if shared else 0),
            "tiles_received": shared.received if shared else 0,
            # Border tiles whose claimant did not share them in time (it died or stopped).
            "tiles_not_received": shared.predicted_after_wait if shared else 0,
            "worker": getattr(worker, "address", ""),
            **({"grid_shift_sums": shift.to_dict()} if shift is not None else {}),
        }
        write_block_record(context.store_path, record)
        return record


class BlockStopped(Exception):
    """A block abandoned because its run was stopped (it is not recorded, so a resume reruns it)."""


def progress_topic(run_key: str) -> str:
    """Event topic on which a run's blocks report finished tiles."""
    return f"napari-normcheck-progress-{run_key}"


def stop_event_name(run_key: str) -> str:
    """Name of the dask ``Event`` that tells a run's running blocks to stop."""
    return f"napari-normcheck-stop-{run_key}"


def _stop_signal(run_key: str, every: float = 1.0):
    """A cheap check of the run's stop event: asks the scheduler at most every ``every`` seconds."""
    from distributed import Event

    event = Event(stop_event_name(run_key))
    last = time.perf_counter()

    def stopped() -> bool:
        nonlocal last
        now = time.perf_counter()
        if now - last < every:
            return False
        last = now
        return event.is_set()

    return stopped


def run_block_task(block: Block, run_key: str) -> dict[str, Any]:
    """The task of one block, run on a worker that has the run's plugin.

    Parameters
    ----------
    block : Block
        The block to run.
    run_key : str
        :attr:`BlockContext.key` of the run.

    Returns
    -------
    dict
        The block's record (also written to the manifest folder).
    """
    from distributed import get_worker

    run = _RUNS.get(run_key)
    if run is None:
        raise RuntimeError(f"napari-normcheck run {run_key} is not set up on this worker")
    return run.run_block(block, worker=get_worker())
