"""The dock widget: choose an image and a model, run the two-mode check, browse the results.

Three tabs: *Check* (image, model with its inventory and verdict, region, settings; the rarely
changed ones folded under "Advanced"), *Results* (summary with the verdict, the output channel
shown, the tile table and the plots; it comes forward when a run starts) and *Remedies*. The run
buttons, progress and status line stay below the tabs (built in :mod:`napari_normcheck._qt.tabs`).

The check runs in a :func:`napari.qt.threading.thread_worker` around the core generator
:func:`~napari_normcheck.core.run.engine.run_check`; every progress event comes back to the GUI thread,
which never waits on compute or on the store. Result layers are added before the engine starts and
refreshed at most every :data:`REFRESH_SECONDS` while tiles finish (see
:mod:`napari_normcheck._qt.results`). The model fields live in :mod:`~napari_normcheck._qt.model_box`,
the feature statistics in :mod:`~napari_normcheck._qt.features_view`.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, Signal  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import QFileDialog, QLabel, QVBoxLayout, QWidget  # noqa: TID253

from napari_normcheck._qt import jobs, tabs, tile_table
from napari_normcheck._qt.features_view import FeatureSection
from napari_normcheck._qt.model_box import SAMPLE_PREFIX, ModelSection
from napari_normcheck._qt.region import (
    FIELD_OF_VIEW,
    SHAPES_BOX,
    field_of_view_roi,
    shapes_roi,
    spatial_transform,
)
from napari_normcheck._qt.remedies_panel import RemedyContext
from napari_normcheck._qt.results import ResultLayers
from napari_normcheck.core.base.errors import NormcheckError

#: Least time between two refreshes of the shown layers during a run (s). Each one costs a
#: canvas redraw, which a software renderer pays with CPU time the engine would use.
REFRESH_SECONDS = 2.0


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def summary_line(summary: dict[str, Any], out: Path | str) -> str:
    """The dense line of older summaries: disparity and eval mismatch per channel, the verdict."""
    from napari_normcheck.core.run.report import verdict

    def per_channel(values: Any) -> str:
        return " / ".join(f"{v:.3f}" for v in values or []) or "-"

    disparity = summary.get("disparity", {})
    mismatch = summary.get("mismatch_eval", {})
    text = (
        f"done: {summary.get('n_tiles')} tiles in {summary['timing']['total']:.1f} s. "
        f"Disparity per channel {per_channel(disparity.get('hard'))} "
        f"(soft {per_channel(disparity.get('soft'))}); "
        f"eval tile mismatch {per_channel(mismatch.get('hard'))}."
    )
    try:
        text += " " + verdict(summary)
    except (KeyError, TypeError, ValueError):
        pass  # an older summary without the global figures
    return f"{text} Output: {out}"


def summary_text(
    summary: dict[str, Any], out: Path | str, channel_names: list[str] | None = None
) -> str:
    """The Results tab's summary: short lines (the core's ``verdict_lines``), then the output.

    Falls back to :func:`summary_line` for a summary the core cannot read.
    """
    from napari_normcheck.core.run.report import verdict_lines

    try:
        lines = [str(line) for line in verdict_lines(summary, channel_names)]
    except (KeyError, TypeError, ValueError, IndexError):
        return summary_line(summary, out)
    total = (summary.get("timing") or {}).get("total", 0.0)
    head = f"done: {summary.get('n_tiles')} tiles in {total:.1f} s."
    from napari_normcheck._qt.grid_shift_view import grid_shift_lines

    lines += grid_shift_lines(summary, channel_names)
    return "\n".join([head, *lines, f"Output: {out}"])


def tile_legend_html() -> str:
    """The tile outlines' colour legend as one line of rich text (a swatch per colour)."""
    from napari_normcheck._tile_layers import tile_color_legend

    def swatch(color: tuple[float, ...]) -> str:
        r, g, b = (round(255 * c) for c in color[:3])
        return f'<span style="color: rgb({r},{g},{b})">■</span>'

    items = " ".join(f"{swatch(color)}&nbsp;{text}" for color, text in tile_color_legend())
    return f"tile outlines (hard disparity, as the verdict): {items}"


class NormcheckWidget(ModelSection, FeatureSection, QWidget):
    """Compare a network's predictions with train-mode and eval-mode normalization on a layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer whose image layers are offered and where results appear.

    Signals
    -------
    run_settled
        A run's worker has finished and its results are all shown (layers, table, plots).
    """

    run_settled = Signal()

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model_ready: jobs.ModelReady | None = None
        self.worker: Any = None
        self.cancel_event: threading.Event | None = None
        self.run_request: jobs.RunRequest | None = None
        self._heap_frozen = False
        self.results = ResultLayers(napari_viewer)
        self.results.settled.connect(self._check_settled)
        self.run_out: Path | None = None
        self.run_input: tuple[str, tuple[float, ...], tuple[float, ...]] = ("", (), ())
        self.last_refresh = 0.0
        self.finished_event: Any = None
        self.feature_entries: list[dict[str, Any]] = []
        self.feature_grid: Any = None

        self.user_chose_channel = False

        self.tabs = tabs.build_tabs(self)
        self.tile_legend = QLabel(tile_legend_html())
        self.tile_legend.setWordWrap(True)  # (one long line would widen the dock)
        self.tile_legend.setToolTip(
            "tile outline colours: the tile's soft disparity of the shown channel, on a scale "
            "that is the same in every run"
        )
        self.results_page.layout().insertWidget(2, self.tile_legend)
        for index in range(self.sort_combo.count()):  # what soft, flips, mismatch mean
            words = tile_table.tooltip(self.sort_combo.itemText(index))
            self.sort_combo.setItemData(index, words, Qt.ItemDataRole.ToolTipRole)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.tabs, 1)
        outer.addWidget(tabs.build_run_box(self))

        self.viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        self.viewer.layers.events.removed.connect(self._refresh_layer_choices)
        self.destroyed.connect(self._disconnect_viewer)
        self._refresh_layer_choices()

    def _disconnect_viewer(self, *_args: Any) -> None:
        """Stop listening to the viewer once the dock widget is gone."""
        if self.cancel_event is not None:
            self.cancel_event.set()
        self._unfreeze_heap()
        self.remedies_panel.disconnect_viewer()
        for emitter in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            emitter.disconnect(self._refresh_layer_choices)
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self._refresh_layer_choices)

    # --- layer choices ----------------------------------------------------------------------------

    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image) and "normcheck_output" not in layer.metadata
        ]

    def _refresh_layer_choices(self, *_args: Any) -> None:
        from napari.layers import Shapes

        for layer in self.viewer.layers:  # renamed layers are renamed in the choices
            layer.events.name.connect(self._refresh_layer_choices)
        for combo, names in (
            (self.image_combo, [layer.name for layer in self._image_layers()]),
            (
                self.shapes_combo,
                [
                    layer.name
                    for layer in self.viewer.layers
                    if isinstance(layer, Shapes) and "normcheck_output" not in layer.metadata
                ],
            ),
        ):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._on_image_changed()

    def selected_image(self) -> Any:
        """The chosen image layer, or ``None``."""
        name = self.image_combo.currentText()
        return next((layer for layer in self._image_layers() if layer.name == name), None)

    def _on_image_changed(self, *_args: Any) -> None:
        """Offer the packaged sample models when the sample layer is chosen; set the level range."""
        layer = self.selected_image()
        levels = len(layer.data) if layer is not None and layer.multiscale else 1
        self.level_spin.setRange(0, levels - 1)
        is_sample = layer is not None and bool(layer.metadata.get("normcheck_sample"))
        has_samples = self.model_source.count() > 1
        if is_sample and not has_samples:
            from napari_normcheck.data import SAMPLE_MODELS

            self.model_source.addItems([SAMPLE_PREFIX + name for name in SAMPLE_MODELS])
        elif not is_sample and has_samples:
            while self.model_source.count() > 1:
                self.model_source.removeItem(1)
        self.settings.follow_image(layer)  # an integer image is normalized by default

    # --- the run ----------------------------------------------------------------------------------

    def build_config(self, shape: tuple[int, int, int], layer: Any) -> Any:
        """The :class:`RunConfig` from the form (raises :class:`NormcheckError`)."""
        # The seams maps follow Advanced's "store the seams maps", checked by default: the widget
        # checks a region the user looks at (the command line keeps ``--seams`` opt-in for whole
        # volumes); on a big region a user may turn them off.
        return self.settings.config(roi=self.region_roi(layer, shape))

    def input_transform(self, layer: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Voxel size and origin of the chosen level (napari scales level k by its downsampling)."""
        scale, translate = spatial_transform(layer)
        level = self.level_spin.value() if layer.multiscale else 0
        if level:
            factors = tuple(float(f) for f in layer.downsample_factors[level][-3:])
            factors = (1.0,) * (3 - len(factors)) + factors
            if layer.ndim == 2:
                factors = (1.0, *factors[-2:])
            scale = tuple(s * f for s, f in zip(scale, factors))
        return scale, translate

    def region_roi(self, layer: Any, shape: tuple[int, int, int]) -> Any:
        """The region chosen in the form as voxel ranges, or ``None`` for the whole volume."""
        region = self.region_combo.currentText()
        scale, translate = self.input_transform(layer)
        if region == FIELD_OF_VIEW:
            return field_of_view_roi(self.viewer, scale, translate, shape)
        if region == SHAPES_BOX:
            name = self.shapes_combo.currentText()
            if not name or name not in self.viewer.layers:
                raise NormcheckError("add a Shapes layer with a box, or choose another region")
            return shapes_roi(self.viewer.layers[name], scale, translate, shape)
        return None

    def output_path(self, layer_name: str) -> Path:
        """The output folder: the form's, or a new one in the temporary directory."""
        text = self.out_path.text().strip()
        if text:
            return Path(text).expanduser()
        folder = Path(tempfile.gettempdir()) / "napari-normcheck"
        folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in layer_name) or "image"
        return folder / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}.zarr"

    def export_report(self, path: str | Path | None = None) -> Path | None:
        """Write the last finished run's report (``.csv`` one row per tile, or ``.json``)."""
        import zarr

        from napari_normcheck.core.run.report import build_report, write_report

        if self.finished_event is None:
            _show_error("no finished run to report on yet")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Export report", "normcheck_report.csv", "CSV (*.csv);;JSON (*.json)"
            )
            if not path:
                return None
        try:
            out = self.finished_event.out
            attrs = dict(zarr.open_group(str(out), mode="r").attrs["normcheck"])
            report = build_report(self.finished_event.summary, attrs)
            written = write_report(path, report, overwrite=False)
        except NormcheckError as error:
            _show_error(str(error))
            return None
        self.status_label.setText(f"report written to {written}")
        return written

    def remedy_context(self) -> RemedyContext | None:
        """The last finished check, for the Remedies section (``None`` before one finished)."""
        from napari_normcheck.core.io.store import is_complete

        event, request, ready = self.finished_event, self.run_request, self.model_ready
        if event is None or request is None or ready is None or not is_complete(event.out):
            return None
        return RemedyContext(
            volume=request.volume,
            model=ready.loaded.module,
            out=Path(event.out),
            prefix=self.run_input[0],
            model_path=ready.loaded.path,
        )

    def resume(self) -> Any:
        """Continue the stopped run in its output (finished chunks are kept); returns the worker."""
        return self.run(resume=True)

    def run(self, resume: bool = False) -> Any:
        """Start the check on the chosen layer; returns the worker (``None`` on a form error)."""
        from napari.qt.threading import thread_worker

        from napari_normcheck._qt.url_open import open_layer_volume

        if self.worker is not None:
            _show_error("a check is already running; cancel it first")
            return None
        layer = self.selected_image()
        try:
            if layer is None:
                raise NormcheckError("add an image layer and choose it in the widget")
            level = self.level_spin.value() if layer.multiscale else 0
            volume = open_layer_volume(layer, level)  # by URL when it came from one
            scale, translate = self.input_transform(layer)
            volume = dataclasses.replace(volume, scale=scale, translation=translate)
            config = self.build_config(volume.spatial_shape, layer)
        except NormcheckError as error:
            _show_error(str(error))
            self.status_label.setText(f"error: {error}")
            return None
        self.run_input = (layer.name, scale, translate)
        if not (resume and getattr(self, "run_out", None) is not None):
            self.run_out = self.output_path(layer.name)
        self.cancel_event = threading.Event()
        request = jobs.RunRequest(
            volume,
            config,
            self.run_out,
            self.overwrite.isChecked(),
            self.cancel_event,
            resume,
            scheduler=self.scheduler.text().strip() or None,
        )
        worker = thread_worker(jobs.run_job, start_thread=False)(
            request, self.model_request(), self.model_ready
        )
        worker.yielded.connect(self._on_run_item)
        worker.finished.connect(self._on_worker_finished)
        self._freeze_heap()
        self.worker = worker
        self.run_request = request
        self.finished_event = None
        self.results.new_run()
        self.tile_table.clear_records()
        # Nothing of the earlier run stays: its normalization layers, feature map and plots.
        self.clear_features()
        self.summary_label.setText("running…")
        self.tabs.setCurrentWidget(self.results_tab)
        self.progress.setValue(0)
        self.status_label.setText("starting…")
        self.run_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop after the current tile; the partial output is kept."""
        if self.cancel_event is not None:
            self.cancel_event.set()
            self.status_label.setText("stopping after the current tile…")
            self.cancel_button.setEnabled(False)

    def _on_run_item(self, item: Any) -> None:
        if isinstance(item, jobs.JobError):
            # The run failed before its store existed: its (empty) layers would only mislead.
            self.results.discard_placeholders()
        self._on_item(item)

    def _on_item(self, item: Any) -> None:
        from napari_normcheck.core.run.events import RunFinished, RunStarted, TileDone

        if isinstance(item, jobs.JobError):
            _show_error(item.message)
            self.status_label.setText(f"error: {item.message}")
            if item.message and self.model_label.text() == "loading the model…":
                self.model_label.setText("no model loaded")
        elif isinstance(item, jobs.ModelReady):
            if self._heap_frozen:  # a run's: torch's and the model's objects, made in its worker
                gc.freeze()
            self._show_model(item)
            self._set_channel_labels(item.loaded, item.loaded.info.out_channels)
        elif isinstance(item, jobs.PrepareLayers):
            self.status_label.setText("adding the result layers…")
            if self.channel_combo.count() != item.n_channels:
                self._set_channel_labels(None, item.n_channels)
            self.results.input_scale, self.results.input_translate = self.run_input[1:]
            self.results.prepare(item, self.run_input[0], self.run_request.layers_ready)
        elif isinstance(item, RunStarted):
            self._on_started(item)
        elif isinstance(item, TileDone):
            self._on_tile(item)
        elif isinstance(item, RunFinished):
            self._on_run_finished(item)

    def _on_started(self, event: Any) -> None:
        self.progress.setRange(0, event.plan.n_tiles)
        self.status_label.setText(
            f"{event.plan.n_tiles} tiles on {event.device}, writing {event.out}"
        )
        prefix, scale, translate = self.run_input
        self.results.start(event.plan, Path(event.out), prefix, scale, translate)
        self.last_refresh = time.monotonic()

    def _on_tile(self, event: Any) -> None:
        self.progress.setRange(0, event.n_total)
        self.progress.setValue(event.n_done)
        left = event.elapsed / max(event.n_done, 1) * (event.n_total - event.n_done)
        self.status_label.setText(
            f"{event.n_done} / {event.n_total} tiles, {event.elapsed:.0f} s, about {left:.0f} s left"
        )
        if event.metrics:
            self.tile_table.add_record(event.metrics, redraw=False)
        now = time.monotonic()
        # The last tile's values are shown by the end of the run (RunFinished or the worker's end).
        if now - self.last_refresh >= REFRESH_SECONDS and event.n_done < event.n_total:
            self.last_refresh = now
            self.tile_table.redraw()
            self.results.refresh(self.tile_values())
            self._fill_layer_combo()
            self.update_plots()

    def _on_run_finished(self, event: Any) -> None:
        self.finished_event = event
        self.report_button.setEnabled(True)
        summary = event.summary
        if summary.get("tiles"):
            self.tile_table.set_records(summary["tiles"])
            self.tile_values()  # (which tiles' outlines are not judged)
        soft = (summary.get("disparity") or {}).get("soft") or []
        if soft and not self.user_chose_channel:  # the channel with the highest disparity
            worst = max(range(len(soft)), key=lambda c: soft[c])
            self.channel_combo.setCurrentIndex(min(worst, self.channel_combo.count() - 1))
        self.results.finish(Path(event.out), then=self._show_final)
        names = [self.channel_combo.itemText(i) for i in range(self.channel_combo.count())]
        self.summary_label.setText(summary_text(summary, event.out, names or None))
        total = (summary.get("timing") or {}).get("total", 0.0)
        self.status_label.setText(
            f"done: {summary.get('n_tiles')} tiles in {total:.1f} s (summary in Results); "
            f"output {event.out}"
        )

    def _on_worker_finished(self) -> None:
        from napari_normcheck.core.io.store import is_complete, is_normcheck_store

        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        out = getattr(self, "run_out", None)
        stopped = out is not None and any(
            is_normcheck_store(p) and not is_complete(p)
            for p in (out, out.with_name(out.name + ".inprogress"))
        )
        self.resume_button.setEnabled(stopped)
        store = self.results.store_path
        if self.finished_event is None and store is not None:
            self.tile_table.redraw()
            if store.exists():
                self.results.finish(store, then=self._show_final)
            if self.cancel_event is not None and self.cancel_event.is_set():
                self.status_label.setText(f"stopped; the partial output is kept in {store}")
        self._check_settled()

    def _check_settled(self) -> None:
        if self.worker is None and not self.results.busy:
            self._unfreeze_heap()
            self.run_settled.emit()

    def _freeze_heap(self) -> None:
        """Keep Python's full garbage collections short while a run goes on.

        With torch, MONAI and napari loaded the heap holds millions of objects: a full collection
        scans them all and holds the GIL for 0.4-0.9 s, freezing the GUI (and the engine) at a
        random moment. ``gc.freeze()`` sets the objects alive now aside, so collections during the
        run only scan what the run allocates; they are handed back to the collector when the run's
        results are shown. A run that loads its model freezes again once it is loaded (torch and
        the model are imported and built in the worker, after the run started).
        """
        if not self._heap_frozen:
            gc.freeze()
            self._heap_frozen = True

    def _unfreeze_heap(self) -> None:
        if self._heap_frozen:
            gc.unfreeze()
            self._heap_frozen = False

    @property
    def settled(self) -> bool:
        """No run is going on and every result of the last one is shown."""
        return self.worker is None and not self.results.busy

    # --- result layers ----------------------------------------------------------------------------

    @property
    def plan(self) -> Any:
        """The tile plan of the current (or last) run."""
        return self.results.plan

    def _show_final(self, read: Any) -> None:
        """The run's last GUI step: the plots, feature statistics (their layer is one more step)."""
        self.show_features(read.feature_grid, defer=True)

    def go_to_tile(self, index: int) -> None:
        """Centre the view on tile ``index``, select its outline, its row and its plot point."""
        self.results.go_to_tile(index)
        self.tile_table.select_tile(index)
        self.scatter.select_tile(index)
