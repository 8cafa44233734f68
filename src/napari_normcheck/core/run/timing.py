"""Seconds per named stage of a run: every second of a run's wall time belongs to one stage."""

from __future__ import annotations

from dataclasses import dataclass

# Stages of the run's own thread; they add up to ``total`` (what is left is reported as ``other``).
# ``read`` and ``writer`` are the reader and writer threads' times; they overlap the forwards.
MAIN_THREAD_STAGES = (
    "setup",
    "read_wait",
    "shared_wait",
    "forward_eval",
    "forward_train",
    "forward_remedies",
    "stitch",
    "spill",
    "trim",
    "metrics",
    "write",
    "write_wait",
    "events",
    "finish",
)


@dataclass
class Timing:
    """Seconds spent per stage.

    Attributes
    ----------
    setup : float
        Planning, probing the model and creating OUT, before the first tile.
    read : float
        The reader thread reading, normalizing and padding tiles (overlaps the forwards).
    read_wait : float
        The run waiting for the reader thread (disk slower than the model).
    shared_wait : float
        Sharing the predictions of a distributed block's border tiles: writing those this loop
        predicted for the other blocks, and waiting for and reading those another block predicted
        (:mod:`~napari_normcheck.core.run.shared_forwards`).
    forward_eval, forward_train : float
        The model's forwards per mode, feature statistics included.
    forward_remedies : float
        The forwards of the remedies' predictions (``run --remedies``).
    stitch : float
        Blending tile predictions into output chunks.
    spill : float
        Moving unfinished chunks to disk and back when they exceed ``--cache-mb`` (part of
        stitching; the price of memory that does not grow with the volume).
    trim : float
        Handing freed memory back to the system (``malloc_trim``, at most every 0.5 s; see
        :mod:`~napari_normcheck.core.run.heap`).
    slab_spill : float
        The metrics thread moving overlap slabs to disk and back beyond their budget (overlaps
        stitching).
    metrics : float
        Disparity, tile mismatch and seams (activation included).
    write : float
        Handing finished chunks to the writer thread.
    writer : float
        The writer thread activating finished chunks, summing their disparity, compressing and
        writing them with their pyramid levels (overlaps the forwards).
    write_wait : float
        The run waiting for the writer thread (the disk or compression slower than the model).
    events : float
        The caller handling progress events (a progress bar, the widget).
    finish : float
        Tile grids, the summary and the completion marker.
    total : float
        Wall time of the run.
    """

    setup: float = 0.0
    read: float = 0.0
    read_wait: float = 0.0
    shared_wait: float = 0.0
    forward_eval: float = 0.0
    forward_train: float = 0.0
    forward_remedies: float = 0.0
    stitch: float = 0.0
    spill: float = 0.0
    trim: float = 0.0
    slab_spill: float = 0.0
    metrics: float = 0.0
    write: float = 0.0
    writer: float = 0.0
    write_wait: float = 0.0
    events: float = 0.0
    finish: float = 0.0
    total: float = 0.0

    @property
    def other(self) -> float:
        """Seconds of the wall time in no named stage."""
        return self.total - sum(getattr(self, name) for name in MAIN_THREAD_STAGES)

    def to_dict(self) -> dict[str, float]:
        """Rounded seconds per stage, with ``other`` (the wall time not in a named stage)."""
        values = {k: round(v, 4) for k, v in self.__dict__.items()}
        if self.total:
            values["other"] = round(self.other, 4)
        return values

    def add(self, other: dict[str, float]) -> None:
        """Add another run part's seconds (a distributed block's), except the total."""
        for key, value in other.items():
            if key not in ("total", "other") and key in self.__dict__:
                setattr(self, key, getattr(self, key) + value)
