"""Sample model input windows spread over a volume, deterministically, skipping empty ones.

Recalibrating running statistics needs tiles like the ones the network was trained on: random positions
over the whole volume (or region of interest), not the regular grid of a prediction run. Positions are
drawn by Latin hypercube sampling, so each axis (z, and y/x) is covered evenly whatever the number of
tiles; a tile is skipped when too few of its voxels are content (inside the region and within the user's
intensity window), so that mostly padded tiles or tiles of empty resin do not dominate the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import Tile, TilePlan, plan_tiles
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.lazy_array import SYNCHRONOUS
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.run.tile_io import read_window

# A fresh Latin hypercube replaces rejected tiles; beyond this many rounds the mask is too strict.
_MAX_ROUNDS = 12


@dataclass(frozen=True)
class ContentMask:
    """Which voxels count as content when choosing tiles.

    Attributes
    ----------
    below : float or None
        Raw intensities (mean over channels) below this are not content (dark background).
    above : float or None
        Raw intensities above this are not content (bright empty resin in EM).
    min_fraction : float
        A tile is used only when at least this fraction of its window is content; voxels outside the
        region of interest (padding) never are.
    """

    below: float | None = None
    above: float | None = None
    min_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.min_fraction <= 1:
            raise NormcheckError(f"content fraction {self.min_fraction} must lie in [0, 1]")
        if self.below is not None and self.above is not None and self.above <= self.below:
            raise NormcheckError(
                f"the intensity window {self.below}..{self.above} is empty; give --mask-below "
                "smaller than --mask-above"
            )

    def fraction(self, raw: np.ndarray, window_size: int) -> float:
        """Content fraction of a window whose in-region voxels are ``raw`` ``(C, z, y, x)``."""
        values = np.asarray(raw, dtype=np.float32).mean(axis=0)
        content = np.ones(values.shape, dtype=bool)
        if self.below is not None:
            content &= values >= self.below
        if self.above is not None:
            content &= values <= self.above
        return float(np.count_nonzero(content)) / float(window_size)


def window_plan(
    volume: Volume, window: tuple[int, int, int], roi: tuple[tuple[int, int], ...] | None
) -> TilePlan:
    """A plan whose geometry (ROI, window, zero padding) :func:`read_window` uses for sampled tiles."""
    return plan_tiles(volume.spatial_shape, window, overlap=0.0, blend="constant", roi=roi)


def sampled_tile(plan: TilePlan, index: int, start: tuple[int, ...]) -> Tile:
    """A :class:`Tile` at window ``start`` (write box clipped to the ROI), for :func:`read_window`."""
    start = tuple(int(s) for s in start)
    stop = tuple(min(s + w, r) for s, w, r in zip(start, plan.window_shape, plan.roi_stop))
    return Tile(
        index=index,
        grid=(0, 0, 0),
        window_start=start,  # type: ignore[arg-type]
        write_start=tuple(max(s, r) for s, r in zip(start, plan.roi_start)),  # type: ignore[arg-type]
        write_stop=stop,  # type: ignore[arg-type]
    )


def latin_hypercube_starts(plan: TilePlan, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` window starts ``(n, 3)``, one per stratum along each axis, in random pairing.

    Along an axis shorter than the window the start is fixed so that the region sits centred in the
    window, as MONAI pads a small input symmetrically.
    """
    starts = np.empty((n, 3), dtype=np.int64)
    for axis in range(3):
        lo, hi, w = plan.roi_start[axis], plan.roi_stop[axis], plan.window_shape[axis]
        free = hi - lo - w
        if free < 0:
            starts[:, axis] = lo - (w - (hi - lo)) // 2
            continue
        strata = (rng.permutation(n) + rng.random(n)) / n
        starts[:, axis] = lo + np.minimum((strata * (free + 1)).astype(np.int64), free)
    return starts


def sample_tiles(
    volume: Volume,
    plan: TilePlan,
    n_tiles: int,
    *,
    seed: int = 0,
    mask: ContentMask | None = None,
) -> tuple[list[Tile], int]:
    """Choose up to ``n_tiles`` distinct windows spread over the plan's ROI that pass the content mask.

    Parameters
    ----------
    volume : Volume
        The input (only raw voxels of candidate windows are read).
    plan : TilePlan
        From :func:`window_plan`: ROI and window shape.
    n_tiles : int
        How many tiles to return.
    seed : int
        Seed of the positions; the same seed gives the same tiles.
    mask : ContentMask, optional
        Which voxels are content; by default every voxel inside the ROI.

    Returns
    -------
    tiles : list of Tile
        In sampling order (random, like a shuffled training loader).
    n_rejected : int
        Candidates skipped by the mask.
    """
    mask = mask or ContentMask()
    rng = np.random.default_rng(seed)
    window_size = int(np.prod(plan.window_shape))
    chosen: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    rejected = 0
    for _ in range(_MAX_ROUNDS):
        missing = n_tiles - len(chosen)
        if missing <= 0:
            break
        for start in latin_hypercube_starts(plan, missing, rng):
            key = tuple(int(s) for s in start)
            if key in seen:
                continue
            seen.add(key)
            tile = sampled_tile(plan, len(chosen), key)
            box = tuple(slice(a, b) for a, b in zip(tile.write_start, tile.write_stop))
            block = volume.data[(slice(None), *box)]
            raw = np.asarray(
                block.compute(scheduler=SYNCHRONOUS) if hasattr(block, "compute") else block
            )
            if mask.fraction(raw, window_size) < mask.min_fraction:
                rejected += 1
                continue
            chosen.append(key)
    return [sampled_tile(plan, i, s) for i, s in enumerate(chosen)], rejected


def read_tiles(
    volume: Volume, plan: TilePlan, tiles: list[Tile], transform: IntensityTransform
) -> list[np.ndarray]:
    """Normalized float32 windows ``(C, *window)`` of ``tiles``, padded as the engine pads."""
    return [read_window(volume, plan, tile, transform) for tile in tiles]
