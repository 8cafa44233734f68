"""What a tile loop is restricted to: a box of whole output chunks, and whole train batches.

The single-process check runs the whole region of interest; a distributed block
(:class:`~napari_normcheck.core.run.blocks.Block`) is a :class:`ChunkRegion` with an index, and
resume reruns whole train batches. The loop needs only these, so it imports nothing of the
cluster: the cluster path builds on the loop, not the reverse.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

ChunkIndex = tuple[int, int, int]


@dataclass(frozen=True)
class ChunkRegion:
    """A box of whole output chunks.

    Attributes
    ----------
    chunk_start, chunk_stop : tuple of int
        Chunk index range ``[start, stop)`` per axis.
    start, stop : tuple of int
        The same box in volume voxel coordinates (inside the region of interest).
    """

    chunk_start: tuple[int, int, int]
    chunk_stop: tuple[int, int, int]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def n_chunks(self) -> int:
        """Number of output chunks in the region."""
        return math.prod(b - a for a, b in zip(self.chunk_start, self.chunk_stop))

    def holds_voxel(self, voxel: tuple[int, ...]) -> bool:
        """Whether the volume voxel ``voxel`` lies in this region."""
        return all(a <= v < b for v, a, b in zip(voxel, self.start, self.stop))

    def chunks(self) -> list[ChunkIndex]:
        """The region's chunks, in index order."""
        ranges = (range(a, b) for a, b in zip(self.chunk_start, self.chunk_stop))
        return list(itertools.product(*ranges))  # type: ignore[arg-type]


def whole_train_batches(tiles: set[int], train_batch: int, n_tiles: int) -> set[int]:
    """Complete ``tiles`` to whole train batches of the global scan order.

    Tiles in one train-mode batch share batch statistics, so a tile's train prediction depends on
    its batch mates: rerunning a tile (resume, a distributed block) must rerun its whole batch.
    """
    if train_batch <= 1:
        return set(tiles)
    groups = {i // train_batch for i in tiles}
    return {i for g in groups for i in range(g * train_batch, min((g + 1) * train_batch, n_tiles))}
