"""Run the two-mode check in one process: read each tile once, predict it in eval and in train mode.

:func:`run_check` is a generator of small progress events; the command line wraps it in a progress
bar and the napari widget in a ``thread_worker``. Stopping it between tiles (``close()`` or the
``cancel`` event) leaves a valid, incomplete OUT.zarr; the model is restored in every case.

The steps a distributed run shares with it live here too: :func:`prepare_run` fixes the plan,
:func:`open_outputs` creates (or reopens) OUT.zarr, :func:`finish_run` writes the tile grids, the
summary and the completion marker. The tile loop itself is
:class:`~napari_normcheck.core.run.tileloop.TileLoop`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.store import is_complete
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.run.events import RunFinished, RunStarted, TileDone
from napari_normcheck.core.run.faults import input_named, run_fault
from napari_normcheck.core.run.forward import probe_out_channels
from napari_normcheck.core.run.grid_shift import GridShift
from napari_normcheck.core.run.grids import tile_cell_transform
from napari_normcheck.core.run.leftovers import remove_block_records
from napari_normcheck.core.run.planning import precision_effect, prepare_run, resolve_eval_batch
from napari_normcheck.core.run.predictions import CHECK, Prediction, bind_predictions
from napari_normcheck.core.run.region import whole_train_batches
from napari_normcheck.core.run.runsteps import finish_run, open_outputs, run_attrs
from napari_normcheck.core.run.save_pacing import SavePacing
from napari_normcheck.core.run.support_summary import min_foreground_of
from napari_normcheck.core.run.tileloop import TileLoop
from napari_normcheck.core.run.timing import Timing


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
    predictions: Sequence[Prediction] = CHECK,
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
    predictions : sequence of Prediction
        What each tile gets: ``eval`` and ``train`` (:data:`~napari_normcheck.core.run.predictions.CHECK`),
        then any others (the remedies'), all in the same tile loop.

    Yields
    ------
    RunStarted, TileDone, RunFinished
        Progress events.
    """
    t_start = time.perf_counter()
    timing = Timing()
    with input_named(volume.source):  # the normalization samples the whole input
        setup = prepare_run(
            volume, config, spatial_dims=spatial_dims, divisor=divisor, transform=transform
        )
    plan, device = setup.plan, setup.device
    worker_model = model if device.type == "cpu" else copy.deepcopy(model).to(device)
    n_out = probe_out_channels(
        worker_model, volume.n_channels, plan.window_shape, setup.spatial_dims, device, divisor
    )
    setup = dataclasses.replace(setup, n_out=n_out)
    setup = resolve_eval_batch(
        setup, worker_model, volume, config, out, resume=resume, n_predictions=len(predictions)
    )
    effect = precision_effect(worker_model, volume, config, setup)
    names = tuple(p.name for p in predictions)
    attrs = run_attrs(volume, config, setup, extra_attrs, predictions=names)
    store, arrays = open_outputs(
        out, attrs, config, setup, volume, names, overwrite=overwrite, resume=resume
    )
    loop: TileLoop | None = None
    shift: GridShift | None = None
    try:
        progress = store.read_progress() if resume else {}
        bound = bind_predictions(worker_model, predictions, config)
        shift = (
            GridShift.open(store, config, setup, volume, names, progress, resume=resume)
            if config.grid_shift
            else None
        )
        loop = TileLoop(
            volume,
            setup,
            config,
            bound,
            arrays,
            timing,
            store.path / ".scratch",
            done_chunks={tuple(c) for c in progress.get("done_chunks", [])},
            grid_shift=shift.comparer if shift else None,
        )
        loop.load_progress(progress)
        pacing = SavePacing()

        def save_progress(via: TileLoop | None = None) -> None:
            # A snapshot taken now, written by the writer thread after the chunk writes queued
            # before it: a chunk is either listed and on disk, or recomputed. The run does not
            # wait for it. ``via``: the shifted grid's loop while it runs (its chunks are the
            # ones being written).
            def write(snapshot: dict) -> None:
                # On the writer thread: the chunks listed are summed by now, and no later one is.
                store.write_progress(snapshot | loop.chunk_progress())

            pacing.save(
                lambda: loop.progress() | (shift.progress() if shift else {}),
                write,
                (via or loop).write_after_pending,
            )

        def save_if_due(via: TileLoop | None = None) -> None:
            if pacing.due():
                save_progress(via)

        timing.setup = time.perf_counter() - t_start
        t_event = time.perf_counter()
        yield RunStarted(out=Path(out), plan=plan, device=str(device), eval_batch=setup.eval_batch)
        timing.events += time.perf_counter() - t_event
        needed = {t.index for t in plan.tiles() if loop.accumulator.needs(t)}
        # A pair's mismatch is computed when its later tile runs, from the earlier tile's
        # overlap slab.
        needed |= {j for i in list(needed) for j in loop.mismatch.missing_partners(i)}
        needed = whole_train_batches(needed, config.train_batch, plan.n_tiles)
        tiles = [plan.get_tile(i) for i in sorted(needed)]
        try:
            if shift is not None:
                # The shifted grid first: the main grid's chunks are compared with it as they
                # finish.
                yield from shift.run(
                    volume,
                    config,
                    bound,
                    timing,
                    store.path / ".scratch" / "grid_shift",
                    n_main=len(tiles),
                    t_start=t_start,
                    save=save_if_due,
                    cancel=cancel,
                )
                shift.close()
                if cancel is not None and cancel.is_set():
                    return
            n_before = shift.n_run if shift else 0
            with contextlib.closing(loop.run(tiles)) as results:
                for n_done, result in enumerate(results, start=n_before + 1):
                    save_if_due()
                    t_event = time.perf_counter()
                    yield TileDone(
                        result.tile,
                        n_done,
                        len(tiles) + n_before,
                        t_event - t_start,
                        result.chunks_written,
                        result.record or {},
                    )
                    timing.events += time.perf_counter() - t_event
                    if cancel is not None and cancel.is_set():
                        return
            loop.flush()
            shifted = (
                shift.finish(
                    store,
                    loop.records,
                    tile_cell_transform(plan, tuple(volume.scale), volume.translation),
                    min_foreground_of(config.to_dict()),
                )
                if shift
                else {}
            )
            final_path, summary = finish_run(
                store,
                volume,
                setup,
                loop.sums(),
                out=out,
                timing=timing,
                before_marker=loop.flush,
                extra_summary=({"precision_effect": effect} if effect else {}) | shifted or None,
                run_started=t_start,
            )
            remove_block_records(final_path)  # a distributed run's, when this one resumed it
            store.release_lock()  # complete: a caller keeping this generator blocks no other run
            yield RunFinished(out=final_path, summary=summary)
        finally:
            # A failed write must not be listed as done: then the progress is not saved at all.
            if shift is not None:
                with contextlib.suppress(Exception):
                    shift.close()  # its pending chunk writes land before the progress lists them
            with contextlib.suppress(Exception):
                if not is_complete(store.path):
                    save_progress()
            with contextlib.suppress(Exception):
                loop.close()
    except Exception as error:
        # One line for the user, the traceback in OUT's error log; the progress saved above.
        remaining = None if loop is None else _remaining_bytes(arrays, loop)
        fault = run_fault(error, out=out, store_path=store.path, remaining_bytes=remaining)
        if fault is error:
            raise
        raise fault from error
    finally:
        store.release_lock()


def _remaining_bytes(arrays: dict[str, Any], loop: TileLoop) -> int:
    """At most how many bytes the output chunks not yet written take (uncompressed)."""
    total = sum(a.nbytes for pyramid in arrays.values() for a in pyramid.arrays)
    n_chunks = int(np.prod(loop.plan.chunk_grid))
    left = 1.0 - len(loop.accumulator.done_chunks) / max(n_chunks, 1)
    return int(total * max(left, 0.0))
