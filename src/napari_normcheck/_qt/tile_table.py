"""A table of tiles sorted by disparity; clicking a row asks to go to that tile."""

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


# What the table can be sorted by (largest first): the value of a record.
SORT_KEYS = {
    "disparity": lambda r: _largest(r.get("disparity_soft")),
    "mismatch (eval)": lambda r: _largest(r.get("mismatch_eval_soft") or r.get("mismatch_eval")),
    "feature z": _feature_z,
}


def _largest(values: Any) -> float:
    """The largest finite value of a per-channel list (NaN when there is none)."""
    finite = [float(v) for v in (values or []) if v is not None and math.isfinite(float(v))]
    return max(finite) if finite else math.nan


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
        self.cellClicked.connect(self._on_clicked)

    def set_sort_key(self, name: str) -> None:
        """Sort by ``name`` (a key of :data:`SORT_KEYS`), largest first."""
        if name not in SORT_KEYS:
            raise ValueError(f"unknown sort key {name!r}; use one of {', '.join(SORT_KEYS)}")
        self.sort_key = name
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
            value = value_of(self.records[index])
            return (math.isnan(value), -value if not math.isnan(value) else 0.0, index)

        return sorted(self.records, key=key)

    def redraw(self) -> None:
        """Fill the table from the records, sorted by disparity."""
        order = self.sorted_indices()
        self.setRowCount(len(order))
        for row, index in enumerate(order):
            record = self.records[index]
            tile_item = QTableWidgetItem(str(index))
            tile_item.setData(Qt.ItemDataRole.UserRole, index)
            self.setItem(row, 0, tile_item)
            grid = record.get("grid") or ()
            self.setItem(row, 1, QTableWidgetItem(",".join(str(g) for g in grid)))
            self.setItem(row, 2, _number_item(_largest(record.get("disparity_soft"))))
            self.setItem(row, 3, _number_item(_largest(record.get("disparity_hard"))))
            self.setItem(row, 4, _number_item(SORT_KEYS["mismatch (eval)"](record)))
            self.setItem(row, 5, _number_item(_feature_z(record), digits=2))
        self.resizeColumnsToContents()

    def tile_at_row(self, row: int) -> int:
        """The tile index shown in ``row``."""
        return int(self.item(row, 0).data(Qt.ItemDataRole.UserRole))

    def _on_clicked(self, row: int, _column: int) -> None:
        self.tile_activated.emit(self.tile_at_row(row))
