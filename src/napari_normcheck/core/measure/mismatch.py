"""Tile mismatch: how much overlapping tiles disagree on the voxels they share (tiling artifacts).

For every pair of tiles whose prediction boxes overlap (blend modes with overlap > 0, or crop mode with a
halo), their own predictions on the shared voxels are compared, in eval and in train mode separately:
mismatch = ``1 - Dice`` (hard and soft, per channel). A tile's mismatch is the mean over its neighbours;
the global value comes from sums over all pairs. Only the overlap slabs of tiles whose later neighbours
are not computed yet are held in memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_normcheck.core.base.modes import MODES
from napari_normcheck.core.base.tiling import Tile, TilePlan
from napari_normcheck.core.measure.metrics import dice_sums, disparity_from_sums
from napari_normcheck.core.measure.slabs import SlabStore
from napari_normcheck.core.measure.support import (
    DEFAULT_MIN_FOREGROUND,
    MinForeground,
    foreground_from_sums,
    judged_mask,
)


def prediction_box(plan: TilePlan, tile: Tile) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The voxels a tile predicts inside the ROI: its whole window (halo included) clipped to the ROI."""
    start = tuple(max(w, r) for w, r in zip(tile.window_start, plan.roi_start))
    stop = tuple(
        min(w + s, r) for w, s, r in zip(tile.window_start, plan.window_shape, plan.roi_stop)
    )
    return start, stop


def _intersect(a, b):
    start = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    stop = tuple(min(x, y) for x, y in zip(a[1], b[1]))
    return (start, stop) if all(s < e for s, e in zip(start, stop)) else None


def tile_pairs(
    plan: TilePlan, tiles: list[int] | None = None
) -> dict[int, list[tuple[int, tuple]]]:
    """For each tile, its overlapping neighbours ``(index, shared_box)`` (both directions).

    With ``tiles`` (a distributed block's tiles) only those tiles and pairs among them are listed.
    """
    chosen = None if tiles is None else set(tiles)
    by_grid = {
        tuple(g): i
        for i, g in enumerate(plan.grid_positions.tolist())
        if chosen is None or i in chosen
    }
    steps = []
    for d in range(3):
        starts = np.unique(plan.window_starts[:, d])
        steps.append(int(np.diff(starts).min()) if len(starts) > 1 else plan.window_shape[d])
    reach = [math.ceil(w / max(s, 1)) for w, s in zip(plan.window_shape, steps)]
    boxes = {i: prediction_box(plan, plan.get_tile(i)) for i in by_grid.values()}
    neighbours: dict[int, list[tuple[int, tuple]]] = {i: [] for i in sorted(by_grid.values())}
    offsets = [o for o in itertools.product(*(range(-r, r + 1) for r in reach)) if any(o)]
    for grid, i in by_grid.items():
        for offset in offsets:
            j = by_grid.get(tuple(g + o for g, o in zip(grid, offset)))
            if j is None:
                continue
            shared = _intersect(boxes[i], boxes[j])
            if shared is not None:
                neighbours[i].append((j, shared))
    return neighbours


def _slabs_kept(
    plan: TilePlan, neighbours: dict[int, list[tuple[int, tuple]]]
) -> tuple[dict[int, list], dict[tuple[int, int], tuple[tuple[int, int], tuple[slice, ...]]]]:
    """Which part of each tile waits for its later neighbours, and where each pair finds it.

    A tile's later neighbours are grouped by the slowest grid axis along which they lie ahead of
    it (next in the row, the next row, the next z-layer); one slab per group, the box around the
    group's shared boxes, is kept, and each pair reads its shared box from it. The corner and
    edge neighbours' boxes lie inside the face's, so a tile keeps three faces instead of thirteen
    overlapping slabs (in 3D), half the bytes waiting across a z-layer.

    Returns
    -------
    kept : dict
        ``{i: [((i, axis), (start, stop)), ...]}``: the slabs tile ``i`` keeps, by key.
    slab_of : dict
        ``{(i, j): ((i, axis), index)}``: pair ``(i, j)``'s slab and its shared box within it.
    """
    grid = plan.grid_positions.tolist()
    groups: dict[tuple[int, int], list[tuple[int, tuple]]] = {}
    for i, pairs in neighbours.items():
        for j, shared in pairs:
            if j > i:
                axis = next((d for d, (a, b) in enumerate(zip(grid[i], grid[j])) if a != b), 0)
                groups.setdefault((i, axis), []).append((j, shared))
    kept: dict[int, list] = {i: [] for i in neighbours}
    slab_of = {}
    for key, members in groups.items():
        start = tuple(min(values) for values in zip(*(box[0] for _, box in members)))
        stop = tuple(max(values) for values in zip(*(box[1] for _, box in members)))
        kept[key[0]].append((key, (start, stop)))
        for j, (a, b) in members:
            index = tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start))
            slab_of[(key[0], j)] = (key, (slice(None), slice(None), *index))
    return kept, slab_of


@dataclass
class MismatchTracker:
    """Accumulates pairwise mismatch sums as tiles finish, in scan order, one entry per tile pair.

    ``tiles`` restricts it to the pairs among those tiles (a distributed block's task). Overlap
    slabs waiting for a later neighbour take at most ``max_slab_bytes`` of memory; the oldest go to
    ``scratch_dir`` beyond it (see :class:`~napari_normcheck.core.measure.slabs.SlabStore`).
    """

    plan: TilePlan
    n_channels: int
    threshold: float = 0.5
    on_pair: Callable[[tuple[int, ...], tuple[int, ...], np.ndarray], None] | None = None
    tiles: list[int] | None = None
    max_slab_bytes: int | None = None
    scratch_dir: str | Path | None = None
    names: tuple[str, ...] = MODES
    neighbours: dict[int, list[tuple[int, tuple]]] = field(init=False)
    pair_sums: dict[tuple[int, int], dict[str, dict[str, np.ndarray]]] = field(init=False)
    _slabs: SlabStore = field(init=False)

    def __post_init__(self) -> None:
        self.neighbours = tile_pairs(self.plan, self.tiles)
        self._kept, self._slab_of = _slabs_kept(self.plan, self.neighbours)
        # The later tiles each kept slab still waits for, in scan order.
        self._waiting = {key: [] for boxes in self._kept.values() for key, _ in boxes}
        for (_, j), (key, _) in sorted(self._slab_of.items(), key=lambda item: item[0][1]):
            self._waiting[key].append(j)
        # Beyond the budget, the slab whose next tile runs last spills.
        self._slabs = SlabStore(self.max_slab_bytes, self.scratch_dir, next_use=self._next_use)
        self.pair_sums = {}

    def _next_use(self, key: tuple[int, int]) -> int:
        waiting = self._waiting[key]
        return waiting[0] if waiting else -1

    @property
    def slab_spill_seconds(self) -> float:
        """Seconds spent moving pending slabs to disk and back (beyond their memory budget)."""
        return self._slabs.spill_seconds

    @property
    def n_pairs(self) -> int:
        """Number of overlapping tile pairs."""
        return sum(len(v) for v in self.neighbours.values()) // 2

    def missing_partners(self, index: int) -> list[int]:
        """Earlier neighbours whose pair with ``index`` has no sums yet (resume reruns them)."""
        return [
            j for j, _ in self.neighbours[index] if j < index and (j, index) not in self.pair_sums
        ]

    def add(self, tile: Tile, probabilities: Any) -> None:
        """Add a tile's own probabilities ``(len(names), C, *prediction_box shape)``.

        An array, or a tensor on the run's device: its slabs then wait there (up to the budget)
        and the pair sums run there (:func:`~napari_normcheck.core.measure.metrics.dice_sums`).
        """
        box_start, _ = prediction_box(self.plan, tile)
        i = tile.index

        def part(start, stop):
            local = tuple(slice(a - b, c - b) for a, c, b in zip(start, stop, box_start))
            return probabilities[(slice(None), slice(None), *local)]

        for j, (start, stop) in self.neighbours[i]:
            if j > i:
                continue
            key, index = self._slab_of[(j, i)]
            waiting = self._waiting[key]
            if i in waiting:
                waiting.remove(i)
            theirs = self._slabs.take(key, index, last=not waiting)
            if theirs is None:  # the earlier tile was not rerun on resume: its pair sums are kept
                continue
            mine = part(start, stop)
            self.pair_sums[(j, i)] = {
                mode: dice_sums(theirs[m], mine[m], self.threshold)
                for m, mode in enumerate(self.names)
            }
            if self.on_pair is not None:
                difference = abs(theirs - mine)
                if not isinstance(difference, np.ndarray):
                    difference = difference.cpu().numpy()
                self.on_pair(start, stop, difference)
        for key, (start, stop) in self._kept[i]:
            self._slabs.put(key, part(start, stop))

    def close(self) -> None:
        """Drop the slabs still waiting (an interrupted run) and their spill file."""
        self._slabs.close()

    def result(self) -> dict[str, dict[str, list[float]]]:
        """Global mismatch per prediction: ``{"eval": {"hard": [...], "soft": [...]}, ...}``."""
        result = {}
        for mode in self.names:
            result[mode] = {}
            for kind in ("hard", "soft"):
                total = np.zeros((2, self.n_channels))
                for sums in self.pair_sums.values():
                    total = total + sums[mode][kind]
                result[mode][kind] = disparity_from_sums(total)
        return result

    def tile_mismatch(self, index: int) -> dict[str, list[float] | None]:
        """Mean mismatch over a tile's neighbours per channel (``None`` for a tile without any)."""
        pairs = [
            self.pair_sums[key]
            for key in ((min(index, j), max(index, j)) for j, _ in self.neighbours[index])
            if key in self.pair_sums
        ]
        return {
            f"{mode}_{kind}": (
                np.mean([disparity_from_sums(p[mode][kind]) for p in pairs], axis=0).tolist()
                if pairs
                else None
            )
            for mode in self.names
            for kind in ("hard", "soft")
        }

    def _pairs_of(self, index: int | None) -> list[tuple[int, int]]:
        if index is None:
            return list(self.pair_sums)
        keys = ((min(index, j), max(index, j)) for j, _ in self.neighbours[index])
        return [key for key in keys if key in self.pair_sums]

    def support(self, mode: str, index: int | None = None) -> tuple[list[int], list[float], int]:
        """What the mismatch of prediction ``mode`` rests on, over its tile pairs.

        Over all pairs, or ``index``'s pairs with its neighbours: the hard foreground
        ``|A| + |B|`` per channel, the soft one ``sum(p) + sum(q)`` per channel, and the voxels
        compared (a voxel shared by several pairs counts once per pair, as in the Dice sums).
        """
        hard = np.zeros((2, self.n_channels))
        soft = np.zeros((2, self.n_channels))
        n_voxels = 0
        for i, j in self._pairs_of(index):
            hard = hard + self.pair_sums[(i, j)][mode]["hard"]
            soft = soft + self.pair_sums[(i, j)][mode]["soft"]
            start, stop = self.shared_box(i, j)
            n_voxels += int(np.prod([b - a for a, b in zip(start, stop)]))
        return foreground_from_sums(hard), [float(v) for v in soft[1]], n_voxels

    def judged(
        self,
        mode: str,
        min_foreground: MinForeground = DEFAULT_MIN_FOREGROUND,
        index: int | None = None,
    ) -> list[bool]:
        """Whether the hard mismatch (global, or of tile ``index``) is judged, per channel.

        The pairs' foreground together must pass the rule of
        :mod:`~napari_normcheck.core.measure.support` on the voxels they compare.
        """
        foreground, _, n_voxels = self.support(mode, index)
        return judged_mask(foreground, n_voxels, min_foreground)

    def to_dict(self) -> dict[str, dict]:
        """Pair sums as JSON-ready data (resume)."""
        return {
            f"{i},{j}": {
                mode: {k: v.tolist() for k, v in sums[mode].items() if k != "argmax"}
                for mode in self.names
            }
            for (i, j), sums in self.pair_sums.items()
        }

    def shared_box(self, i: int, j: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The voxels tiles ``i`` and ``j`` both predict (they must be neighbours)."""
        return next(box for k, box in self.neighbours[i] if k == j)

    def scan_order(self, keys: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """``keys`` in the order a single-process run computes those pairs (by later tile)."""
        return [
            (j, i)
            for i in sorted(self.neighbours)
            for j, _ in self.neighbours[i]
            if j < i and (j, i) in keys
        ]

    def load(self, data: dict[str, dict]) -> None:
        """Restore pair sums saved by :meth:`to_dict`."""
        for key, sums in data.items():
            i, j = (int(v) for v in key.split(","))
            self.pair_sums[(i, j)] = {
                mode: {k: np.asarray(v, dtype=np.float64) for k, v in sums[mode].items()}
                for mode in self.names
            }
