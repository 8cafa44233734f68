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
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
)

from napari_normcheck._qt import jobs

MODEL_FILE = "model file"
SAMPLE_PREFIX = "sample: "
#: The inventory table's columns; a row's tooltip adds the module path, momentum, eps, affine.
INVENTORY_COLUMNS = ("layer", "running\nstats", "batches")
INVENTORY_TIPS = (
    "the normalization layer: its type and place in the network (the tooltip gives its module path)",
    "yes: eval mode uses the remembered running statistics, so train and eval can differ",
    "training batches the running statistics have seen",
)
SPEC_FILTER = "architecture spec (*.json *.yaml *.yml);;all files (*)"


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
        self.arch.setPlaceholderText("e.g. BasicUNet (state_dict only)")
        self.arch.setToolTip(
            "the network class of a state_dict: package.module:Name, file.py:Name or a MONAI "
            "network's name (as --arch)"
        )
        row = QHBoxLayout()
        row.addWidget(self.arch)
        self.spec_button = QPushButton("Load spec…")
        self.spec_button.setToolTip(
            'read an architecture spec file (JSON or YAML: {"arch": ..., "kwargs": {...}}, as '
            "--arch-spec) into the architecture and its keyword arguments"
        )
        self.spec_button.clicked.connect(lambda: self.load_arch_spec())
        row.addWidget(self.spec_button)
        form.addRow("architecture", row)
        self.arch_kwargs = QLineEdit()
        self.arch_kwargs.setPlaceholderText('JSON or @file.json, e.g. {"spatial_dims": 3}')
        self.arch_kwargs.setToolTip("the architecture's keyword arguments (as --arch-kwargs)")
        form.addRow("arch kwargs", self.arch_kwargs)
        self.trust_pickle = QCheckBox("trust this pickle")
        self.trust_pickle.setToolTip(
            "allow a pickled model or a package's architecture source: loading it runs code "
            "from the file"
        )
        form.addRow(self.trust_pickle)
        self.load_button = QPushButton("Load model")
        self.load_button.clicked.connect(self.load_model)
        form.addRow(self.load_button)
        self.model_label = QLabel("no model loaded")
        self.model_label.setWordWrap(True)
        form.addRow(self.model_label)
        self.inventory_table = QTableWidget(0, len(INVENTORY_COLUMNS))
        self.inventory_table.setHorizontalHeaderLabels(INVENTORY_COLUMNS)
        for column, tip in enumerate(INVENTORY_TIPS):
            self.inventory_table.horizontalHeaderItem(column).setToolTip(tip)
        self.inventory_table.verticalHeader().setVisible(False)
        # The layer column takes the width left; the others fit their text.
        header = self.inventory_table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in range(1, len(INVENTORY_COLUMNS)):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        # A long layer name wraps onto a second line rather than losing its place in the network.
        self.inventory_table.setWordWrap(True)
        header.sectionResized.connect(lambda *_: self.inventory_table.resizeRowsToContents())
        self.inventory_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
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
        self.settings.set_model_normalize(sample.normalize)
        self.activation.setCurrentText(sample.activation)
        self.tile.setText(",".join(str(v) for v in sample.tile))
        self.model_label.setText(sample.description)

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file")
        if path:
            self.model_path.setText(path)

    def load_arch_spec(self, path: str | Path | None = None) -> bool:
        """Fill the architecture and its keyword arguments from a spec file (as ``--arch-spec``).

        Parameters
        ----------
        path : str or Path, optional
            A JSON or YAML file ``{"arch": ..., "kwargs": {...}}``; a file dialog asks when not given.

        Returns
        -------
        bool
            Whether the fields were filled (an error notification says why not).
        """
        from napari_normcheck.core.base.errors import NormcheckError
        from napari_normcheck.core.models.arch import read_arch_spec

        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Architecture spec", filter=SPEC_FILTER)
            if not path:
                return False
        try:
            arch, kwargs = read_arch_spec(path)
        except NormcheckError as error:
            self._on_item(jobs.JobError(str(error)))  # a notification and the status line
            return False
        self.arch.setText(arch)
        self.arch_kwargs.setText(json.dumps(kwargs))
        self.arch.setToolTip(f"{arch} (from {path})")
        self.arch_kwargs.setToolTip(f"{json.dumps(kwargs, indent=1)}\n(from {path})")
        return True

    def norm_layer_text(self, module_path: str) -> str:
        """A normalization layer of the loaded model as its type and place, for people.

        E.g. ``"BatchNorm3d, encoder 1, conv 0"`` for ``down_1.convs.conv_0.adn.N``; use the module
        path as the tooltip.
        """
        from napari_normcheck.core.models.inventory import readable_layer_name

        kind = None
        if self.model_ready is not None:
            kind = next(
                (
                    layer.type
                    for layer in self.model_ready.inventory.layers
                    if layer.name == module_path
                ),
                None,
            )
        return readable_layer_name(module_path, kind)

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
        from napari_normcheck.core.models.inventory import readable_layer_name

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
                readable_layer_name(layer.name, layer.type),
                "yes" if layer.running_stats else "no",
                "-" if layer.num_batches_tracked is None else str(layer.num_batches_tracked),
            )
            tip = inventory_tooltip(layer)
            for column, cell in enumerate(cells):
                item = QTableWidgetItem(cell)
                item.setToolTip(tip)
                self.inventory_table.setItem(row, column, item)
        self.inventory_table.resizeRowsToContents()
        self.verdict_label.setText(ready.inventory.verdict)
        if self.worker is not None:
            # A run with another model: the feature layers shown are the earlier model's.
            self.feature_entries, self.feature_grid = [], None
            self.feature_layer_combo.clear()

    def _fill_from_package(self, loaded: Any) -> None:
        """A bioimage.io package declares its processing: fill the fields the user left at default."""
        normalize = (loaded.preprocessing or {}).get("normalize")
        if normalize and self.settings.normalize_source != "user":
            self.settings.set_model_normalize(str(normalize))
        activation = (loaded.postprocessing or {}).get("activation")
        if activation and self.activation.currentText() == "none":
            self.activation.setCurrentText(str(activation))
        if loaded.arch and not self.arch.text().strip():
            self.arch.setPlaceholderText(f"{loaded.arch} (from the package)")
        if loaded.arch_kwargs and not self.arch_kwargs.text().strip():
            self.arch_kwargs.setPlaceholderText(
                f"{json.dumps(loaded.arch_kwargs)} (from the package)"
            )


def inventory_tooltip(layer: Any) -> str:
    """A normalization layer's module path and the values the table leaves out."""

    def value(number: float | None) -> str:
        return "-" if number is None else f"{number:g}"

    return (
        f"module: {layer.name or '(the model)'}\n{layer.type}, {value(layer.num_features)} channels, "
        f"momentum {value(layer.momentum)}, eps {value(layer.eps)}, "
        f"affine {'yes' if layer.affine else 'no'}"
    )
