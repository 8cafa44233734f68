"""What the Tile size view's worker thread runs: the sweep over tile settings (no Qt here).

The same rows and recommendation as ``napari-normcheck sweep``
(:mod:`napari_normcheck.core.run.sweep`): each setting runs the check into its own OUT under the
sweep folder, on the same voxels; a setting the network or the memory does not take is a refused
row and the sweep goes on. A generator, so that napari's ``thread_worker`` hands every item to the
GUI thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_normcheck._qt.jobs import JobError, ModelReady, ModelRequest, load
from napari_normcheck.core.base.errors import NormcheckError


@dataclass(frozen=True)
class SweepProgress:
    """A tile of setting ``n`` (1-based, of ``n_settings``) finished."""

    n: int
    n_settings: int
    name: str
    tiles_done: int
    tiles_total: int


@dataclass(frozen=True)
class SweepRowDone:
    """A setting's row (:func:`~napari_normcheck.core.run.sweep.sweep_row` or refused)."""

    row: dict[str, Any]


@dataclass(frozen=True)
class SweepDone:
    """Every row and the recommendation (:func:`~napari_normcheck.core.run.sweep.recommend`)."""

    rows: list[dict[str, Any]]
    recommendation: dict[str, Any]


@dataclass
class SweepRequest:
    """The sweep's input, base settings and folder; ``cancel`` stops after the current tile."""

    volume: Any
    config: Any
    settings: Sequence[Any]
    folder: Path
    model: ModelRequest
    ready: ModelReady | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


def sweep_job(request: SweepRequest) -> Iterator[Any]:
    """Worker body: run every setting; yields progress, rows, then :class:`SweepDone`.

    A :class:`NormcheckError` that concerns the whole sweep (no model, a fixed normalization) is
    yielded as a :class:`JobError`; one of a setting makes that setting's refused row.
    """
    import zarr

    from napari_normcheck.core.models.inventory import norm_inventory
    from napari_normcheck.core.run.distributed import run_events
    from napari_normcheck.core.run.events import RunFinished, TileDone
    from napari_normcheck.core.run.report import build_report
    from napari_normcheck.core.run.sweep import peak_rss_mib, recommend, refused_row, sweep_row

    try:
        ready = request.ready
        if ready is None or ready.request != request.model:
            ready = load(request.model)
            yield ready
        loaded = ready.loaded
        if not loaded.switchable:
            raise NormcheckError(
                loaded.not_switchable_reason or "the model's normalization mode is fixed"
            )
    except NormcheckError as error:
        yield JobError(str(error))
        return
    info = loaded.info
    request.folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for n, setting in enumerate(request.settings, start=1):
        if request.cancel.is_set():
            break
        out = request.folder / setting.name
        config = setting.config(request.config).replace(spatial_dims=info.spatial_dims)
        summary = None
        try:
            with peak_rss_mib() as memory:
                for event in run_events(
                    request.volume,
                    loaded,
                    config,
                    out,
                    overwrite=True,
                    spatial_dims=info.spatial_dims,
                    divisor=info.divisor,
                    cancel=request.cancel,
                ):
                    if isinstance(event, TileDone):
                        yield SweepProgress(
                            n, len(request.settings), setting.name, event.n_done, event.n_total
                        )
                    elif isinstance(event, RunFinished):
                        summary = event.summary
        except (NormcheckError, MemoryError) as error:
            row = refused_row(setting, str(error) or type(error).__name__)
        else:
            if summary is None:  # cancelled
                break
            attrs = dict(zarr.open_group(str(out), mode="r").attrs["normcheck"])
            row = sweep_row(
                setting, build_report(summary, attrs), out=out, peak_memory_mib=memory["peak"]
            )
        rows.append(row)
        yield SweepRowDone(row)
    per_tile = [
        layer.type for layer in norm_inventory(loaded.module).layers if not layer.running_stats
    ]
    yield SweepDone(rows, recommend(rows, per_tile_norms=per_tile))
