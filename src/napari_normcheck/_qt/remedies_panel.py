"""The "Remedies" section of the dock widget: try recalibration and batch-statistics eval, compare.

Embedding (what the dock widget does)::

    panel = RemediesPanel(viewer, get_context)
    layout.addWidget(panel)

``get_context()`` is called when the user clicks Run remedies and must return a :class:`RemedyContext`
(the volume, the loaded model and the finished OUT.zarr of the last check) or ``None`` when there is
no finished check yet. The remedies run in a :func:`napari.qt.threading.thread_worker` over the core
generator :func:`~napari_normcheck.core.remedies.remedy_run.run_remedies`; the table, the layers of each
remedy's prediction and the export of the recalibrated model follow when it finishes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtpy.QtCore import Signal  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import (  # noqa: TID253
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from napari_normcheck.core.base.errors import NormcheckError

NO_LABELS = "(no labels)"
NO_CHECK = "run a check to the end first: the remedies work on its output"


@dataclass(frozen=True)
class JobError:
    """A user-readable error that ended the remedies job (shown as a notification)."""

    message: str


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


@dataclass
class RemedyContext:
    """What the remedies need from the dock widget.

    Attributes
    ----------
    volume : Volume
        The volume of the last check (as the engine saw it: level, voxel size, translation).
    model : torch.nn.Module
        The loaded model of that check; never modified.
    out : Path
        The check's finished OUT.zarr.
    prefix : str
        Start of the names of the layers added (the image layer's name).
    model_path : str or None
        The model file, never overwritten by an export.
    cancel : threading.Event
        Set by :meth:`RemediesPanel.cancel`.
    """

    volume: Any
    model: Any
    out: Path
    prefix: str = ""
    model_path: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


def remedies_job(context: RemedyContext, options: dict[str, Any]) -> Iterator[Any]:
    """Worker body: run the remedies; a :class:`NormcheckError` becomes a :class:`JobError` item."""
    from napari_normcheck.core.remedies.remedy_run import run_remedies

    try:
        yield from run_remedies(
            context.out, context.volume, context.model, cancel=context.cancel, **options
        )
    except NormcheckError as error:
        yield JobError(str(error))


class RemediesPanel(QGroupBox):
    """Compare eval, train, recalibrated eval and batch-stats eval on the last check's output.

    Signals
    -------
    layers_added
        The remedies' prediction layers were added (or re-pointed).

    Parameters
    ----------
    viewer : napari.Viewer
        Where Labels layers are offered and prediction layers are added.
    get_context : callable
        ``get_context() -> RemedyContext | None`` (see the module docstring).
    get_channel : callable, optional
        ``get_channel() -> int``: the output channel the dock widget shows (the remedies' layers
        show the same one, and follow it); channel 0 when not given.
    get_channel_names : callable, optional
        ``get_channel_names(n) -> list[str]``: the names of ``n`` output channels as the dock
        widget writes them (the model's, else ``channel k``); the check's store's by default.
    """

    layers_added = Signal()

    def __init__(
        self,
        viewer: Any,
        get_context: Callable[[], RemedyContext | None],
        get_channel: Callable[[], int] | None = None,
        get_channel_names: Callable[[int], list[str]] | None = None,
    ) -> None:
        super().__init__("Remedies")
        self.viewer = viewer
        self.get_context = get_context
        self.get_channel = get_channel or (lambda: 0)
        self.get_channel_names = get_channel_names or self._store_channel_names
        self.worker: Any = None
        self.context: RemedyContext | None = None
        self.remedies: dict[str, Any] | None = None
        self.recalibration: Any = None
        self.finished = False

        form = QFormLayout()
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.labels_combo = QComboBox()
        self.label_map = QLineEdit('{"1": 0}')
        self.label_map.setToolTip('label value(s) -> output channel, e.g. {"255": 0, "1,2": 1}')
        self.ignore_labels = QLineEdit("")
        self.ignore_labels.setPlaceholderText("e.g. 0 (unlabelled voxels)")
        self.tiles = QSpinBox()
        self.tiles.setRange(1, 100_000)
        self.tiles.setValue(32)
        self.variance = QComboBox()
        self.variance.addItems(["mean", "pooled"])
        form.addRow("ground truth", self.labels_combo)
        form.addRow("label map", self.label_map)
        form.addRow("ignore labels", self.ignore_labels)
        self.mask_below = QLineEdit("")
        self.mask_below.setPlaceholderText("e.g. 10 (dark background)")
        self.mask_above = QLineEdit("")
        self.mask_above.setPlaceholderText("e.g. 200 (empty resin)")
        for edit in (self.mask_below, self.mask_above):
            edit.setToolTip(
                "raw intensity of no content: recalibration uses tiles mostly of content "
                "(empty: every voxel is content)"
            )
        form.addRow("recalibration tiles", self.tiles)
        form.addRow("variance estimate", self.variance)
        form.addRow("skip voxels below", self.mask_below)
        form.addRow("skip voxels above", self.mask_above)

        self.run_button = QPushButton("Run remedies")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_button = QPushButton("Export recalibrated model…")
        self.export_button.setEnabled(False)
        self.export_button.clicked.connect(lambda: self.export())
        buttons = QHBoxLayout()
        for button in (self.run_button, self.cancel_button):
            buttons.addWidget(button)
        self.table = QTableWidget(0, 0)
        self.status = QLabel(NO_CHECK)
        self.status.setWordWrap(True)
        self.notes = QLabel("")
        self.notes.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.export_button)
        layout.addWidget(self.table)
        layout.addWidget(self.status)
        layout.addWidget(self.notes)
        viewer.layers.events.inserted.connect(self.refresh_labels)
        viewer.layers.events.removed.connect(self.refresh_labels)
        self.refresh_labels()
        self.refresh_context()

    def refresh_context(self) -> None:
        """Say whether a finished check is there to work on (Run remedies is offered only then).

        Call it when a check finishes and when the panel is shown. A new check's output clears the
        table of the remedies of an earlier one.
        """
        if self.worker is not None:
            return
        context = self.get_context()
        self.run_button.setEnabled(context is not None)
        if context is None:
            self.status.setText(NO_CHECK)
            return
        if (
            self.finished
            and self.context is not None
            and Path(self.context.out) == Path(context.out)
        ):
            return  # the remedies of this check are shown
        if self.remedies is not None:  # an earlier check's remedies
            self.table.clear()
            self.table.setRowCount(0)
            self.table.setColumnCount(0)
            self.notes.setText("")
            self.remedies = self.recalibration = None
            self.export_button.setEnabled(False)
            self.finished = False
        name = f"the check of {context.prefix}" if context.prefix else "the check"
        self.status.setText(
            f"ready: {name} has finished. Choose ground truth if you have it, then Run remedies."
        )
        self.status.setToolTip(f"the check's output: {context.out}")

    def disconnect_viewer(self) -> None:
        """Stop listening to the viewer (call it when the dock widget goes away)."""
        if self.context is not None:
            self.context.cancel.set()
        self.viewer.layers.events.inserted.disconnect(self.refresh_labels)
        self.viewer.layers.events.removed.disconnect(self.refresh_labels)

    # --- inputs -----------------------------------------------------------------------------------

    def refresh_labels(self, *_args: Any) -> None:
        """Offer the viewer's Labels layers as ground truth."""
        from napari.layers import Labels

        current = self.labels_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)]
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems([NO_LABELS, *names])
        if current in names:
            self.labels_combo.setCurrentText(current)
        self.labels_combo.blockSignals(False)

    def options(self) -> dict[str, Any]:
        """The ``run_remedies`` keyword arguments from the form (raises :class:`NormcheckError`)."""
        from napari_normcheck.core.measure.labels import parse_label_map

        recalibration: dict[str, Any] = {
            "n_tiles": self.tiles.value(),
            "variance": self.variance.currentText(),
        }
        for key, edit in (("mask_below", self.mask_below), ("mask_above", self.mask_above)):
            text = edit.text().strip()
            if text:
                try:
                    recalibration[key] = float(text)
                except ValueError:
                    raise NormcheckError(
                        f"the intensity mask {text!r} is not a number; give e.g. 200 or leave it empty"
                    ) from None
        options: dict[str, Any] = {"recalibration": recalibration}
        name = self.labels_combo.currentText()
        if name and name != NO_LABELS:
            layer = self.viewer.layers[name]
            options["labels"] = layer.data[0] if layer.multiscale else layer.data
            options["label_map"] = parse_label_map(self.label_map.text())
            try:
                options["ignore_labels"] = tuple(
                    int(v) for v in self.ignore_labels.text().replace(",", " ").split()
                )
            except ValueError:
                raise NormcheckError(
                    "ignore labels must be integers separated by spaces, e.g. 0"
                ) from None
        return options

    # --- running ----------------------------------------------------------------------------------

    def run(self) -> Any:
        """Start the remedies on the last check's output; returns the worker (``None`` on an error)."""
        from napari.qt.threading import thread_worker

        if self.worker is not None:
            _show_error("the remedies are already running")
            return None
        try:
            context = self.get_context()
            if context is None:
                raise NormcheckError("run the check to the end first; the remedies use its output")
            options = self.options()
        except NormcheckError as error:
            _show_error(str(error))
            return None
        context.cancel = threading.Event()  # a context handed out again must not start cancelled
        self.context = context
        self.finished = False
        worker = thread_worker(remedies_job, start_thread=False)(context, options)
        worker.yielded.connect(self._on_item)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("recalibrating…")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop after the current tile; the check's own outputs are untouched."""
        if self.context is not None:
            self.context.cancel.set()

    def _on_item(self, item: Any) -> None:
        from napari_normcheck.core.remedies.recalibrate import RecalibrationProgress
        from napari_normcheck.core.remedies.remedy_run import RemediesFinished, RemedyTileDone

        if isinstance(item, JobError):
            _show_error(item.message)
            self.status.setText(f"error: {item.message}")
        elif isinstance(item, RecalibrationProgress):
            self.status.setText(f"{item.stage}: {item.n_done} / {item.n_total} batches")
        elif isinstance(item, RemedyTileDone):
            self.status.setText(f"remedies: {item.n_done} / {item.n_total} tiles")
        elif isinstance(item, RemediesFinished):
            self.finished = True
            self.remedies = item.remedies
            self.recalibration = item.recalibration
            self.show_table(item.remedies)
            self.add_layers(item.out, item.remedies)
            self.layers_added.emit()
            self.export_button.setEnabled(item.recalibration is not None)
            self.status.setText(f"done in {item.remedies.get('seconds', 0):.1f} s")
            self.status.setToolTip(f"the remedies' outputs are in {item.out}")

    def _on_finished(self) -> None:
        if not self.finished and self.context is not None and self.context.cancel.is_set():
            self.status.setText("stopped; the check's own outputs are unchanged")
        self.worker = None
        self.run_button.setEnabled(self.get_context() is not None)
        self.cancel_button.setEnabled(False)

    # --- results ----------------------------------------------------------------------------------

    def show_table(self, remedies: dict[str, Any]) -> None:
        """Fill the comparison table: one row per mode, hard values per channel."""
        from napari_normcheck.core.remedies.table import ROW_TITLES, ROWS

        rows = [r for r in ROWS if r in remedies]
        n_out = len(remedies["eval"]["disparity_vs_train"]["hard"])
        dice_channels = (remedies["eval"].get("dice_vs_labels") or {}).get("channels", [])
        names = self.get_channel_names(n_out)
        # Two-line headers keep the columns narrow: the measure, then the channel's name.
        columns = [("disparity_vs_train", c, f"disparity\n{names[c]}") for c in range(n_out)]
        columns += [("mismatch", c, f"mismatch\n{names[c]}") for c in range(n_out)]
        columns += [("dice_vs_labels", c, f"Dice\n{names[c]}") for c in dice_channels]
        self.table.clear()
        self.table.setRowCount(len(rows))
        self.table.setColumnCount(len(columns))
        self.table.setHorizontalHeaderLabels([title for _, _, title in columns])
        self.table.setVerticalHeaderLabels([ROW_TITLES[r] for r in rows])
        for i, row in enumerate(rows):
            for j, (key, channel, _) in enumerate(columns):
                self.table.setItem(i, j, QTableWidgetItem(cell_text(remedies[row], key, channel)))
        self.table.resizeColumnsToContents()
        self.notes.setText("\n".join(remedies.get("notes", [])))

    def _store_channel_names(self, n_channels: int) -> list[str]:
        """The output channels' names in the check's store (``channel k`` when it has none)."""
        from napari_normcheck import _layers

        attrs: dict[str, Any] = {}
        if self.context is not None:
            import zarr

            try:
                attrs = dict(
                    zarr.open_group(str(self.context.out), mode="r").attrs.get("normcheck") or {}
                )
            except (OSError, ValueError, KeyError):  # no store (yet): the plain names
                attrs = {}
        return _layers.channel_names(attrs, n_channels)

    def add_layers(self, out: Path, remedies: dict[str, Any]) -> list[Any]:
        """Add (or re-point) one image layer per remedy prediction, showing the chosen channel.

        The layers follow the dock widget's rule: one layer per output (``recalibrated · channel 0``),
        switched with the widget's channel choice, above the input.
        """
        from napari_normcheck import _layers
        from napari_normcheck._qt.layer_data import is_output_layer
        from napari_normcheck.core.run import registry

        groups = tuple(
            output.name
            for output in registry.VOXEL_OUTPUTS
            if output.display.group == "remedy" and set(output.needs) <= set(remedies)
        )
        tuples = _layers.image_layers(out, groups, self.get_channel())
        added = []
        for data, kwargs, _kind in tuples:
            kwargs["metadata"]["normcheck_store"] = str(out)
            group = kwargs["metadata"]["normcheck_output"]
            existing = next(
                (
                    layer
                    for layer in self.viewer.layers
                    if layer.metadata.get("normcheck_output") == group and is_output_layer(layer)
                ),
                None,
            )
            if existing is not None:
                existing.data = data
                existing.name = kwargs["name"]
                existing.metadata.update(kwargs["metadata"])
                added.append(existing)
            else:
                added.append(self.viewer.add_image(data, **kwargs))
        return added

    def export(self, path: str | Path | None = None) -> dict[str, Path] | None:
        """Save the recalibrated model (state_dict + provenance); existing files are never replaced."""
        from napari_normcheck.core.remedies.recalibrate_export import export_recalibrated

        if self.recalibration is None:
            _show_error("run the remedies first: there is no recalibrated model yet")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self,
                "Export recalibrated model",
                "recalibrated.pt",
                "PyTorch state_dict (*.pt *.pth)",
                options=QFileDialog.Option.DontConfirmOverwrite,
            )
            if not path:
                return None
        try:
            paths = export_recalibrated(
                self.recalibration,
                path,
                input_path=self.context.model_path if self.context is not None else None,
            )
        except NormcheckError as error:
            _show_error(str(error))
            return None
        self.status.setText("exported " + ", ".join(str(p) for p in paths.values()))
        return paths


def cell_text(row: dict[str, Any], key: str, channel: int) -> str:
    """A table cell: the hard value of ``key`` for ``channel`` (``-`` where not measured)."""
    entry = row.get(key) or {}
    values = entry.get("hard")
    if values is None:
        return "-"
    if key == "dice_vs_labels":
        channels = entry.get("channels", [])
        if channel not in channels:
            return "-"
        return f"{values[channels.index(channel)]:.4f}"
    return f"{values[channel]:.4f}"
