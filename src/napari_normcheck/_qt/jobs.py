"""What the widget's worker threads run: model loading and the two-mode check (no Qt here).

Both are generators, so :func:`napari.qt.threading.thread_worker` hands every item to the GUI thread.
A :class:`~napari_normcheck.core.errors.NormcheckError` is yielded as a :class:`JobError` (shown as a
notification), never raised into napari's traceback dialog.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_normcheck.core.errors import NormcheckError


@dataclass(frozen=True)
class ModelRequest:
    """What identifies a model to load (the widget reloads only when this changes)."""

    path: str
    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False


@dataclass(frozen=True)
class ModelReady:
    """A model was loaded and inventoried."""

    request: ModelRequest
    loaded: Any
    inventory: Any


@dataclass(frozen=True)
class JobError:
    """A user-readable error that ended the job."""

    message: str


@dataclass
class RunRequest:
    """Everything a run needs besides the model."""

    volume: Any
    config: Any
    out: Path
    overwrite: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    resume: bool = False


def load(request: ModelRequest) -> ModelReady:
    """Load and inventory the model of ``request`` (raises :class:`NormcheckError`)."""
    from napari_normcheck.core.inventory import norm_inventory
    from napari_normcheck.core.models import load_model

    if not request.path:
        raise NormcheckError("choose a model file first")
    loaded = load_model(
        request.path,
        arch=request.arch or None,
        arch_kwargs=request.arch_kwargs or None,
        trust_pickle=request.trust_pickle,
    )
    return ModelReady(request, loaded, norm_inventory(loaded.module))


def load_job(request: ModelRequest) -> Iterator[ModelReady | JobError]:
    """Worker body: load a model."""
    try:
        yield load(request)
    except NormcheckError as error:
        yield JobError(str(error))


def run_job(run: RunRequest, model: ModelRequest, ready: ModelReady | None) -> Iterator[Any]:
    """Worker body: load the model when needed, check it fits the volume, then run the check.

    Parameters
    ----------
    run : RunRequest
        Volume, configuration, output and the cancel event.
    model : ModelRequest
        The model to use.
    ready : ModelReady, optional
        The model already loaded for ``model`` (reused when its request matches).

    Yields
    ------
    ModelReady, RunStarted, TileDone, RunFinished or JobError
        Progress items for the GUI thread.
    """
    from napari_normcheck.core.engine import run_check

    try:
        if ready is None or ready.request != model:
            ready = load(model)
            yield ready
        loaded = ready.loaded
        if not loaded.switchable:
            raise NormcheckError(
                loaded.not_switchable_reason or "the model's normalization mode is fixed"
            )
        info = loaded.info
        if run.volume.n_channels != info.in_channels:
            raise NormcheckError(
                f"the image has {run.volume.n_channels} channel(s) but the model expects "
                f"{info.in_channels}; pick the matching image layer"
            )
        config = run.config.replace(spatial_dims=info.spatial_dims)
        yield from run_check(
            run.volume,
            loaded.module,
            config,
            run.out,
            overwrite=run.overwrite,
            resume=run.resume,
            spatial_dims=info.spatial_dims,
            divisor=info.divisor,
            cancel=run.cancel,
            extra_attrs={
                "model": {
                    "path": str(loaded.path),
                    "sha256": loaded.sha256,
                    "format": loaded.format,
                },
                "norm_layers": ready.inventory.to_dict(),
            },
        )
    except NormcheckError as error:
        yield JobError(str(error))
