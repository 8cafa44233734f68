"""The dock widget's layout: the Check, Results and Remedies tabs and the run controls below them.

Functions that build the widgets onto a :class:`~napari_normcheck._qt.widget.NormcheckWidget` (the
attributes they set are the widget's public fields: ``image_combo``, ``tile_table``, ...).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QSize, Qt  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import (  # noqa: TID253
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_normcheck._qt.region import REGIONS
from napari_normcheck._qt.remedies_panel import RemediesPanel
from napari_normcheck._qt.settings import SettingsBox
from napari_normcheck._qt.tile_table import TileTable, sort_keys

CHECK, RESULTS, REMEDIES, TILE_SIZE = "Check", "Results", "Remedies", "Tile size"
#: The dock's preferred width (px): napari gives a new dock its preferred width, and the canvas
#: keeps the rest (about 70% of a 1280 px wide window). Users widen the dock by its splitter.
DOCK_WIDTH = 450


class DockTabs(QTabWidget):
    """The dock's tabs, asking for :data:`DOCK_WIDTH` however wide their content could grow."""

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = super().sizeHint()
        return QSize(
            max(min(hint.width(), DOCK_WIDTH), self.minimumSizeHint().width()), hint.height()
        )


def scrolled(content: QWidget) -> QScrollArea:
    """``content`` in a vertical scroll area, as narrow as its narrowest row allows."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(content)
    scroll.setMinimumWidth(
        content.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width() + 4
    )
    return scroll


def build_tabs(widget: Any) -> QTabWidget:
    """The three tabs; sets ``widget.check_tab``, ``results_tab``, ``remedies_tab``.

    The run controls below the tabs (:func:`build_run_box`) belong to the check: the Remedies tab
    hides them and shows its own Run and Cancel.
    """
    tabs = DockTabs()
    check = QWidget()
    layout = QVBoxLayout(check)
    layout.addWidget(build_input_box(widget))
    layout.addWidget(widget._build_model_box())
    widget.settings = SettingsBox(check)
    layout.addWidget(widget.settings)
    layout.addStretch(1)
    # The settings fields, by their names (the sample model choice fills some of them).
    for name in SettingsBox.FIELDS:
        setattr(widget, name, getattr(widget.settings, name))
    widget.check_tab = scrolled(check)
    tabs.addTab(widget.check_tab, CHECK)
    # Scrolled like the other tabs: a long summary never squeezes the plots below their minimum
    # height (their labels cut, the Save button over the axis).
    widget.results_page = build_results(widget)
    widget.results_tab = scrolled(widget.results_page)
    tabs.addTab(widget.results_tab, RESULTS)
    widget.remedies_panel = RemediesPanel(
        widget.viewer,
        widget.remedy_context,
        get_channel=lambda: widget.results.channel,
        get_channel_names=widget.results.labels_for,
    )
    widget.remedies_panel.layers_added.connect(widget.results.order_layers)
    widget.remedies_tab = scrolled(widget.remedies_panel)
    tabs.addTab(widget.remedies_tab, REMEDIES)
    from napari_normcheck._qt.tile_size_view import TileSizeView

    widget.tile_size_view = TileSizeView(widget)
    widget.tile_size_tab = scrolled(widget.tile_size_view)
    tabs.addTab(widget.tile_size_tab, TILE_SIZE)
    narrow_combos(tabs)
    tabs.currentChanged.connect(lambda _index: on_tab_changed(widget))
    # A finished check is what the remedies work on: the panel says so as soon as one settles.
    widget.run_settled.connect(widget.remedies_panel.refresh_context)
    return tabs


def narrow_combos(parent: QWidget, characters: int = 5) -> None:
    """Let every combo box shrink below its longest item (the text is elided, the list is not).

    A combo box asks for the width of its longest item by default: one long layer or model name
    would make the whole dock that wide.
    """
    for combo in parent.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(characters)


def keep_narrow(label: QLabel, width: int = 120) -> None:
    """A wrapped label whose long words (an output path) are clipped rather than widen the dock."""
    label.setMinimumWidth(width)


def on_tab_changed(widget: Any) -> None:
    """One Run and one Cancel per tab: the check's below Check and Results, the panel's in Remedies."""
    on_remedies = widget.tabs.currentWidget() is widget.remedies_tab
    # The Tile size tab has its own Run and Cancel too.
    widget.run_buttons.setVisible(
        not on_remedies and widget.tabs.currentWidget() is not widget.tile_size_tab
    )
    if on_remedies:
        widget.remedies_panel.refresh_context()


def build_input_box(widget: Any) -> QGroupBox:
    """Image layer, pyramid level, region and the Shapes layer of a box region."""
    box = QGroupBox("Input")
    form = QFormLayout(box)
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    widget.image_combo = QComboBox()
    widget.image_combo.currentIndexChanged.connect(widget._on_image_changed)
    form.addRow("image layer", widget.image_combo)
    widget.level_spin = QSpinBox()
    widget.level_spin.setRange(0, 0)
    widget.level_spin.setToolTip("multiscale level to check (0 = full resolution)")
    form.addRow("level", widget.level_spin)
    widget.region_combo = QComboBox()
    widget.region_combo.addItems(REGIONS)
    form.addRow("region", widget.region_combo)
    widget.shapes_combo = QComboBox()
    form.addRow("box layer", widget.shapes_combo)
    from napari_normcheck._qt.url_open import UrlOpenRow

    widget.url_row = UrlOpenRow(widget.viewer)
    form.addRow("open URL", widget.url_row)
    return box


def build_results(widget: Any) -> QWidget:
    """Summary, output channel, tile table and plots (table and plots share a splitter)."""
    page = QWidget()
    layout = QVBoxLayout(page)
    widget.summary_label = QLabel("Run a check: its summary, tiles and plots appear here.")
    widget.summary_label.setWordWrap(True)
    keep_narrow(widget.summary_label)
    widget.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    layout.addWidget(widget.summary_label)
    # Two rows, so that the dock can stay narrow: the channel; the sort order and the export.
    form = QFormLayout()
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    widget.channel_combo = QComboBox()
    widget.channel_combo.setToolTip(
        "the output channel the layers, the table and the plots show (one at a time)"
    )
    widget.channel_combo.currentIndexChanged.connect(widget._on_channel_changed)
    widget.channel_combo.activated.connect(widget._on_channel_activated)
    form.addRow("channel", widget.channel_combo)
    row = QHBoxLayout()
    widget.sort_combo = QComboBox()
    choices = list(sort_keys())
    widget.sort_combo.addItems(choices)
    widget.sort_combo.setToolTip(f"sort the tiles by {', '.join(choices[:-1])} or {choices[-1]}")
    widget.sort_combo.currentTextChanged.connect(lambda name: widget.tile_table.set_sort_key(name))
    row.addWidget(widget.sort_combo, 1)
    widget.report_button = QPushButton("Export report…")
    widget.report_button.setEnabled(False)
    widget.report_button.setToolTip("save the per-tile report of the last run as CSV or JSON")
    widget.report_button.clicked.connect(lambda: widget.export_report())
    row.addWidget(widget.report_button)
    form.addRow("sort by", row)
    layout.addLayout(form)
    splitter = QSplitter(Qt.Orientation.Vertical)
    widget.tile_table = TileTable()
    widget.tile_table.setToolTip("tiles, sorted as chosen above: click one to go there")
    widget.tile_table.tile_activated.connect(widget.go_to_tile)
    splitter.addWidget(widget.tile_table)
    splitter.addWidget(widget._build_plots())
    splitter.setStretchFactor(0, 2)
    splitter.setStretchFactor(1, 3)
    layout.addWidget(splitter, 1)
    return page


def build_run_box(widget: Any) -> QWidget:
    """Run, Cancel and Resume, the progress bar and the status line (below the tabs)."""
    box = QWidget()
    layout = QVBoxLayout(box)
    layout.setContentsMargins(6, 0, 6, 6)
    widget.run_buttons = QWidget()
    row = QHBoxLayout(widget.run_buttons)
    row.setContentsMargins(0, 0, 0, 0)
    widget.run_button = QPushButton("Run")
    widget.run_button.clicked.connect(lambda: widget.run())
    widget.cancel_button = QPushButton("Cancel")
    widget.cancel_button.setEnabled(False)
    widget.cancel_button.clicked.connect(widget.cancel)
    widget.resume_button = QPushButton("Resume")
    widget.resume_button.setEnabled(False)
    widget.resume_button.setToolTip("continue the stopped run in the same output, same settings")
    widget.resume_button.clicked.connect(lambda: widget.resume())
    for button in (widget.run_button, widget.cancel_button, widget.resume_button):
        row.addWidget(button)
    layout.addWidget(widget.run_buttons)
    widget.progress = QProgressBar()
    widget.progress.setFormat("%v / %m tiles")
    layout.addWidget(widget.progress)
    widget.status_label = QLabel("")
    widget.status_label.setWordWrap(True)
    keep_narrow(widget.status_label)
    layout.addWidget(widget.status_label)
    return box
