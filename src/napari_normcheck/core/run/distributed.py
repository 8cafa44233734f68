"""Run the two-mode check on a dask.distributed cluster, with results equal to a single-process run.

The client fixes the global tile plan, creates OUT.zarr and splits the output chunk grid into blocks
(:mod:`~napari_normcheck.core.run.blocks`). One task per block (``client.map`` with retries) runs every
tile touching the block, in global tile order, and writes only the block's chunks; the model is
loaded once per worker by a worker plugin (:mod:`~napari_normcheck.core.run.blocktask`). Each finished
block records its metric sums, and the client adds them in the single-process order, so the outputs,
the tile grids and the summary equal :func:`~napari_normcheck.core.run.engine.run_check`'s.

Faults: a worker that dies has its blocks rerun elsewhere (chunks are overwritten whole and seams
are a maximum, so a rerun changes nothing). A run stopped at any point (cancel, a killed client)
continues with ``resume=True``: blocks recorded in the manifest are kept, the others run again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError, WorkerError, first_line
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.measure.metrics import DisparityAccumulator
from napari_normcheck.core.measure.mismatch import MismatchTracker
from napari_normcheck.core.models.modelspec import ModelSpec
from napari_normcheck.core.run.blocks import (
    Block,
    border_tiles,
    chunk_completion_order,
    chunk_key,
    default_block_chunks,
    plan_blocks,
    rerun_fraction,
    tile_owners,
)
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import BlockDone, RunFinished, RunStarted, TileDone
from napari_normcheck.core.run.faults import input_named, run_fault
from napari_normcheck.core.run.forward import probe_out_channels, resolve_device
from napari_normcheck.core.run.grid_shift import GridShift
from napari_normcheck.core.run.grids import tile_cell_transform
from napari_normcheck.core.run.leftovers import remove_block_records
from napari_normcheck.core.run.manifest import (
    config_hash,
    read_block_records,
    read_manifest,
    write_manifest,
)
from napari_normcheck.core.run.planning import prepare_run
from napari_normcheck.core.run.predictions import (
    CHECK,
    Prediction,
    bind_predictions,
    make_recorder,
)
from napari_normcheck.core.run.runsetup import RunSetup
from napari_normcheck.core.run.runsteps import finish_run, open_outputs, run_attrs
from napari_normcheck.core.run.sums import RunSums
from napari_normcheck.core.run.support_summary import min_foreground_of
from napari_normcheck.core.run.timing import Timing

CPU = torch.device("cpu")


@contextlib.contextmanager
def open_client(
    scheduler: str | None = None, n_workers: int | None = None, client: Any = None
) -> Iterator[Any]:
    """A dask.distributed client: the given one, one connected to ``scheduler``, or a local cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``): any deployment (a workstation,
        dask-jobqueue, dask-cuda's ``LocalCUDACluster``).
    n_workers : int, optional
        Start a :class:`distributed.LocalCluster` of this many worker processes with one thread
        each; it is closed on exit.
    client : distributed.Client, optional
        Use this client (not closed on exit).

    Yields
    ------
    distributed.Client
    """
    from distributed import Client

    if client is not None:
        yield client
        return
    if scheduler:
        try:
            connected = Client(scheduler, timeout="20s")
        except OSError as error:
            raise NormcheckError(
                f"cannot reach the dask scheduler at {scheduler} ({error}); check the address "
                "(e.g. tcp://host:8786) and that the scheduler is running"
            ) from None
        with connected:
            yield connected
        return
    if not n_workers or n_workers < 1:
        raise NormcheckError("give a scheduler address or a number of workers (at least 1)")
    cluster = local_cluster(n_workers, silence_logs=logging.ERROR)
    try:
        with Client(cluster) as local_client:
            yield local_client
    finally:
        cluster.close()


def local_cluster(n_workers: int, **kwargs: Any) -> Any:
    """A :class:`distributed.LocalCluster` of worker processes with one thread each.

    dask starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory goes back
    to the system at once. Setting it stops glibc from adapting its mmap threshold: every large
    array of every tile (the forwards' activations, the blending buffers) is then mapped and
    faulted in anew, and the forwards of a worker took 1.3-1.6x as long as in one process. Our
    workers reuse memory of the same sizes tile after tile, so they keep glibc's default (a value
    the user sets in the environment is still inherited).

    Parameters
    ----------
    n_workers : int
        Worker processes.
    **kwargs
        More :class:`~distributed.LocalCluster` arguments (``silence_logs``, ...).

    Returns
    -------
    distributed.LocalCluster
        Close it when done.
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            **kwargs,
        )


def run_check_distributed(
    volume: Volume,
    model: nn.Module,
    config: RunConfig,
    out: str | Path,
    *,
    model_spec: ModelSpec,
    scheduler: str | None = None,
    n_workers: int | None = None,
    client: Any = None,
    volume_source: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    spatial_dims: int | None = None,
    divisor: tuple[int, ...] | int | None = None,
    transform: IntensityTransform | None = None,
    cancel: threading.Event | None = None,
    extra_attrs: dict[str, Any] | None = None,
    block_chunks: tuple[int, int, int] | None = None,
    retries: int = 2,
    predictions: Sequence[Prediction] = CHECK,
    share_forwards: bool = True,
) -> Iterator[RunStarted | TileDone | BlockDone | RunFinished]:
    """Run the two-mode check on a dask.distributed cluster, writing what one process would.

    Parameters
    ----------
    volume : Volume
        The input (the client reads only what the intensity normalization needs).
    model : torch.nn.Module
        The client's copy of the model, used only to probe its outputs and describe its feature
        layers; it is not changed.
    config : RunConfig
        The run's settings (as for :func:`~napari_normcheck.core.run.engine.run_check`).
    out : path-like
        The OUT.zarr to write, on a file system every worker can write.
    model_spec : ModelSpec
        How workers load the model (:meth:`ModelSpec.from_loaded` for a model file).
    scheduler, n_workers, client
        The cluster (see :func:`open_client`); exactly one is needed.
    volume_source : dict, optional
        Keyword arguments of :func:`~napari_normcheck.core.io.volume.open_volume` with which workers
        reopen the input (a path every worker can read). Without it the volume object is sent to
        each worker once (fine for in-memory data of a napari layer).
    overwrite, resume, spatial_dims, divisor, transform, extra_attrs
        As for :func:`~napari_normcheck.core.run.engine.run_check`.
    cancel : threading.Event, optional
        Set it to stop: no further blocks start; blocks already finished stay recorded for resume.
    block_chunks : tuple of int, optional
        Output chunks per block along ``(z, y, x)``; by default one slab per worker thread
        (:func:`~napari_normcheck.core.run.blocks.default_block_chunks`).
        A resumed run keeps the interrupted run's blocks.
    retries : int
        How often a failing block is retried (a worker dying is handled by the scheduler as well).
    predictions : sequence of Prediction
        As for :func:`~napari_normcheck.core.run.engine.run_check`; their variants are built on
        each worker (they pickle).
    share_forwards : bool
        Predict each tile on a block border once, in the first block to get to it, and share its
        predictions with the other blocks that run it through a folder in OUT
        (:mod:`~napari_normcheck.core.run.shared_forwards`); the same bits as predicting it in
        each. Only with train batches of one tile (tiles of a batch share batch statistics).

    Yields
    ------
    RunStarted, TileDone, BlockDone, RunFinished
        ``TileDone`` for each tile of a finished block (with its metrics), then ``BlockDone``.
    """
    # Imported here: a single-process run through run_events does not import dask.distributed.
    from distributed import Event

    from napari_normcheck.core.run.blocktask import (
        BlockContext,
        RunPlugin,
        progress_topic,
        run_block_task,
        stop_event_name,
    )

    t_start = time.perf_counter()
    try:
        device = resolve_device(config.device)
    except NormcheckError:  # the client need not have the workers' GPUs
        device = CPU
    with input_named(volume.source):  # the normalization samples the whole input
        setup = prepare_run(
            volume,
            config,
            spatial_dims=spatial_dims,
            divisor=divisor,
            transform=transform,
            device=device,
        )
    plan = setup.plan
    recorder = make_recorder(model, config)
    n_out = probe_out_channels(
        model, volume.n_channels, plan.window_shape, setup.spatial_dims, CPU, divisor
    )
    setup = dataclasses.replace(setup, n_out=n_out)
    names = tuple(p.name for p in predictions)
    attrs = run_attrs(volume, config, setup, extra_attrs, str(device), predictions=names)
    store, _ = open_outputs(
        out, attrs, config, setup, volume, names, overwrite=overwrite, resume=resume
    )
    try:
        shift = (
            GridShift.open(
                store,
                config,
                setup,
                volume,
                names,
                store.read_progress() if resume else {},
                resume=resume,
            )
            if config.grid_shift
            else None
        )
        with open_client(scheduler, n_workers, client) as dask_client:
            n_threads = max(1, sum(dask_client.nthreads().values()))
            manifest = read_manifest(store.path) if resume else None
            if manifest is not None:
                block_chunks = tuple(manifest["block_chunks"])  # type: ignore[assignment]
            # Border tiles are predicted once and shared, where each tile's forward is its own.
            sharing = share_forwards and config.train_batch == 1
            block_chunks = block_chunks or default_block_chunks(plan, n_threads, shared=sharing)
            digest = config_hash(attrs, block_chunks)
            if manifest is not None and manifest["config_hash"] != digest:
                raise NormcheckError(
                    f"cannot resume {out}: it was run with other settings or another model; "
                    "use the interrupted run's options, or start again with --overwrite"
                )
            if manifest is None:
                write_manifest(store.path, digest, block_chunks)
            finished = read_block_records(store.path, digest) if manifest is not None else {}
            blocks = plan_blocks(plan, block_chunks)
            needed_by = border_tiles(plan, blocks) if sharing else {}
            for stale in Path(store.path, ".scratch").glob("shared-*"):
                shutil.rmtree(stale, ignore_errors=True)  # an interrupted run's
            context = BlockContext(
                key=f"{digest[:16]}-{uuid.uuid4().hex[:8]}",
                model=model_spec,
                volume=None if volume_source else volume,
                volume_source=_absolute_source(volume_source),
                config=config,
                plan=plan,
                transform=setup.transform,
                spatial_dims=setup.spatial_dims,
                n_out=n_out,
                store_path=str(Path(store.path).resolve()),
                config_hash=digest,
                predictions=tuple(predictions),
                needed_by=needed_by,
            )
            plugin = RunPlugin(context)
            futures: dict[Any, Block] = {}
            complete = False
            tile_records: queue.Queue = queue.Queue()
            topic = progress_topic(context.key)
            try:
                # Handlers run on the client's event loop thread: hand records over through a queue.
                dask_client.subscribe_topic(
                    topic, lambda event: tile_records.put(event[1]["record"])
                )
                dask_client.register_plugin(plugin)
                owners = tile_owners(plan, block_chunks)
                todo = [b for b in blocks if b.index not in finished]
                todo_indices = {b.index for b in todo}
                n_total = int(sum(1 for o in owners if int(o) in todo_indices))
                yield RunStarted(
                    out=Path(out),
                    plan=plan,
                    device=f"dask cluster, {n_threads} worker thread(s), {len(blocks)} blocks",
                    eval_batch=setup.eval_batch,
                )
                if shift is not None:
                    # The shifted grid first, in this process (the blocks compare their chunks
                    # with it).
                    client_model = (
                        model if device.type == "cpu" else copy.deepcopy(model).to(device)
                    )
                    yield from shift.run_alone(
                        volume,
                        config,
                        bind_predictions(client_model, predictions, config),
                        store,
                        n_main=n_total,
                        t_start=t_start,
                        cancel=cancel,
                    )
                    if cancel is not None and cancel.is_set():
                        return
                n_shift = shift.n_run if shift else 0
                submitted = dask_client.map(
                    run_block_task, todo, run_key=context.key, retries=retries, pure=False
                )
                futures = dict(zip(submitted, todo))
                reported: set[int] = set()
                for block, result in _completed(futures, cancel, tile_records):
                    elapsed = time.perf_counter() - t_start
                    records = [result] if block is None else list(result["records"].values())
                    # A tile is reported once: live from its block, or with the block's result (a
                    # lost message, a retried block).
                    for record in sorted(records, key=lambda r: r["index"]):
                        if record["index"] not in reported:
                            reported.add(record["index"])
                            tile = plan.get_tile(record["index"])
                            yield TileDone(
                                tile,
                                len(reported) + n_shift,
                                n_total + n_shift,
                                elapsed,
                                0,
                                record,
                            )
                    if block is None:
                        continue
                    finished[block.index] = result
                    yield BlockDone(
                        block.index,
                        len(finished) - (len(blocks) - len(todo)),
                        len(todo),
                        elapsed,
                        int(result["tiles_run"]),
                        str(result.get("worker", "")),
                    )
                if cancel is not None and cancel.is_set():
                    return
                complete = True
            finally:
                if not complete:
                    # Running blocks cannot be interrupted by the scheduler: they poll this event.
                    with contextlib.suppress(Exception):
                        Event(stop_event_name(context.key), client=dask_client).set()
                if futures:
                    with contextlib.suppress(Exception):
                        dask_client.cancel(list(futures))
                with contextlib.suppress(Exception):
                    dask_client.unregister_worker_plugin(plugin.name)
                with contextlib.suppress(Exception):
                    dask_client.unsubscribe_topic(topic)
        tiles_run = int(sum(r["tiles_run"] for r in finished.values()))
        final_path, summary = _finish(
            store, volume, config, setup, names, finished, recorder, out, t_start, shift
        )
        summary["distributed"] = {
            "n_blocks": len(blocks),
            "block_chunks": list(block_chunks),
            "worker_threads": n_threads,
            # Forwards run: a border tile is predicted in one block and shared with the others
            # (with train batches of several tiles, in every block it touches).
            "tiles_run": tiles_run,
            "tiles_shared": len(needed_by),
            "tiles_not_received": int(
                sum(r.get("tiles_not_received", 0) for r in finished.values())
            ),
            "rerun_fraction": round(tiles_run / plan.n_tiles - 1.0, 6),
            # What blocks that do not share would run twice.
            "layout_rerun_fraction": rerun_fraction(plan, block_chunks, config.train_batch),
        }
        remove_block_records(final_path)
        shutil.rmtree(
            final_path / ".scratch", ignore_errors=True
        )  # emptied spill folders of blocks
        store.release_lock()
        yield RunFinished(out=final_path, summary=summary)
    except Exception as error:
        # One line for the user, the traceback in OUT's error log; finished blocks stay recorded.
        fault = run_fault(error, out=out, store_path=store.path)
        if fault is error:
            raise
        raise fault from error
    finally:
        store.release_lock()


def _absolute_source(volume_source: dict[str, Any] | None) -> dict[str, Any] | None:
    """``volume_source`` with a relative path made absolute (workers have their own directory)."""
    if not volume_source or not isinstance(volume_source.get("source"), (str, os.PathLike)):
        return volume_source
    path = Path(volume_source["source"])
    return volume_source | {"source": str(path.resolve())} if path.exists() else volume_source


def _completed(
    futures: dict[Any, Block], cancel: threading.Event | None, tile_records: queue.Queue
) -> Iterator[tuple[Block | None, dict[str, Any]]]:
    """Finished tiles ``(None, record)`` and blocks ``(block, result)`` as they come, until cancel.

    Blocks finishing together come lowest index first.
    """
    from distributed import KilledWorker, wait

    pending = set(futures)
    while pending:
        if cancel is not None and cancel.is_set():
            return
        with contextlib.suppress(queue.Empty):
            while True:
                yield None, tile_records.get_nowait()
        try:
            done, pending = wait(pending, timeout=0.25, return_when="FIRST_COMPLETED")
        except TimeoutError:
            continue
        for future in sorted(done, key=lambda f: futures[f].index):
            try:
                result = future.result()
            except KilledWorker:
                raise WorkerError(
                    f"block {futures[future].index} was lost with its worker several times (a "
                    "worker keeps dying, e.g. out of memory); use smaller tiles or more memory "
                    "per worker, then --resume"
                ) from None
            except NormcheckError:  # said where it happened (an input region, OUT)
                raise
            except Exception as error:
                block = futures[future]
                box = ", ".join(f"{a} {b}:{c}" for a, b, c in zip("zyx", block.start, block.stop))
                raise WorkerError(
                    f"block {block.index} ({box}) failed on a worker: {first_line(error)}; fix "
                    "the cause on the workers (their memory, disk, access to the input and "
                    "OUT), then rerun with --resume (finished blocks are kept)"
                ) from error
            yield futures[future], result


def _finish(
    store: Any,
    volume: Volume,
    config: RunConfig,
    setup: RunSetup,
    names: tuple[str, ...],
    finished: dict[int, dict[str, Any]],
    recorder: Any,
    out: str | Path,
    t_start: float,
    shift: GridShift | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Merge the blocks' sums in single-process order and write the grids, summary and marker."""
    plan, n_out = setup.plan, setup.n_out
    records: dict[int, dict[str, Any]] = {}
    pair_sums: dict[str, dict] = {}
    chunk_sums: dict[str, dict] = {}
    timing = Timing()
    spilled = 0
    for index in sorted(finished):
        result = finished[index]
        records.update({int(k): v for k, v in result["records"].items()})
        pair_sums.update(result["pair_sums"])
        chunk_sums.update(result["chunk_sums"])
        timing.add(result["timing"])
        spilled += int(result["spilled_chunks"])
    n_chunks = int(np.prod(plan.chunk_grid))
    if len(records) != plan.n_tiles or len(chunk_sums) != n_chunks:
        raise RuntimeError(
            f"blocks returned {len(records)} of {plan.n_tiles} tiles and {len(chunk_sums)} of "
            f"{n_chunks} chunks (a block planning bug)"
        )
    mismatch = MismatchTracker(plan, n_out, config.threshold, names=names)
    if len(pair_sums) != mismatch.n_pairs:
        raise RuntimeError(
            f"blocks returned {len(pair_sums)} of {mismatch.n_pairs} tile pairs (a planning bug)"
        )
    keys = {tuple(int(v) for v in key.split(",")) for key in pair_sums}
    mismatch.load({f"{i},{j}": pair_sums[f"{i},{j}"] for i, j in mismatch.scan_order(keys)})
    argmax = config.activation == "softmax"
    disparity = {
        name: DisparityAccumulator(n_out, config.threshold, argmax=argmax)
        for name in names
        if name != "train"
    }
    for chunk in chunk_completion_order(plan):
        sums = chunk_sums[chunk_key(chunk)]
        for name, accumulator in disparity.items():
            accumulator.add_sums(
                {kind: np.asarray(v, dtype=np.float64) for kind, v in sums[name].items()}
            )
    extra = None
    if shift is not None:
        for index in sorted(finished):
            shift.comparer.load(finished[index].get("grid_shift_sums", {}))
        extra = shift.finish(
            store,
            records,
            tile_cell_transform(plan, tuple(volume.scale), volume.translation),
            min_foreground_of(config.to_dict()),
        )
    timing.total = time.perf_counter() - t_start
    sums = RunSums(records, mismatch, disparity, recorder.layers if recorder else [], spilled)
    return finish_run(store, volume, setup, sums, out=out, timing=timing, extra_summary=extra)


def run_events(
    volume: Volume,
    loaded: Any,
    config: RunConfig,
    out: str | Path,
    *,
    scheduler: str | None = None,
    n_workers: int | None = None,
    volume_source: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    **kwargs: Any,
) -> Iterator[RunStarted | TileDone | BlockDone | RunFinished]:
    """The events of a run of a loaded model: in this process, or on a cluster when one is named.

    The command line's and the widget's one entry point: with neither ``scheduler`` nor
    ``n_workers`` it is :func:`~napari_normcheck.core.run.engine.run_check`; otherwise
    :func:`run_check_distributed` with workers loading the same model file.

    Parameters
    ----------
    volume : Volume
        The input.
    loaded : LoadedModel
        From :func:`~napari_normcheck.core.models.models.load_model`.
    config : RunConfig
        The run's settings.
    out : path-like
        The OUT.zarr.
    scheduler : str, optional
        Address of a running dask scheduler.
    n_workers : int, optional
        Start a local cluster of this many one-thread worker processes.
    volume_source : dict, optional
        How workers reopen the input (see :func:`run_check_distributed`).
    trust_pickle : bool
        The user allowed pickled objects (bioimage.io packages with pickled weights).
    **kwargs
        ``overwrite``, ``resume``, ``spatial_dims``, ``divisor``, ``cancel``, ``extra_attrs``, ...

    Returns
    -------
    iterator of events
    """
    if scheduler and n_workers:
        raise NormcheckError("give a scheduler address or a number of workers, not both")
    if n_workers is not None and n_workers < 1:
        raise NormcheckError(f"the number of workers must be at least 1, not {n_workers}")
    if not scheduler and not n_workers:
        return run_check(volume, loaded.module, config, out, **kwargs)
    return run_check_distributed(
        volume,
        loaded.module,
        config,
        out,
        model_spec=ModelSpec.from_loaded(loaded, trust_pickle=trust_pickle),
        scheduler=scheduler,
        n_workers=n_workers,
        volume_source=volume_source,
        **kwargs,
    )
