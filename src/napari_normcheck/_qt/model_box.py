"""The model part of the dock widget: the model fields, loading in a worker, the inventory table.

A mixin of :class:`~napari_normcheck._qt.widget.NormcheckWidget` (it uses the widget's settings
fields and its item handler).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (  # noqa: TID253 (the Qt layer)
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
)

from napari_normcheck._qt import jobs

MODEL_FILE = "model file"
SAMPLE_PREFIX = "sample: "
INVENTORY_COLUMNS = ("name", "type", "running stats", "momentum", "eps", "affine", "batches")


class ModelSection:
    """Model fields, loading and the normalization inventory (mixed into the dock widget)."""

    def _build_model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model_source = QComboBox()
        self.model_source.addItem(MODEL_FILE)
        self.model_source.currentTextChanged.connect(self._on_model_source)
        form.addRow("model", self.model_source)
        row = QHBoxLayout()
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("state_dict, TorchScript or pickled model")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse_model)
        row.addWidget(self.model_path)
        row.addWidget(browse)
        form.addRow("file", row)
        self.arch = QLineEdit()
        self.arch.setPlaceholderText("e.g. monai.networks.nets.BasicUNet (state_dict only)")
        form.addRow("architecture", self.arch)
        self.arch_kwargs = QLineEdit()
        self.arch_kwargs.setPlaceholderText('JSON, e.g. {"spatial_dims": 3, "in_channels": 1}')
        form.addRow("arch kwargs", self.arch_kwargs)
        self.trust_pickle = QCheckBox("trust this pickle (loading it runs code from the file)")
        form.addRow(self.trust_pickle)
        self.load_button = QPushButton("Load model")
        self.load_button.clicked.connect(self.load_model)
        form.addRow(self.load_button)
        self.model_label = QLabel("no model loaded")
        self.model_label.setWordWrap(True)
        form.addRow(self.model_label)
        self.inventory_table = QTableWidget(0, len(INVENTORY_COLUMNS))
        self.inventory_table.setHorizontalHeaderLabels(INVENTORY_COLUMNS)
        self.inventory_table.verticalHeader().setVisible(False)
        self.inventory_table.setMinimumHeight(110)
        self.inventory_table.setMaximumHeight(180)
        form.addRow(self.inventory_table)
        self.verdict_label = QLabel("")
        self.verdict_label.setWordWrap(True)
        form.addRow(self.verdict_label)
        return box

    def _on_model_source(self, text: str) -> None:
        if not text.startswith(SAMPLE_PREFIX):
            return
        from napari_normcheck.data import sample_model

        sample = sample_model(text.removeprefix(SAMPLE_PREFIX))
        self.model_path.setText(str(sample.path))
        self.arch.setText(sample.arch)
        self.arch_kwargs.setText(json.dumps(sample.arch_kwargs))
        self.normalize.setText(sample.normalize)
        self.activation.setCurrentText(sample.activation)
        self.tile.setText(",".join(str(v) for v in sample.tile))
        self.model_label.setText(sample.description)

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file")
        if path:
            self.model_path.setText(path)

    def model_request(self) -> jobs.ModelRequest:
        """The model named by the form."""
        return jobs.ModelRequest(
            path=self.model_path.text().strip(),
            arch=self.arch.text().strip() or None,
            arch_kwargs=self.arch_kwargs.text().strip() or None,
            trust_pickle=self.trust_pickle.isChecked(),
        )

    def load_model(self) -> Any:
        """Load the model in a worker thread; its inventory appears when it is ready."""
        from napari.qt.threading import thread_worker

        worker = thread_worker(jobs.load_job, start_thread=False)(self.model_request())
        worker.yielded.connect(self._on_item)
        worker.finished.connect(lambda: self.load_button.setEnabled(True))
        self.load_button.setEnabled(False)
        self.model_label.setText("loading the model…")
        self.load_worker = worker
        worker.start()
        return worker

    def _show_model(self, ready: jobs.ModelReady) -> None:
        self.model_ready = ready
        loaded, info = ready.loaded, ready.loaded.info
        text = (
            f"{Path(loaded.path).name}: {loaded.format}, {info.n_parameters:,} parameters, "
            f"{info.in_channels} → {info.out_channels} channels, {info.spatial_dims}D, "
            f"tile sides divisible by {tuple(info.divisor)}"
        )
        for note in loaded.notes:
            text += f"\nnote: {note}"
        if not loaded.switchable:
            text += f"\nwarning: {loaded.not_switchable_reason}"
        self.model_label.setText(text)
        self._fill_from_package(loaded)
        layers = ready.inventory.layers
        self.inventory_table.setRowCount(len(layers))
        for row, layer in enumerate(layers):
            cells = (
                layer.name or "(model)",
                layer.type,
                "yes" if layer.running_stats else "no",
                "-" if layer.momentum is None else f"{layer.momentum:g}",
                "-" if layer.eps is None else f"{layer.eps:g}",
                "yes" if layer.affine else "no",
                "-" if layer.num_batches_tracked is None else str(layer.num_batches_tracked),
            )
            for column, cell in enumerate(cells):
                self.inventory_table.setItem(row, column, QTableWidgetItem(cell))
        self.inventory_table.resizeColumnsToContents()
        self.verdict_label.setText(ready.inventory.verdict)

    def _fill_from_package(self, loaded: Any) -> None:
        """A bioimage.io package declares its processing: fill the fields the user left at default."""
        normalize = (loaded.preprocessing or {}).get("normalize")
        if normalize and self.normalize.text().strip() in ("", "none"):
            self.normalize.setText(str(normalize))
        activation = (loaded.postprocessing or {}).get("activation")
        if activation and self.activation.currentText() == "none":
            self.activation.setCurrentText(str(activation))
        if loaded.arch and not self.arch.text().strip():
            self.arch.setPlaceholderText(f"{loaded.arch} (from the package)")
        if loaded.arch_kwargs and not self.arch_kwargs.text().strip():
            self.arch_kwargs.setPlaceholderText(
                f"{json.dumps(loaded.arch_kwargs)} (from the package)"
            )
