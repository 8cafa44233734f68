"""A table of tiles sorted by disparity; clicking a row asks to go to that tile.

Its sort choices and metric columns are the tile metrics with a ``sort`` name in the output
registry (:mod:`napari_normcheck.core.run.registry`), then, for a run with ``--grid-shift``, the
per-tile grid shift (eval; "-" where the tile has too little foreground), then feature ``|z|``. The values shown are those of the chosen output channel (:attr:`TileTable.channel`), or the
largest over the channels when none is chosen.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QSize, Qt, Signal  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem  # noqa: TID253

from napari_normcheck.core.run import registry

Value = Callable[..., float]  # (record, channel=None) -> the value shown and sorted by

#: The sort choice that is not a registered tile metric: the tile's feature ``|z|``.
FEATURE_Z_SORT = "feature z"

#: Record keys of hard values (a Dice of thresholded predictions): not judged where the
#: foreground is too small (the record's ``judged``), shown as "-" and never ranked.
HARD_KEYS = frozenset({"disparity_hard", "mismatch_eval", "mismatch_train"})

#: Tooltips of the table's columns and the sort choices, by the words they start with.
WORDS = {
    "soft": "soft: 1 − Dice of the probabilities themselves (how much they move), 0–1",
    "hard": (
        "hard: 1 − Dice of the thresholded masks (how much the segmentation changes), 0–1; "
        "'-' where the tile has too little foreground to judge"
    ),
    "flips": "flips: fraction of the tile's voxels whose thresholded label changes, 0–1",
    "mismatch": (
        "mismatch: 1 − Dice of overlapping tiles' eval predictions where they overlap, 0–1: "
        "where seams come from"
    ),
    "feature": (
        "|feature z|: how far the tile's mean input to a normalization layer lies from the "
        "layer's running mean, in running standard deviations"
    ),
    "shift": (
        "grid shift: soft 1 − Dice of the stitched eval result against the result on a grid "
        "moved by part of a step (--grid-shift), over the output chunks the tile writes, 0–1: "
        "how much the tiling moves the result here; '-' where the tile has too little "
        "foreground to judge"
    ),
    "grid": "the tile's position in the tile grid (z, y, x)",
    "tile": "the tile's number in scan order",
}


def tooltip(header: str) -> str:
    """The tooltip of a column or sort choice: what its words mean."""
    words = header.replace("|", " ").replace("(", " ").split()
    if words == ["disparity"]:  # the sort choice: the soft one
        words = ["soft"]
    if "shift" in words:  # not the tile's grid position
        words = ["shift"]
    return "\n".join(text for key, text in WORDS.items() if key in words)


#: Characters per line of a column header: headers wrap so that the columns stay as narrow as
#: their numbers and every column fits the dock (Qt's header does not wrap by itself).
HEADER_LINE = 9


def header_text(header: str, width: int = HEADER_LINE) -> str:
    """``header`` as shown: on lines of at most ``width`` characters, words kept whole.

    ``"soft disparity"`` is shown as ``soft`` over ``disparity``; :func:`header_name` gives the
    header back.
    """
    return "\n".join(textwrap.wrap(header, width, break_long_words=False)) or header


def header_name(text: str) -> str:
    """The header a column's shown text stands for (the inverse of :func:`header_text`)."""
    return text.replace("\n", " ")


def judged(record: dict[str, Any], channel: int) -> bool:
    """The tile's hard values of ``channel`` rest on enough foreground (no ``judged``: yes)."""
    flags = record.get("judged")
    if not isinstance(flags, (list, tuple)) or not 0 <= channel < len(flags):
        return True
    return bool(flags[channel])


def feature_z_value(layer: str | None = None, feature_channel: int | None = None) -> Value:
    """A record's ``|z|`` of a normalization layer's channel.

    The largest over the layers when ``layer`` is ``None``.
    """

    def value(record: dict[str, Any], _channel: int | None = None) -> float:
        if layer is None:
            found = (record.get("feature_z") or {}).get("max_abs")
        else:
            z = ((record.get("features") or {}).get(layer) or {}).get("z")
            found = channel_value(z, feature_channel)
        return math.nan if found is None else abs(float(found))

    return value


_feature_z = feature_z_value()


def metric_value(key: str) -> Value:
    """A tile metric's value in a record, for one channel (the largest when ``None``).

    A metric with a soft variant stored beside it (``mismatch_eval_soft``) shows that one. A hard
    value of a channel that is not judged (the record's ``judged``) is NaN: "-", ranked last.
    """

    def value(record: dict[str, Any], channel: int | None = None) -> float:
        soft = record.get(f"{key}_soft")
        values = list(soft or record.get(key) or [])
        if not soft and key in HARD_KEYS:
            values = [v if judged(record, c) else None for c, v in enumerate(values)]
        return channel_value(values, channel)

    return value


def sort_keys() -> dict[str, Value]:
    """What the table can be sorted by (largest first), by name in the sort choice.

    Every tile metric with a ``sort`` name in the output registry, then ``feature z``.
    """
    keys = {m.sort: metric_value(m.key) for m in registry.TILE_METRICS if m.sort}
    keys[FEATURE_Z_SORT] = _feature_z
    return keys


#: Rows the table shows at least (Qt's minimum height of the table is kept at or above it).
MIN_ROWS = 8


def metric_columns() -> list[tuple[str, Value]]:
    """``(header, value)`` of the metric columns: one per tile metric with a ``sort`` name.

    A soft metric (``disparity_soft``) with a registered hard partner (``disparity_hard``) gets
    both side by side: ``soft disparity``, ``hard disparity``.
    """
    keys = {m.key for m in registry.TILE_METRICS}
    columns: list[tuple[str, Value]] = []
    for metric in registry.TILE_METRICS:
        if not metric.sort:
            continue
        stem = metric.key.removesuffix("_soft")
        if stem != metric.key and f"{stem}_hard" in keys:
            columns.append((f"soft {metric.sort}", metric_value(metric.key)))
            columns.append((f"hard {metric.sort}", metric_value(f"{stem}_hard")))
        else:
            columns.append((metric.sort, metric_value(metric.key)))
    return columns


#: The grid-shift column's header: shown only for a run with ``--grid-shift``.
GRID_SHIFT_HEADER = "grid shift (eval)"


def grid_shift_value(mode: str = "eval") -> Value:
    """A record's per-tile grid shift of ``mode`` (soft), NaN ("-") where it is not judged.

    The support rule: the record's ``grid_shift_<mode>_judged`` (the soft foreground of the
    chunks the tile writes); a record without the flags shows its values.
    """

    def value(record: dict[str, Any], channel: int | None = None) -> float:
        values = list(record.get(f"grid_shift_{mode}") or [])
        flags = record.get(f"grid_shift_{mode}_judged")
        if isinstance(flags, (list, tuple)):
            values = [v if c < len(flags) and flags[c] else None for c, v in enumerate(values)]
        return channel_value(values, channel)

    return value


def has_grid_shift(records: Any) -> bool:
    """Whether any record has a per-tile grid shift (the run had ``--grid-shift``)."""
    return any(record.get("grid_shift_eval") is not None for record in records)


def column_headers() -> tuple[str, ...]:
    """The table's column headers: tile, grid position, the metric columns, feature ``|z|``."""
    return ("tile", "grid z,y,x", *(header for header, _ in metric_columns()), "feature |z|")


def _largest(values: Any) -> float:
    """The largest finite value of a per-channel list (NaN when there is none)."""
    finite = [float(v) for v in (values or []) if v is not None and math.isfinite(float(v))]
    return max(finite) if finite else math.nan


def channel_value(values: Any, channel: int | None = None) -> float:
    """One channel's value of a per-channel list (the largest when ``channel`` is ``None``)."""
    if channel is None:
        return _largest(values)
    values = list(values or [])
    if not 0 <= channel < len(values) or values[channel] is None:
        return math.nan
    return float(values[channel])


def _number_item(value: float, digits: int = 3) -> QTableWidgetItem:
    item = QTableWidgetItem("-" if math.isnan(value) else f"{value:.{digits}f}")
    item.setData(Qt.ItemDataRole.UserRole, value)
    return item


class TileTable(QTableWidget):
    """Tiles of a run, most disparate first (or by another metric of :func:`sort_keys`).

    Each record is a dict as in :attr:`TileDone.metrics` or the run summary's ``tiles`` list:
    ``index``, ``grid`` and per-channel lists under the tile metrics' keys (``disparity_soft``,
    ...). The table shows the chosen channel's value of each, or the largest.

    Signals
    -------
    tile_activated : Signal(int)
        Emitted with the tile index when a row is clicked.
    """

    tile_activated = Signal(int)

    def __init__(self, parent: Any = None) -> None:
        self.metric_columns = metric_columns()
        headers = column_headers()
        super().__init__(0, len(headers), parent)
        self.setHorizontalHeaderLabels([header_text(h) for h in headers])
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.verticalHeader().setVisible(False)
        for column, header in enumerate(headers):
            self.horizontalHeaderItem(column).setToolTip(tooltip(header))
        self.records: dict[int, dict[str, Any]] = {}
        self.sort_key = "disparity"
        self.channel: int | None = None
        self.feature_value: Value = _feature_z
        self.feature: tuple[str | None, int | None] = (None, None)
        self._feature_text: str | None = None
        self.shift_columns: list[tuple[str, Value]] = []
        self.cellClicked.connect(self._on_clicked)

    def rows_height(self, rows: int = MIN_ROWS) -> int:
        """Height that shows the header (as its labels are now) and ``rows`` rows."""
        header = self.horizontalHeader().sizeHint().height()  # (its labels' lines included)
        # (the horizontal scroll bar shows when the columns are wider than the dock)
        scroll_bar = self.horizontalScrollBar().sizeHint().height()
        rows_height = rows * self.verticalHeader().defaultSectionSize()
        return header + rows_height + scroll_bar + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        """Qt's minimum size, never below :data:`MIN_ROWS` rows under the header as it is now.

        Asked for again whenever the layout is (the header's lines and the style's fonts change
        once the table is shown and named).
        """
        hint = super().minimumSizeHint()
        return QSize(hint.width(), max(hint.height(), self.rows_height()))

    def set_feature(
        self, layer: str | None, feature_channel: int | None, text: str | None = None
    ) -> None:
        """The feature ``|z|`` column shows this normalization layer and channel (the plots').

        ``None``: the largest ``|z|`` over all layers, and the header says so. ``text`` is the
        layer's readable name (type and place); its module path goes to the header's tooltip.
        """
        if (layer, feature_channel, text) == (*self.feature, self._feature_text):
            return
        self.feature = (layer, feature_channel)
        self._feature_text = text
        self.feature_value = feature_z_value(layer, feature_channel)
        # The layer is named in the plot's title and in the tooltip: the header stays as narrow
        # as the column's numbers.
        if layer is None:
            header = "largest\n|feature z|"
            tip = tooltip("largest |feature z| (all layers)") + "\n(the largest over all layers)"
        else:
            header = "feature\n|z|\n(plotted)"
            tip = (
                f"{tooltip('|feature z|')}\nin {text or layer}, channel {feature_channel}: the "
                f"layer and channel the plots show (module {layer})"
            )
        item = QTableWidgetItem(header)
        item.setToolTip(tip)
        self.setHorizontalHeaderItem(self.columnCount() - 1, item)
        self.updateGeometry()  # (the header's height follows its lines: rows stay in view)
        self.redraw()

    def set_sort_key(self, name: str) -> None:
        """Sort by ``name`` (a key of :func:`sort_keys`), largest first."""
        keys = sort_keys()
        if name not in keys:
            raise ValueError(f"unknown sort key {name!r}; use one of {', '.join(keys)}")
        self.sort_key = name
        self.redraw()

    def set_channel(self, channel: int | None) -> None:
        """Show (and sort by) output channel ``channel`` (the largest value when ``None``)."""
        self.channel = channel
        self.redraw()

    def clear_records(self) -> None:
        """Forget all tiles."""
        self.records = {}
        self.setRowCount(0)
        self._update_shift_columns()

    def add_record(self, record: dict[str, Any], redraw: bool = True) -> None:
        """Add or replace the record of one tile."""
        self.records[int(record["index"])] = record
        if redraw:
            self.redraw()

    def set_records(self, records: list[dict[str, Any]]) -> None:
        """Replace all records."""
        self.records = {int(r["index"]): r for r in records}
        self.redraw()

    def sorted_indices(self) -> list[int]:
        """Tile indices, largest value of the sort key first (unknown values last)."""
        value_of = (
            self.feature_value if self.sort_key == FEATURE_Z_SORT else sort_keys()[self.sort_key]
        )

        def key(index: int) -> tuple[bool, float, int]:
            value = value_of(self.records[index], self.channel)
            return (math.isnan(value), -value if not math.isnan(value) else 0.0, index)

        return sorted(self.records, key=key)

    def _update_shift_columns(self) -> None:
        # The grid-shift column sits before feature |z| (always last), only when a run has it.
        wanted = (
            [(GRID_SHIFT_HEADER, grid_shift_value("eval"))]
            if has_grid_shift(self.records.values())
            else []
        )
        if [h for h, _ in wanted] == [h for h, _ in self.shift_columns]:
            return
        feature = self.takeHorizontalHeaderItem(self.columnCount() - 1)
        first = 2 + len(self.metric_columns)
        self.setColumnCount(first + len(wanted) + 1)
        for column, (header, _value) in enumerate(wanted, start=first):
            item = QTableWidgetItem(header_text(header))
            item.setToolTip(tooltip(header))
            self.setHorizontalHeaderItem(column, item)
        self.setHorizontalHeaderItem(self.columnCount() - 1, feature)
        self.shift_columns = wanted

    def redraw(self) -> None:
        """Fill the table from the records, sorted by the sort key (the selected tile stays)."""
        selected = self.selected_tile()
        self._update_shift_columns()
        order = self.sorted_indices()
        self.setRowCount(len(order))
        for row, index in enumerate(order):
            record = self.records[index]
            tile_item = QTableWidgetItem(str(index))
            tile_item.setData(Qt.ItemDataRole.UserRole, index)
            self.setItem(row, 0, tile_item)
            grid = record.get("grid") or ()
            self.setItem(row, 1, QTableWidgetItem(",".join(str(g) for g in grid)))
            columns = [*self.metric_columns, *self.shift_columns]
            for column, (_header, value) in enumerate(columns, start=2):
                self.setItem(row, column, _number_item(value(record, self.channel)))
            self.setItem(
                row, self.columnCount() - 1, _number_item(self.feature_value(record), digits=2)
            )
        self.resizeColumnsToContents()
        if selected is not None:
            self.select_tile(selected)

    def selected_tile(self) -> int | None:
        """The tile of the selected row, or ``None``."""
        rows = self.selectionModel().selectedRows() if self.selectionModel() else []
        return self.tile_at_row(rows[0].row()) if rows else None

    def select_tile(self, index: int) -> None:
        """Select (and scroll to) the row of tile ``index``, without emitting :attr:`tile_activated`."""
        for row in range(self.rowCount()):
            if self.tile_at_row(row) == index:
                self.blockSignals(True)
                self.selectRow(row)
                self.blockSignals(False)
                self.scrollToItem(self.item(row, 0))
                return

    def tile_at_row(self, row: int) -> int:
        """The tile index shown in ``row``."""
        return int(self.item(row, 0).data(Qt.ItemDataRole.UserRole))

    def _on_clicked(self, row: int, _column: int) -> None:
        self.tile_activated.emit(self.tile_at_row(row))
