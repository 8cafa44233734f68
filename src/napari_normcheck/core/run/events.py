"""The progress events of a run, single-process or distributed: what callers iterate over.

The command line turns them into a progress bar, the napari widget into layers that fill in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_normcheck.core.base.tiling import Tile, TilePlan


@dataclass(frozen=True)
class RunStarted:
    """Emitted once the plan is fixed and the output store exists."""

    out: Path
    plan: TilePlan
    device: str
    eval_batch: int


@dataclass(frozen=True)
class TileDone:
    """Emitted after a tile's two predictions have been stitched."""

    tile: Tile
    n_done: int
    n_total: int
    elapsed: float
    chunks_written: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFinished:
    """Emitted last, after the completion marker; ``summary`` is what the marker holds."""

    out: Path
    summary: dict[str, Any]


@dataclass(frozen=True)
class BlockDone:
    """Emitted by a distributed run when a block's task has finished and is recorded."""

    block: int
    n_done: int
    n_total: int
    elapsed: float
    tiles_run: int
    worker: str
