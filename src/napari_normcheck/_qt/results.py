"""The result layers of a run in the viewer: added while the run starts, refreshed while tiles finish.

The GUI thread must never wait on the store (a zarr read waits on the GIL the engine holds, and a
layer appears only after napari built its controls and visual). So:

- reading is done off the GUI thread: the layer descriptions (zarr metadata) and, for a refresh,
  the slices the visible layers show (:meth:`napari_normcheck._arrays.LiveChannel.read_ahead`);
- the GUI work is cut in steps, one per event-loop turn (:mod:`napari_normcheck._qt.steps`):
  each new layer is one step, so the viewer draws and answers input between two layers.

One layer per output shows one output channel; choosing another re-points the same layers
(:mod:`~napari_normcheck._qt.channel_choice`). No dock widget here: :class:`ResultLayers` only
talks to the viewer (reads in :mod:`~napari_normcheck._qt.reader_thread`, tile outlines in
:mod:`~napari_normcheck._qt.tile_outlines`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal  # noqa: TID253 (the Qt layer)

from napari_normcheck import _layers
from napari_normcheck._arrays import EmptyChannel, LiveChannel
from napari_normcheck._qt import layer_data
from napari_normcheck._qt.channel_choice import ChannelChoice
from napari_normcheck._qt.glyphs import glyph_warmup_steps
from napari_normcheck._qt.layer_data import output_of as _output
from napari_normcheck._qt.reader_thread import ReaderThread
from napari_normcheck._qt.steps import STEP_MS, StepQueue, step
from napari_normcheck._qt.tile_outlines import TileOutlines


@dataclass
class StoreRead:
    """What an off-thread read of the store found (no napari objects: built in a worker thread)."""

    path: Path
    tuples: list[_layers.LayerDataTuple]
    tile_values: np.ndarray | None
    feature_grid: tuple | None = None
    #: Per tile, whether the shown channel's hard disparity is judged (from the store's grids).
    tile_judged: np.ndarray | None = None


class ResultLayers(ChannelChoice, TileOutlines, QObject):
    """The image and tile-outline layers of the current run.

    Parameters
    ----------
    viewer : napari.Viewer
        Where the layers live.

    Attributes
    ----------
    plan : TilePlan or None
        The tiles of the current run.
    store_path : Path or None
        The store the layers read (``OUT.zarr.inprogress`` while a run overwrites an output).
    run_out : Path or None
        Where the run's output ends up.
    layers : dict
        Image layers by output group (kept, and re-pointed, across runs and channels).
    channel : int
        The output channel the layers show.
    channel_labels : list of str
        The output channels' names (``c0``, ``c1``, ... unless the model names them).
    tiles_layer : napari.layers.Shapes or None
        The outlines of the tiles' write boxes.
    steps : StepQueue
        GUI work waiting for its event-loop turn.

    Signals
    -------
    settled
        Emitted when no read is in flight and no step is queued.
    """

    settled = Signal()

    def __init__(self, viewer: Any) -> None:
        super().__init__()
        self.viewer = viewer
        self.plan: Any = None
        self.input_scale: tuple[float, ...] = (1.0, 1.0, 1.0)
        self.input_translate: tuple[float, ...] = (0.0, 0.0, 0.0)
        self.prefix = ""
        self.channel = 0
        self.channel_labels: list[str] = []
        self.layers: dict[str, Any] = {}
        self.tiles_layer: Any = None
        self.feature_layer: Any = None
        self.store_path: Path | None = None
        self.run_out: Path | None = None
        self.steps = StepQueue(self)
        self._reads = ReaderThread(delivered=self._maybe_settled)
        self.steps.drained.connect(self._maybe_settled)
        self._refreshing = False
        self._refresh_pending = False
        self._pending_values: np.ndarray | None = None
        self._synchronous = False  # show(): every step now, on the calling thread
        self._placeholders = []

    # --- state ----------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A read is in flight or GUI steps wait."""
        return self._reads.in_flight > 0 or len(self.steps) > 0

    def _maybe_settled(self) -> None:
        if not self.busy:
            self.settled.emit()

    def _off_thread(
        self,
        function: Callable[[], Any],
        done: Callable[[Any], None],
        finished: Callable[[], None] | None = None,
    ) -> None:
        """Run ``function`` in the reader thread, then ``done(result)`` (``ReaderThread.submit``)."""
        self._reads.submit(function, done, finished)

    # --- reading the store (any thread) -----------------------------------------------------------

    def _candidates(self, path: Path) -> list[Path]:
        return [path] + ([self.run_out] if self.run_out not in (None, path) else [])

    def read_store(
        self, path: Path, names: tuple[str, ...] | None = None, features: bool = False
    ) -> StoreRead | None:
        """Layer data and per-tile disparity from ``path``, or from the run's final output.

        ``names``: the outputs to read; those the widget shows
        (:func:`~napari_normcheck._layers.widget_outputs`) by default.

        A run that overwrites an earlier output renames its ``.inprogress`` folder when it completes,
        which may happen before the store is read. Safe to call from a worker thread.
        """
        for candidate in self._candidates(Path(path)):
            fallback = self.run_out if self.run_out != candidate else None
            try:
                tuples = _layers.image_layers(
                    candidate,
                    names if names is not None else _layers.widget_outputs(),
                    self.channel,
                    fallback,
                    self.channel_labels or None,
                )
                plan = self.plan
                values = judged = None
                if plan is not None:
                    values = _layers.tile_disparity_values(candidate, plan, self.channel)
                    judged = _layers.tile_judged_values(candidate, plan, self.channel)
            except (FileNotFoundError, KeyError):
                continue
            grid = _layers.feature_z_grid(candidate) if features else None
            return StoreRead(candidate, tuples, values, grid, judged)
        return None

    # --- the run's phases -------------------------------------------------------------------------

    def new_run(self) -> None:
        """A run was started: the previous run's pending GUI steps and reads are dropped."""
        self._reads.run_id += 1
        self.steps.clear()
        self.reveal_tiles()  # (its step was just dropped)
        self._refreshing = self._refresh_pending = False
        self.store_path = None
        self.tile_judged = None  # the earlier run's flags
        self._placeholders: list[Any] = []  # layers added for this run before its store existed

    def prepare(self, layout: Any, prefix: str, ready: threading.Event) -> None:
        """Add the run's voxel-output layers (all zero) and an empty tiles layer, then set ``ready``.

        Called before the engine starts (it waits for ``ready``): each new layer is one GUI step
        that does not compete with the engine. Layers that exist already are kept (re-pointed when
        the store exists).

        Parameters
        ----------
        layout : PrepareLayers
            Shape, placement and channels of the outputs.
        prefix : str
            Start of the layer names (the input layer's name).
        ready : threading.Event
            Set when the layers exist.
        """
        self.prefix = prefix
        labels = self.labels_for(layout.n_channels)
        channel = min(self.channel, layout.n_channels - 1)
        tuples = _layers.placeholder_layers(
            _layers.widget_voxel_outputs(layout.params),
            layout.n_channels,
            channel,
            labels,
            layout.shape,
            layout.scale,
            layout.translation,
            layout.params,
        )
        if layout.plan is not None:
            tuples += _layers.placeholder_grid_layers(
                layout.plan, channel, labels, layout.scale, self.input_translate, layout.params
            )
        shown = {key for key, layer in self.layers.items() if layer in self.viewer.layers}
        if self.feature_layer is not None and self.feature_layer in self.viewer.layers:
            shown.add(_layers.FEATURE_Z)
        new = [(data, kw) for data, kw, _kind in tuples if _output(kw) not in shown]
        # Added bottom first, in the layer list's order: no layer has to be moved afterwards.
        ranked = {name: rank for rank, name in enumerate(_layers.layer_order())}
        new.sort(key=lambda item: -ranked.get(_output(item[1]), 0))
        # Layers kept from an earlier run show nothing until this run writes them: the earlier
        # run's maps under this run's name would mislead.
        steps = [
            step(f"clear {kw['name']}", self._repoint, self._layer_of(_output(kw)), data, kw, "")
            for data, kw, _kind in tuples
            if _output(kw) in shown
        ]
        steps += [step(f"add {kw['name']}", self._add, data, kw) for data, kw in new]
        self.steps.add(*steps)
        self.plan = layout.plan
        if layout.plan is None or self._tiles_show(layout.plan):
            self.steps.add(step("layers ready", ready.set))
        else:
            # Built once the layers above are added, not meanwhile: building a Shapes layer is
            # Python holding the GIL, and each add would wait on it (the first took 2-3x as long).
            self.steps.add(step("build tiles", self._build_tiles, None, ready.set))
        # While tiles run: the colour bar's glyphs, so that its first draw at the end is shorter.
        self.steps.add(*glyph_warmup_steps(self.viewer))

    def start(
        self,
        plan: Any,
        out: Path,
        prefix: str,
        scale: tuple[float, ...],
        translate: tuple[float, ...],
    ) -> None:
        """A run started writing ``out``: point the layers at its store and outline its tiles."""
        self._placeholders = []
        self.plan, self.prefix = plan, prefix
        self.input_scale, self.input_translate = scale, translate
        self.run_out = Path(out)
        in_progress = self.run_out.with_name(self.run_out.name + ".inprogress")
        self.store_path = in_progress if in_progress.exists() else self.run_out
        path = self.store_path
        # The slices the visible layers show, per level: re-pointing them then reads no store.
        shown = {
            key: [level.last_key for level in layer_data.levels_of(layer)]
            for key, layer in self.layers.items()
            if layer in self.viewer.layers and layer.visible
        }

        def read() -> StoreRead | None:
            store = self.read_store(path, _layers.widget_voxel_outputs())
            if store is not None:
                for data, kwargs, _kind in store.tuples:
                    for level, key in zip(data, shown.get(_output(kwargs), [])):
                        if key is not None and isinstance(level, LiveChannel):
                            level.last_key = key
                            level.use(level.read_ahead())
            return store

        self._off_thread(read, lambda store: self._queue_layers(store))

    def finish(self, path: Path, then: Callable[[StoreRead], None] | None = None) -> None:
        """The run ended (finished or stopped): add the remaining layers, show the final values.

        Parameters
        ----------
        path : Path
            The store to show.
        then : callable, optional
            Called with the final :class:`StoreRead` as the last GUI step.
        """
        self._off_thread(
            lambda: self.read_store(Path(path), _layers.widget_outputs(), features=True),
            lambda read: self._queue_final(read, then),
        )

    def refresh(self, tile_values: np.ndarray | None = None) -> None:
        """Show what the run has written so far: the visible layers' slices are read off-thread.

        At most one refresh is in flight; the last one asked for meanwhile follows it.
        """
        if self.store_path is None:
            return
        if self._refreshing:
            self._refresh_pending = True
            if tile_values is not None:
                self._pending_values = tile_values
            return
        self._refreshing = True
        shown = self._visible_live_layers()
        self._off_thread(
            lambda: [(layer, level, level.read_ahead()) for layer, level in shown],
            lambda prepared: self.steps.add(*self._refresh_steps(prepared, tile_values)),
            finished=lambda: self.steps.add(step("refresh done", self._refresh_done)),
        )

    def _refresh_done(self) -> None:
        self._refreshing = False
        if self._refresh_pending:
            self._refresh_pending = False
            values, self._pending_values = self._pending_values, None
            self.refresh(values)

    # --- GUI steps ----------------------------------------------------------------------------------

    def _visible_live_layers(self) -> list[tuple[Any, LiveChannel]]:
        """``(layer, level)`` for every store-reading level of the visible result layers."""
        return [
            (layer, level)
            for layer in self.layers.values()
            if layer in self.viewer.layers and layer.visible
            for level in layer_data.live_levels(layer)
        ]

    def _refresh_steps(
        self, prepared: list[tuple[Any, LiveChannel, dict]], tile_values: Any
    ) -> list[Any]:
        """One step per layer, then the tile outlines: the viewer draws and answers in between.

        One step for every shown map took 50-70 ms with seams shown (five maps), the largest
        freeze of a second run.
        """
        by_layer: dict[int, list] = {}
        for item in prepared:
            by_layer.setdefault(id(item[0]), []).append(item)
        steps = [
            step(f"refresh {items[0][0].name}", self._show_prepared, items, None, False, False)
            for items in by_layer.values()
        ]
        return [*steps, step("refresh tiles", self._update_tiles, tile_values)]

    def _show_prepared(
        self,
        prepared: list[tuple[Any, LiveChannel, dict]],
        tile_values: Any,
        final: bool = False,
        tiles: bool = True,
    ) -> None:
        """Hand the slices read off-thread to the layers' levels and re-slice them (memory only).

        While the run goes on, only the shown data changes: the layer's extent (the same shape)
        and its thumbnail (updated once the run ends) are left alone.
        """
        touched = []
        for layer, level, slices in prepared:
            if layer in self.viewer.layers and slices and level in layer_data.levels_of(layer):
                level.use(slices)
                if layer not in touched:
                    touched.append(layer)
        for layer in touched:
            layer.refresh(thumbnail=final, extent=False, highlight=False)
        if tiles:
            self._update_tiles(tile_values)

    def _queue_layers(self, read: StoreRead, final: bool = False) -> None:
        if read.tile_values is not None and read.tile_judged is not None:
            self.tile_judged = read.tile_judged  # the store's grids: the flags of its values
        """Queue one step per layer to add (or re-point), visible layers first."""
        self.store_path = read.path
        store = str(read.path)
        new, repoint = [], []
        for data, kwargs, _kind in read.tuples:
            layer = self.layers.get(_output(kwargs))
            if layer is not None and layer in self.viewer.layers:
                if final and layer_data.live_levels(layer):
                    continue  # already reading this run's store (it follows the final rename)
                repoint.append((layer, data, kwargs))
            else:
                kwargs["metadata"] = {**kwargs["metadata"], "normcheck_store": store}
                new.append((data, kwargs))
        steps = [step(f"repoint {a[0].name}", self._repoint, *a, store) for a in repoint]
        visible = [item for item in new if item[1].get("visible", True)]
        hidden = [item for item in new if not item[1].get("visible", True)]
        steps += [step(f"add {kw['name']}", self._add, data, kw) for data, kw in visible]
        if self.plan is not None and not final:
            steps.append(step("tiles", self._show_tiles, read.tile_values))
        steps += [step(f"add {kw['name']}", self._add, data, kw) for data, kw in hidden]
        self.steps.add(*steps)

    def _queue_final(self, read: StoreRead, then: Callable[[StoreRead], None] | None) -> None:
        self._queue_layers(read, final=True)
        # Outputs the run did not write (a stopped run has no tile grids): their zeros would lie.
        steps: list[Callable[[], None]] = [step("drop unwritten", self._drop_unwritten, read)]
        if self.plan is not None and (
            self.tiles_layer is None or self.tiles_layer not in self.viewer.layers
        ):
            steps.append(step("tiles", self._show_tiles, read.tile_values))

        def show_final() -> None:
            # The final values: read off-thread, shown, then napari reads the store directly again.
            shown = self._visible_live_layers()
            jobs = layer_data.limit_jobs(self._own_layers())

            def final_read() -> tuple[list, list]:
                prepared = [(layer, level, level.read_ahead()) for layer, level in shown]
                return prepared, layer_data.data_limits(jobs)

            self._off_thread(
                final_read,
                lambda result: self.steps.add(
                    step("final refresh", self._show_prepared, result[0], read.tile_values, True),
                    step("contrast", self._settle_contrast, result[1]),
                    step("order", self.order_layers),
                    step("select", self.select_result),
                    *([step("then", then, read)] if then is not None else []),
                ),
            )

        steps.append(step("read final slices", show_final))
        self.steps.add(*steps)

    def _own_layers(self) -> list[Any]:
        """The run's image layers in the viewer (``feature z`` sets its own limits)."""
        return [layer for layer in self.layers.values() if layer in self.viewer.layers]

    def select_result(self) -> None:
        """Select the disparity map (else the first shown result): not the ``tiles`` layer.

        The shown disparity map carries napari's colour bar, on the 0..1 scale of its values.
        """
        shown = [layer for layer in self._own_layers() if layer.visible]
        disparity = self.layers.get("disparity")
        target = disparity if disparity in shown else (shown[0] if shown else None)
        if target is None:
            return
        self.viewer.layers.selection.active = target
        # The colour bar's first draw is a freeze of its own: the next step.
        self.steps.add_first(step("colour bar", self._show_colorbar, target))

    def _show_colorbar(self, target: Any) -> None:
        # Building the colour bar's visuals and drawing them the first time (its shaders) are two
        # separate freezes, not one: the canvas repaints a step later.
        changes = [
            (colorbar, layer is target)
            for layer in self._own_layers()
            if (colorbar := getattr(layer, "colorbar", None)) is not None
            and colorbar.visible != (layer is target)
        ]
        if not changes:
            return
        native = _canvas_widget(self.viewer)
        hold = native is not None and native.updatesEnabled()
        if hold:
            native.setUpdatesEnabled(False)
        try:
            for colorbar, visible in changes:
                colorbar.visible = visible
        finally:
            if hold:  # on a timer of its own: a new run clearing the steps must not keep it held
                QTimer.singleShot(STEP_MS, lambda: native.setUpdatesEnabled(True))

    def _settle_contrast(self, limits: list[tuple[Any, tuple[float, float]]]) -> None:
        """Every map gets contrast limits from its data (its largest real value plainly visible)."""
        self._apply_contrast(limits)
        for layer in self.layers.values():
            if layer in self.viewer.layers:
                layer_data.stop_prefetch(layer)  # from now on napari reads the store itself

    def _add(self, data: Any, kwargs: dict[str, Any]) -> None:
        key = _output(kwargs)
        existing = self.feature_layer if key == _layers.FEATURE_Z else self.layers.get(key)
        if existing is not None and existing in self.viewer.layers:
            written = key != _layers.FEATURE_Z and not isinstance(data[0], EmptyChannel)
            if written and layer_data.is_stand_in(existing):
                # A stand-in whose own add step was still queued when the store was read (a run
                # stopped early): it reads the store now, instead of being dropped as unwritten.
                store = kwargs["metadata"].get("normcheck_store", "")
                self._repoint(existing, data, kwargs, store)
            return
        # The new layer does not take the selection (nor the layer controls) from the user's.
        selection = getattr(self.viewer.layers, "_activate_on_insert", None)
        if selection is not None:
            self.viewer.layers._activate_on_insert = False
        try:
            layer = self.viewer.add_image(data, **kwargs)
        finally:
            if selection is not None:
                self.viewer.layers._activate_on_insert = selection
        if key == _layers.FEATURE_Z:
            self.feature_layer = layer  # filled by show_feature_z() when the run ends
        else:
            self.layers[key] = layer
        self._placeholders.append(layer)

    def _layer_of(self, output: str) -> Any:
        """The layer showing ``output`` (``feature z`` included), or ``None``."""
        return self.feature_layer if output == _layers.FEATURE_Z else self.layers.get(output)

    def _drop_unwritten(self, read: StoreRead) -> None:
        # feature z is filled after this step (show_feature_z) when the store has it; an output
        # this store does not hold (seams of an earlier run) would show another run's values.
        keep = self.feature_layer if read.feature_grid is not None else None
        written = {_output(kwargs) for _data, kwargs, _kind in read.tuples}
        shown = _layers.widget_outputs()
        for key, layer in [*self.layers.items(), (_layers.FEATURE_Z, self.feature_layer)]:
            if layer is keep or layer is None or layer not in self.viewer.layers:
                continue
            unwritten = key in shown and key not in written
            # A store without feature z (no running statistics): the earlier run's map would lie.
            no_features = key == _layers.FEATURE_Z and read.feature_grid is None
            if layer_data.is_stand_in(layer) or unwritten or no_features:
                self.viewer.layers.remove(layer)

    def discard_placeholders(self) -> None:
        """The run failed before its store existed: remove the layers added for it (still empty)."""
        self.steps.clear()
        self.reveal_tiles()
        for layer in self._placeholders:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self._placeholders = []
        self._maybe_settled()

    def _repoint(self, layer: Any, data: Any, kwargs: dict[str, Any], store: str) -> None:
        """A new run writes another store: the layer reads it (placement updated only if moved)."""
        layer.data = data
        if layer.name != kwargs["name"]:
            layer.name = kwargs["name"]
        if tuple(layer.scale) != tuple(kwargs["scale"]):
            layer.scale = kwargs["scale"]
        if tuple(layer.translate) != tuple(kwargs["translate"]):
            layer.translate = kwargs["translate"]
        fixed = not kwargs["metadata"].get("contrast_from_data")
        limits = kwargs.get("contrast_limits")
        if fixed and limits is not None and tuple(layer.contrast_limits) != tuple(limits):
            layer.contrast_limits = limits
        layer.metadata["contrast_from_data"] = not fixed
        layer.metadata["normcheck_store"] = store
        for key in ("run", "channel", "channel_names"):
            layer.metadata[key] = kwargs["metadata"].get(key)
        if "visible" in kwargs and layer_data.is_stand_in(layer):
            colorbar = getattr(layer, "colorbar", None)
            if colorbar is not None:  # shown again on the new run's map when it is written
                colorbar.visible = False

    # --- synchronous use (tests, callers outside a run) -----------------------------------------------

    def show(
        self, path: Path, final: bool = False, tile_values: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Add (or re-point) the result layers at the store ``path`` now, on the calling thread.

        Parameters
        ----------
        path : Path
            The store (a run's ``.inprogress`` folder while it overwrites an earlier output).
        final : bool
            Also the outputs written at the end (tile grids).
        tile_values : numpy.ndarray, optional
            Per-tile disparity to use when the store holds no tile grid (yet).

        Returns
        -------
        numpy.ndarray or None
            The per-tile disparity shown in the tiles layer.
        """
        names = _layers.widget_outputs() if final else _layers.widget_voxel_outputs()
        read = self.read_store(Path(path), names)
        if read is None:
            return None
        if read.tile_values is None:
            read.tile_values = tile_values
        self.steps.clear()
        self.reveal_tiles()
        self._queue_layers(read)
        self._synchronous = True
        try:
            self.steps.run_all()
        finally:
            self._synchronous = False
        return read.tile_values


def _canvas_widget(viewer: Any) -> Any | None:
    """The Qt widget napari's canvas draws in (``None`` where napari keeps it elsewhere)."""
    canvas = getattr(getattr(getattr(viewer, "window", None), "_qt_viewer", None), "canvas", None)
    native = getattr(canvas, "native", None)
    return native if hasattr(native, "setUpdatesEnabled") else None
