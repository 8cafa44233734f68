"""Split a run into blocks of whole output chunks for distributed workers: pure NumPy.

The tile plan is fixed first, for the whole volume. A block is a box of whole output chunks; the
task of a block runs every tile whose prediction box touches the block, in global tile order, and
writes only the block's chunks. Because each chunk's contributing tiles all touch its block and are
blended in the same order as in a single-process run, blocks give the same outputs, and no two
blocks write one chunk.

Every metric has exactly one owner, so sums over blocks count each quantity once:

- a tile's own statistics (disparity over its write box, feature statistics) belong to the block
  that holds the tile's origin (the first voxel it writes);
- a tile pair's mismatch sums belong to the block that holds the minimum corner of their shared box;
- a chunk's disparity sums belong to the block that holds the chunk.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from napari_normcheck.core.base.tiling import TilePlan
from napari_normcheck.core.run.region import ChunkIndex, ChunkRegion, whole_train_batches

# Largest default block in chunks (about 13 x 13 x 13): bounds what a lost worker takes along.
MAX_BLOCK_CHUNKS = 2048


@dataclass(frozen=True)
class Block(ChunkRegion):
    """A box of whole output chunks, written by one task.

    Attributes
    ----------
    chunk_start, chunk_stop, start, stop : tuple of int
        The box in chunk indices and in volume voxel coordinates (see
        :class:`~napari_normcheck.core.run.region.ChunkRegion`).
    index : int
        Position in the block grid's scan order (z slowest).
    """

    index: int = 0


def default_block_chunks(
    plan: TilePlan, n_workers: int, *, shared: bool = False
) -> tuple[int, int, int]:
    """Block shape in chunks: one block per worker, cut across as few axes as possible.

    A tile on a block border runs in every block it touches, so each cut costs a layer of tiles
    run twice. Slabs cut across the axis with the most chunks cost the fewest tiles per cut (a
    layer across the other two axes), where cutting every axis costs about
    ``((m + 1) / m) ** 3`` tile runs per tile for blocks of ``m`` chunks per axis. A volume of
    1 GB and more then reruns a few percent of its tiles (:func:`rerun_fraction`), and one
    worker runs one block, with no tile run twice. Blocks are cut further only to give every
    worker one, or to keep each within :data:`MAX_BLOCK_CHUNKS` (what a lost worker or an
    interrupted run loses).

    With ``shared`` forwards (:mod:`~napari_normcheck.core.run.shared_forwards`) a tile on a cut is
    predicted once, usually by the block above the cut (the tile comes first in its scan order and
    last in the lower block's). Each cut axis is then cut where the blocks' forwards are most even
    (:func:`predicted_per_block`), with as many pieces as before: 4 rows of tiles are cut 2 + 2,
    not 1 + 3.

    Parameters
    ----------
    plan : TilePlan
        The run's plan.
    n_workers : int
        Worker threads of the cluster.
    shared : bool
        Whether the blocks share their border tiles' forwards.

    Returns
    -------
    tuple of int
        Chunks per block along ``(z, y, x)``.
    """
    grid = list(plan.chunk_grid)
    block = list(grid)
    n_workers = max(n_workers, 1)

    def n_blocks() -> int:
        return math.prod(-(-g // b) for g, b in zip(grid, block))

    def too_few_or_too_large() -> bool:
        return n_blocks() < n_workers or math.prod(block) > MAX_BLOCK_CHUNKS

    # The axis with the most chunks first (z first among equals: its slabs are contiguous on disk).
    for axis in sorted(range(3), key=lambda d: -grid[d]):
        pieces = 1
        while too_few_or_too_large() and block[axis] > 1:
            pieces += 1
            block[axis] = -(-grid[axis] // pieces)  # may repeat: 4 chunks in 3 pieces are 2 + 2
    if shared:
        for axis in range(3):
            pieces = -(-grid[axis] // block[axis])
            if pieces == 1:
                continue
            sizes = [b for b in range(1, grid[axis] + 1) if -(-grid[axis] // b) == pieces]
            sizes = [b for b in sizes if math.prod(block) // block[axis] * b <= MAX_BLOCK_CHUNKS]

            def heaviest(size: int, axis: int = axis) -> int:
                trial = tuple(size if d == axis else block[d] for d in range(3))
                return int(predicted_per_block(plan, trial).max())  # type: ignore[arg-type]

            block[axis] = min(sizes or [block[axis]], key=lambda b: (heaviest(b), -b))
    return tuple(block)  # type: ignore[return-value]


def predicted_per_block(plan: TilePlan, block_chunks: tuple[int, int, int]) -> np.ndarray:
    """Tiles each block predicts when a tile is predicted by the block holding its last voxel.

    That is the block above every cut the tile crosses: with shared forwards, the one that
    usually gets to it first. Blocks numbered as :func:`plan_blocks` numbers them.
    """
    _, stops = prediction_boxes(plan)
    chunks = (stops - 1 - np.asarray(plan.roi_start)) // np.asarray(plan.chunk_shape)
    grid = tuple(-(-g // b) for g, b in zip(plan.chunk_grid, block_chunks))
    positions = chunks // np.asarray(block_chunks)
    owners = np.ravel_multi_index(tuple(positions.T), grid)
    return np.bincount(owners, minlength=math.prod(grid))


def rerun_fraction(
    plan: TilePlan, block_chunks: tuple[int, int, int], train_batch: int = 1
) -> float:
    """Extra tile runs of a block layout, as a fraction of the plan's tiles (0: none run twice).

    Parameters
    ----------
    plan : TilePlan
        The run's plan.
    block_chunks : tuple of int
        Chunks per block along ``(z, y, x)``.
    train_batch : int
        Tiles per train-mode forward (blocks run whole train batches).

    Returns
    -------
    float
        Tile runs of all blocks divided by the number of tiles, minus one.
    """
    runs = sum(
        len(block_tiles(plan, block, train_batch)) for block in plan_blocks(plan, block_chunks)
    )
    return runs / plan.n_tiles - 1.0


def plan_blocks(plan: TilePlan, block_chunks: tuple[int, int, int]) -> list[Block]:
    """Cut the chunk grid of ``plan`` into blocks of ``block_chunks`` chunks (smaller at far edges).

    Parameters
    ----------
    plan : TilePlan
        The run's plan.
    block_chunks : tuple of int
        Chunks per block along ``(z, y, x)``; each at least 1.

    Returns
    -------
    list of Block
        In scan order (z slowest).
    """
    block_chunks = tuple(max(1, int(b)) for b in block_chunks)  # type: ignore[assignment]
    grid = plan.chunk_grid
    axis_starts = [range(0, g, b) for g, b in zip(grid, block_chunks)]
    blocks = []
    for index, starts in enumerate(itertools.product(*axis_starts)):
        stops = tuple(min(s + b, g) for s, b, g in zip(starts, block_chunks, grid))
        voxel_start = tuple(r + s * c for r, s, c in zip(plan.roi_start, starts, plan.chunk_shape))
        voxel_stop = tuple(
            min(r + s * c, e)
            for r, s, c, e in zip(plan.roi_start, stops, plan.chunk_shape, plan.roi_stop)
        )
        block = Block(starts, stops, voxel_start, voxel_stop, index=index)  # type: ignore[arg-type]
        blocks.append(block)
    return blocks


def prediction_boxes(plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
    """``(n_tiles, 3)`` starts and stops of every tile's whole window clipped to the ROI."""
    starts = np.maximum(plan.window_starts, np.asarray(plan.roi_start))
    stops = np.minimum(
        plan.window_starts + np.asarray(plan.window_shape), np.asarray(plan.roi_stop)
    )
    return starts, stops


def block_tiles(plan: TilePlan, block: Block, train_batch: int = 1) -> list[int]:
    """Tiles a block's task runs, in global scan order.

    Every tile whose prediction box touches the block: the chunks' contributors and both tiles of
    every pair whose shared box touches it (their seams and mismatch). With ``train_batch > 1``
    whole train batches of the global order are run: tiles in one batch share batch statistics.

    Parameters
    ----------
    plan : TilePlan
        The run's plan.
    block : Block
        The block.
    train_batch : int
        Tiles per train-mode forward in the single-process order.

    Returns
    -------
    list of int
        Tile indices, sorted.
    """
    starts, stops = prediction_boxes(plan)
    touches = np.all((starts < np.asarray(block.stop)) & (stops > np.asarray(block.start)), axis=1)
    indices = {int(i) for i in np.flatnonzero(touches)}
    return sorted(whole_train_batches(indices, train_batch, plan.n_tiles))


def border_tiles(plan: TilePlan, blocks: list[Block]) -> dict[int, tuple[int, ...]]:
    """The tiles that several blocks run, each with those blocks' indices.

    Parameters
    ----------
    plan : TilePlan
        The run's plan.
    blocks : list of Block
        The run's blocks.

    Returns
    -------
    dict of int to tuple of int
        Tile index to the blocks (ascending) whose tasks run it, for tiles run by more than one.
    """
    needed_by: dict[int, list[int]] = {}
    for block in blocks:
        for tile in block_tiles(plan, block):
            needed_by.setdefault(tile, []).append(block.index)
    return {t: tuple(b) for t, b in needed_by.items() if len(b) > 1}


def tile_owners(plan: TilePlan, block_chunks: tuple[int, int, int]) -> np.ndarray:
    """Index (as :func:`plan_blocks` numbers blocks) of the block holding each tile's origin."""
    roi_start = np.asarray(plan.roi_start)
    if plan.blend == "crop":
        origins = plan.window_starts + np.asarray(plan.halo)
    else:
        origins = np.maximum(plan.window_starts, roi_start)
    chunks = (origins - roi_start) // np.asarray(plan.chunk_shape)
    positions = chunks // np.asarray(block_chunks)
    grid = tuple(-(-g // b) for g, b in zip(plan.chunk_grid, block_chunks))
    return np.ravel_multi_index(tuple(positions.T), grid)


def chunk_completion_order(plan: TilePlan) -> list[ChunkIndex]:
    """Chunks in the order a single-process run finishes them (its last contributing tile added).

    Global sums are added in this order when blocks are merged, so they equal the single-process
    sums bit for bit (floating-point addition is not associative).
    """
    remaining = plan.chunk_contributors()
    order: list[ChunkIndex] = []
    for tile in plan.tiles():
        for chunk in itertools.product(*(range(a, b) for a, b in plan.chunk_range(tile))):
            remaining[chunk] -= 1
            if remaining[chunk] == 0:
                order.append(chunk)  # type: ignore[arg-type]
    return order


def chunk_key(chunk: ChunkIndex) -> str:
    """``"z,y,x"``: a chunk index as a JSON object key."""
    return ",".join(str(int(c)) for c in chunk)
