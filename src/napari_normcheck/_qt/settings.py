"""The run settings of the dock widget: those users change often, the rest folded under "Advanced"."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (  # noqa: TID253 (the Qt layer)
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_normcheck._qt.grid_shift_view import GridShiftField

# The normalization the widget picks for an integer image, the command line's default too: users
# change it, or type "none" for raw values.
from napari_normcheck.core.io.intensity import INTEGER_NORMALIZE


def unscaled_note(normalize: str, dtype: Any) -> str:
    """A warning when ``normalize`` leaves integer intensities unscaled (``""`` otherwise).

    Parameters
    ----------
    normalize : str
        The normalization as typed.
    dtype : numpy dtype or None
        The chosen image's data type.
    """
    import numpy as np

    if dtype is None or normalize.strip().lower() not in ("", "none"):
        return ""
    if not np.issubdtype(np.dtype(dtype), np.integer):
        return ""
    info = np.iinfo(np.dtype(dtype))
    return (
        f"note: {np.dtype(dtype)} intensities ({info.min}-{info.max}) reach the network unscaled; "
        f"most networks were trained on normalized input: try {INTEGER_NORMALIZE} or "
        f"minmax:{info.min},{info.max}"
    )


def layer_dtype(layer: Any) -> Any:
    """The data type of an image layer (its full-resolution level), or ``None``."""
    if layer is None:
        return None
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return getattr(data, "dtype", None)


class SettingsBox(QGroupBox):
    """The fields of a :class:`~napari_normcheck.core.base.config.RunConfig` and the output folder.

    Parameters
    ----------
    parent : QWidget, optional
        The dock widget.
    """

    FIELDS = (
        "tile",
        "overlap",
        "blend",
        "halo",
        "train_batch",
        "eval_batch",
        "device",
        "precision",
        "scheduler",
        "normalize",
        "activation",
        "threshold",
        "feature_layers",
        "seams",
        "grid_shift",
        "out_path",
        "overwrite",
    )

    def __init__(self, parent: Any = None) -> None:
        from superqt import QCollapsible

        super().__init__("Settings", parent)
        form = QFormLayout(self)
        advanced_fields = QWidget()
        advanced = QFormLayout(advanced_fields)
        advanced.setContentsMargins(0, 0, 0, 0)
        self.tile = QLineEdit()
        self.tile.setPlaceholderText("auto, or Z,Y,X (multiples of the model's divisor)")
        form.addRow("tile", self.tile)
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.9)
        self.overlap.setSingleStep(0.05)
        self.overlap.setValue(0.25)
        form.addRow("overlap", self.overlap)
        self.blend = QComboBox()
        self.blend.addItems(["gaussian", "constant", "crop"])
        advanced.addRow("blend", self.blend)
        self.halo = QLineEdit("0,0,0")
        advanced.addRow("halo (crop)", self.halo)
        self.train_batch = QSpinBox()
        self.train_batch.setRange(1, 256)
        advanced.addRow("train batch", self.train_batch)
        self.eval_batch = QSpinBox()
        self.eval_batch.setRange(0, 256)
        self.eval_batch.setSpecialValueText("auto")
        advanced.addRow("eval batch", self.eval_batch)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        advanced.addRow("device", self.device)
        self.precision = QComboBox()
        self.precision.addItems(["fp32", "tf32", "bf16", "fp16"])
        self.precision.setToolTip(
            "forward precision; reduced precision changes the predictions, and the run measures "
            "by how much against fp32 on a few tiles"
        )
        advanced.addRow("precision", self.precision)
        self.scheduler = QLineEdit()
        self.scheduler.setPlaceholderText("(this process)")
        self.scheduler.setToolTip(
            "address of a running dask.distributed scheduler (tcp://host:8786): the tiles run on "
            "its workers, which must see the model file and the output folder"
        )
        advanced.addRow("cluster", self.scheduler)
        self.normalize = QLineEdit("none")
        self.normalize.setToolTip(
            "none | minmax:LO,HI | meanstd:MEAN,STD | percentile:P_LO,P_HI | zscore; an integer "
            f"image gets {INTEGER_NORMALIZE} until you type your own (or a model brings its own)"
        )
        # Who set the field: "default" (follows the image), "model" (sample or package), "user".
        self.normalize_source = "default"
        self.input_dtype: Any = None
        self.normalize.textEdited.connect(self._on_normalize_edited)
        self.normalize.textChanged.connect(self._update_normalize_note)
        form.addRow("normalize input", self.normalize)
        self.normalize_note = QLabel("")
        self.normalize_note.setWordWrap(True)
        self.normalize_note.setVisible(False)
        form.addRow(self.normalize_note)
        self.activation = QComboBox()
        self.activation.addItems(["none", "sigmoid", "softmax"])
        form.addRow("activation", self.activation)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.01, 0.99)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        advanced.addRow("threshold", self.threshold)
        self.feature_layers = QLineEdit()
        self.feature_layers.setPlaceholderText("(every normalization layer)")
        self.feature_layers.setToolTip(
            "more layers whose input statistics are recorded per tile: module names, "
            "comma separated (as in 'napari-normcheck inspect')"
        )
        advanced.addRow("feature layers", self.feature_layers)
        self.seams = QCheckBox("store the seams maps")
        self.seams.setToolTip(
            "also store and show where overlapping tiles disagree (the command line's --seams)"
        )
        self.seams.setChecked(True)  # the widget shows them; the command line keeps them opt-in
        advanced.addRow(self.seams)
        self.grid_shift = GridShiftField()
        advanced.addRow("grid shift", self.grid_shift)
        row = QHBoxLayout()
        self.out_path = QLineEdit()
        self.out_path.setPlaceholderText("(a new folder in the temporary directory)")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse_out)
        row.addWidget(self.out_path)
        row.addWidget(browse)
        form.addRow("output", row)
        self.overwrite = QCheckBox("overwrite an earlier output")
        for layout in (form, advanced):
            layout.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        form.addRow(self.overwrite)
        # Rarely changed: blending, batches, device, precision, cluster, threshold, feature layers.
        self.advanced = QCollapsible("Advanced")
        self.advanced.addWidget(advanced_fields)
        form.addRow(self.advanced)

    def follow_image(self, layer: Any) -> None:
        """The chosen image changed: an integer one is normalized unless someone chose otherwise."""
        self.input_dtype = layer_dtype(layer)
        if self.normalize_source == "default":
            import numpy as np

            integer = self.input_dtype is not None and np.issubdtype(
                np.dtype(self.input_dtype), np.integer
            )
            self.normalize.setText(INTEGER_NORMALIZE if integer else "none")
        self._update_normalize_note()

    def set_model_normalize(self, text: str) -> None:
        """The normalization a model brings (the sample models, a bioimage.io package)."""
        self.normalize.setText(text)
        self.normalize_source = "model"

    def _on_normalize_edited(self, _text: str) -> None:
        self.normalize_source = "user"

    def _update_normalize_note(self, *_args: Any) -> None:
        note = unscaled_note(self.normalize.text(), self.input_dtype)
        if not note and self.normalize_source == "default" and self.normalize.text() != "none":
            note = (
                f"{self.input_dtype} image: normalized with {self.normalize.text()} "
                "(type none to give the network raw values)"
            )
        self.normalize_note.setText(note)
        self.normalize_note.setVisible(bool(note))

    def _browse_out(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Output OUT.zarr", filter="zarr (*.zarr)")
        if path:
            self.out_path.setText(path if path.endswith(".zarr") else path + ".zarr")

    def options(self) -> dict[str, Any]:
        """The run options of the fields, text as typed (``RunConfig.from_options`` reads them)."""
        return {
            "tile": self.tile.text(),
            "overlap": self.overlap.value(),
            "blend": self.blend.currentText(),
            "halo": self.halo.text(),
            "train_batch": self.train_batch.value(),
            # 0 is the spin box's "auto".
            "eval_batch": self.eval_batch.value() or None,
            "device": self.device.currentText(),
            "precision": self.precision.currentText(),
            "normalize": self.normalize.text(),
            "activation": self.activation.currentText(),
            "threshold": self.threshold.value(),
            "feature_layers": self.feature_layers.text(),
            "seams": self.seams.isChecked(),
            "grid_shift": self.grid_shift.fraction(),
        }

    def config(self, roi: Any = None) -> Any:
        """The :class:`RunConfig` of the fields (raises :class:`NormcheckError` for bad values).

        Parameters
        ----------
        roi : tuple of (int, int), optional
            The region of interest; the whole volume when ``None``.
        """
        from napari_normcheck.core.base.config import RunConfig

        return RunConfig.from_options({**self.options(), "roi": roi})
