"""What the widget's worker threads run: model loading and the two-mode check (no Qt here).

Both are generators, so :func:`napari.qt.threading.thread_worker` hands every item to the GUI thread.
A :class:`~napari_normcheck.core.base.errors.NormcheckError` is yielded as a :class:`JobError` (shown as a
notification), never raised into napari's traceback dialog.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_normcheck.core.base.errors import NormcheckError


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


@dataclass(frozen=True)
class PrepareLayers:
    """The run's outputs, known before they exist: the GUI adds their layers while the run waits.

    Attributes
    ----------
    n_channels : int
        Output channels of the model.
    shape : tuple of int
        ``(Z, Y, X)`` of the outputs (the region).
    scale, translation : tuple of float
        Their voxel size and the world position of the region's first voxel.
    params : dict
        The run configuration (``activation`` and ``output_dtype`` set the contrast limits).
    plan : TilePlan or None
        The tiles the engine will plan from the same settings (``None`` when they are invalid: the
        engine then reports why); the engine's own plan, in ``RunStarted``, is the one that counts.
    """

    n_channels: int
    shape: tuple[int, ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...]
    params: dict[str, Any]
    plan: Any = None


#: Longest wait for the GUI to add the result layers before the run starts anyway (seconds).
LAYERS_WAIT_S = 20.0


@dataclass
class RunRequest:
    """Everything a run needs besides the model.

    ``layers_ready`` is set by the GUI once the result layers exist (see :class:`PrepareLayers`);
    set from the start, the run does not wait.
    """

    volume: Any
    config: Any
    out: Path
    overwrite: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    resume: bool = False
    layers_ready: threading.Event = field(default_factory=threading.Event)
    scheduler: str | None = None


def output_channel_names(loaded: Any) -> list[str] | None:
    """The model's output channel names when it names them (bioimage.io packages), else ``None``."""
    names = getattr(loaded, "output_channel_names", None) or getattr(loaded, "channel_names", None)
    out_channels = getattr(getattr(loaded, "info", None), "out_channels", None)
    if isinstance(names, (list, tuple)) and names and len(names) == out_channels:
        return [str(name) for name in names]
    return None


def load(request: ModelRequest) -> ModelReady:
    """Load and inventory the model of ``request`` (raises :class:`NormcheckError`)."""
    from napari_normcheck.core.models.inventory import norm_inventory
    from napari_normcheck.core.models.models import load_model

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


def prepare_layers(
    run: RunRequest, config: Any, n_channels: int, divisor: Any = None
) -> PrepareLayers:
    """Where the run's voxel outputs will be: the chosen region of the volume, in world space."""
    shape = tuple(int(n) for n in run.volume.spatial_shape)
    roi = config.roi or tuple((0, n) for n in shape)
    scale = tuple(float(v) for v in run.volume.scale)
    start = tuple(int(a) for a, _b in roi)
    translation = tuple(float(t) + a * s for t, a, s in zip(run.volume.translation, start, scale))
    return PrepareLayers(
        n_channels=int(n_channels),
        shape=tuple(int(b) - int(a) for a, b in roi),
        scale=scale,
        translation=translation,
        params=config.to_dict(),
        plan=expected_plan(shape, config, divisor),
    )


def expected_plan(shape: tuple[int, ...], config: Any, divisor: Any = None) -> Any:
    """The tile plan of ``config`` on a volume of ``shape``, as the engine makes it, or ``None``.

    Only used to outline the tiles before the run starts (a Shapes layer of many tiles takes
    seconds to build); the engine's own plan, in ``RunStarted``, is the one that counts.
    """
    from napari_normcheck.core.run.planning import plan_run_tiles

    try:
        return plan_run_tiles(shape, config, config.spatial_dims or 3, divisor)
    except (NormcheckError, ValueError):
        return None  # the engine reports the problem when the run starts


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
    ModelReady, PrepareLayers, RunStarted, TileDone, RunFinished or JobError
        Progress items for the GUI thread.
    """
    from napari_normcheck.core.run.distributed import run_events

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
        yield prepare_layers(run, config, info.out_channels, info.divisor)
        # Adding a napari layer costs the GUI thread ~0.1 s, and more while the engine competes
        # for the CPU and the GIL: the layers are added before the engine starts.
        deadline = time.monotonic() + LAYERS_WAIT_S
        while not run.layers_ready.wait(0.05):
            if run.cancel.is_set() or time.monotonic() > deadline:
                break
        # In this process, or on the dask cluster of ``run.scheduler`` (the layer's data travels
        # to the workers once; the model file is loaded there).
        yield from run_events(
            run.volume,
            loaded,
            config,
            run.out,
            scheduler=run.scheduler or None,
            trust_pickle=model.trust_pickle,
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
                    # The output channels' names (a bioimage.io package's), for the layers.
                    "channel_names": output_channel_names(loaded),
                    **info.recorded_outputs(),
                },
                "norm_layers": ready.inventory.to_dict(),
            },
        )
    except NormcheckError as error:
        yield JobError(str(error))
