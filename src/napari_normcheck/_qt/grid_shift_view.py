"""The grid shift in the widget: the Check tab's option and the Results summary's lines.

The option is off by default, a fraction of a tile step (0.5) when on.

Passed as :attr:`~napari_normcheck.core.base.config.RunConfig.grid_shift` (the command line's
``--grid-shift F``): every prediction is made a second time on a grid moved by ``F`` of a tile step,
and the report says how much the stitched result changes (:mod:`napari_normcheck.core.run.grid_shift`).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QHBoxLayout, QWidget  # noqa: TID253

#: The fraction of a tile step the second grid is moved by when the option is turned on.
DEFAULT_FRACTION = 0.5


class GridShiftField(QWidget):
    """A check box and the fraction; :meth:`fraction` is ``0.0`` while the box is off."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.enabled = QCheckBox("shift the grid by")
        self.enabled.setToolTip(
            "also predict on a second grid moved by this fraction of a tile step and report how much "
            "the stitched result changes (1 - Dice, and the shift diff maps); costs one more set of "
            "forwards per prediction"
        )
        self.amount = QDoubleSpinBox()
        self.amount.setRange(0.05, 0.95)
        self.amount.setSingleStep(0.05)
        self.amount.setValue(DEFAULT_FRACTION)
        self.amount.setSuffix(" step")
        self.amount.setEnabled(False)
        self.enabled.toggled.connect(self.amount.setEnabled)
        row.addWidget(self.enabled)
        row.addWidget(self.amount, 1)

    def fraction(self) -> float:
        """The ``grid_shift`` of the run: the fraction when on, else ``0.0`` (no second grid)."""
        return float(self.amount.value()) if self.enabled.isChecked() else 0.0

    def set_fraction(self, value: float) -> None:
        """Turn the option on with ``value`` (or off with ``0``)."""
        self.enabled.setChecked(bool(value))
        if value:
            self.amount.setValue(float(value))


def grid_shift_lines(summary: dict[str, Any], channel_names: list[str] | None = None) -> list[str]:
    """The summary's lines of a grid-shift run, one per prediction (none without the option).

    ``1 - Dice`` of the stitched result against the one on the moved grid, per channel; a hard value
    that the support rule leaves unjudged (too little foreground) reads ``n/j``.
    """
    values_of = summary.get("grid_shift") or {}
    if not values_of:
        return []
    offset = ",".join(str(v) for v in summary.get("grid_shift_offset") or [])
    lines = [f"grid shift (grid moved by z,y,x {offset}): 1 - Dice of the stitched results"]
    for name, values in values_of.items():
        hard, soft = values.get("hard") or [], values.get("soft") or []
        judged = values.get("judged") or [True] * len(hard)
        parts = []
        for c, soft_value in enumerate(soft):
            label = channel_names[c] if channel_names and c < len(channel_names) else f"ch {c}"
            hard_text = f"{hard[c]:.3f}" if c < len(hard) and judged[c] else "n/j"
            parts.append(f"{label} hard {hard_text} soft {soft_value:.3f}")
        lines.append(f"  {name}: " + "; ".join(parts))
    return lines
