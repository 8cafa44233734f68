"""A table of tiles sorted by disparity; clicking a row asks to go to that tile.

The values shown are those of the chosen output channel (:attr:`TileTable.channel`), or the
largest over the channels when none is chosen.
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import Qt, Signal  # noqa: TID253 (the Qt layer)
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem  # noqa: TID253

COLUMNS = (
    "tile",
    "grid z,y,x",
    "soft disparity",
    "hard disparity",
    "mismatch (eval)",
    "feature |z|",
)


def _feature_z(record: dict[str, Any]) -> float:
    summary = record.get("feature_z") or {}
    value = summary.get("max_abs")
    return math.nan if value is None else float(value)


# What the table can be sorted by (largest first): the value of a record for a channel.
SORT_KEYS = {
    "disparity": lambda r, c=None: channel_value(r.get("disparity_soft"), c),
    "mismatch (eval)": lambda r, c=None: channel_value(
        r.get("mismatch_eval_soft") or r.get("mismatch_eval"), c
    ),
    "feature z": lambda r, c=None: _feature_z(r),
}


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


def _number_item(value: float, digits: int = 4) -> QTableWidgetItem:
    item = QTableWidgetItem("-" if math.isnan(value) else f"{value:.{digits}f}")
    item.setData(Qt.ItemDataRole.UserRole, value)
    return item


class TileTable(QTableWidget):
    """Tiles of a run, most disparate first (or by eval mismatch, or by feature z).

    Each record is a dict as in :attr:`TileDone.metrics` or the run summary's ``tiles`` list:
    ``index``, ``grid`` and per-channel ``disparity_soft`` / ``disparity_hard`` lists. The table
    shows the largest channel value of each.

    Signals
    -------
    tile_activated : Signal(int)
        Emitted with the tile index when a row is clicked.
    """

    tile_activated = Signal(int)

    def __init__(self, parent: Any = None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.verticalHeader().setVisible(False)
        self.records: dict[int, dict[str, Any]] = {}
        self.sort_key = "disparity"
        self.channel: int | None = None
        self.cellClicked.connect(self._on_clicked)

    def set_sort_key(self, name: str) -> None:
        """Sort by ``name`` (a key of :data:`SORT_KEYS`), largest first."""
        if name not in SORT_KEYS:
            raise ValueError(f"unknown sort key {name!r}; use one of {', '.join(SORT_KEYS)}")
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
        value_of = SORT_KEYS[self.sort_key]

        def key(index: int) -> tuple[bool, float, int]:
            value = value_of(self.records[index], self.channel)
            return (math.isnan(value), -value if not math.isnan(value) else 0.0, index)

        return sorted(self.records, key=key)

    def redraw(self) -> None:
        """Fill the table from the records, sorted by the sort key (the selected tile stays)."""
        selected = self.selected_tile()
        order = self.sorted_indices()
        self.setRowCount(len(order))
        for row, index in enumerate(order):
            record = self.records[index]
            tile_item = QTableWidgetItem(str(index))
            tile_item.setData(Qt.ItemDataRole.UserRole, index)
            self.setItem(row, 0, tile_item)
            grid = record.get("grid") or ()
            self.setItem(row, 1, QTableWidgetItem(",".join(str(g) for g in grid)))
            channel = self.channel
            self.setItem(row, 2, _number_item(channel_value(record.get("disparity_soft"), channel)))
            self.setItem(row, 3, _number_item(channel_value(record.get("disparity_hard"), channel)))
            self.setItem(row, 4, _number_item(SORT_KEYS["mismatch (eval)"](record, channel)))
            self.setItem(row, 5, _number_item(_feature_z(record), digits=2))
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
