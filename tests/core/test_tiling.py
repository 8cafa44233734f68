import numpy as np
import pytest
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import parse_roi, plan_tiles


@pytest.mark.parametrize("shape", [(20, 40, 44), (16, 32, 32), (33, 70, 100), (5, 200, 31)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.7])
def test_blend_plan_matches_monai_scan(shape, overlap):
    tile = (16, 32, 32)
    plan = plan_tiles(shape, tile, overlap=overlap, blend="gaussian")
    image = tuple(max(s, t) for s, t in zip(shape, tile))
    pad_lo = np.array([(i - s) // 2 for i, s in zip(image, shape)])
    interval = _get_scan_interval(image, tile, 3, (overlap,) * 3)
    expected = np.array([[s.start for s in sl] for sl in dense_patch_slices(image, tile, interval)])
    np.testing.assert_array_equal(plan.window_starts + pad_lo, expected)


def test_every_roi_voxel_is_written_and_chunks_counted():
    plan = plan_tiles((30, 50, 61), (16, 32, 32), overlap=0.3, roi=((3, 29), (5, 50), (0, 61)))
    covered = np.zeros(plan.roi_shape, dtype=int)
    for tile in plan.tiles():
        sl = tuple(
            slice(a - r, b - r)
            for a, b, r in zip(tile.write_start, tile.write_stop, plan.roi_start)
        )
        covered[sl] += 1
    assert covered.min() >= 1
    counts = plan.chunk_contributors()
    assert counts.shape == plan.chunk_grid and counts.min() >= 1


def test_crop_plan_writes_disjoint_inner_blocks_with_halo_windows():
    plan = plan_tiles((30, 50, 61), (8, 16, 16), blend="crop", halo=(2, 4, 4))
    assert plan.window_shape == (12, 24, 24)
    covered = np.zeros(plan.roi_shape, dtype=int)
    for tile in plan.tiles():
        assert tuple(w + h for w, h in zip(tile.window_start, plan.halo)) == tile.write_start
        covered[tuple(slice(a, b) for a, b in zip(tile.write_start, tile.write_stop))] += 1
    assert (covered == 1).all()
    assert plan.chunk_contributors().max() == 1


def test_plan_is_deterministic():
    a = plan_tiles((40, 64, 64), (16, 32, 32), overlap=0.25)
    b = plan_tiles((40, 64, 64), (16, 32, 32), overlap=0.25)
    np.testing.assert_array_equal(a.window_starts, b.window_starts)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile": (0, 32, 32)}, "below one voxel"),
        ({"overlap": 1.0}, "outside [0, 1)"),
        ({"roi": ((0, 5), (10, 10), (0, 8))}, "empty or outside"),
        ({"roi": ((0, 5), (0, 8), (0, 99))}, "empty or outside"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    args = {"tile": (8, 8, 8)} | kwargs
    with pytest.raises(NormcheckError, match=message.replace("[", r"\[").replace(")", r"\)")):
        plan_tiles((10, 20, 30), **args)


def test_parse_roi():
    assert parse_roi("0:4,1:9,2:7") == ((0, 4), (1, 9), (2, 7))
    with pytest.raises(NormcheckError, match="z0:z1"):
        parse_roi("0-4,1:9")


# --- blocks of whole chunks for distributed runs (napari_normcheck.core.run.blocks) ----------------

BLOCK_PLANS = {
    "gaussian": dict(overlap=0.3, blend="gaussian", roi=((3, 29), (5, 50), (0, 61))),
    "crop": dict(blend="crop", halo=(2, 8, 8)),
}


@pytest.mark.parametrize("kind", list(BLOCK_PLANS))
@pytest.mark.parametrize("block_chunks", [(1, 1, 1), (2, 1, 2), (1, 3, 2), (9, 9, 9)])
def test_blocks_partition_chunks_and_own_each_tile_and_pair_once(kind, block_chunks):
    from napari_normcheck.core.measure.mismatch import tile_pairs
    from napari_normcheck.core.run.blocks import block_tiles, plan_blocks, tile_owners

    plan = plan_tiles((30, 50, 61), (16, 32, 32), **BLOCK_PLANS[kind])
    blocks = plan_blocks(plan, block_chunks)
    # Every output chunk (and voxel) lies in exactly one block.
    owners = np.zeros(plan.chunk_grid, dtype=int)
    voxels = np.zeros(plan.roi_shape, dtype=int)
    for block in blocks:
        for chunk in block.chunks():
            owners[chunk] += 1
        voxels[
            tuple(slice(a - r, b - r) for a, b, r in zip(block.start, block.stop, plan.roi_start))
        ] += 1
    assert (owners == 1).all() and (voxels == 1).all()
    # Each tile has one owner block, which runs it; tile_owners agrees with the blocks' boxes.
    tile_owner = tile_owners(plan, block_chunks)
    for tile in plan.tiles():
        holding = [b.index for b in blocks if b.holds_voxel(tile.write_start)]
        assert holding == [tile_owner[tile.index]]
        assert tile.index in block_tiles(plan, blocks[holding[0]])
    # A block runs every tile that writes into its chunks, and both tiles of each pair it owns.
    contributors = {b.index: set() for b in blocks}
    for tile in plan.tiles():
        ranges = plan.chunk_range(tile)
        for block in blocks:
            if all(
                a < hi and b > lo
                for (a, b), lo, hi in zip(ranges, block.chunk_start, block.chunk_stop)
            ):
                contributors[block.index].add(tile.index)
    for block in blocks:
        assert contributors[block.index] <= set(block_tiles(plan, block))
    for i, neighbours in tile_pairs(plan).items():
        for j, (start, _stop) in neighbours:
            holding = [b for b in blocks if b.holds_voxel(start)]
            assert len(holding) == 1
            assert {i, j} <= set(block_tiles(plan, holding[0]))


def test_block_tiles_run_whole_train_batches():
    from napari_normcheck.core.run.blocks import block_tiles, plan_blocks

    plan = plan_tiles((40, 50, 61), (16, 32, 32), overlap=0.25)
    for block in plan_blocks(plan, (1, 1, 1)):
        tiles = block_tiles(plan, block, train_batch=3)
        batches = {i // 3 for i in tiles}
        assert tiles == sorted(
            i for b in batches for i in range(3 * b, min(3 * b + 3, plan.n_tiles))
        )
        assert set(block_tiles(plan, block)) <= set(tiles)


def test_chunk_completion_order_is_the_accumulators():
    """The order in which blocks' chunk sums are added is the single-process completion order."""
    from napari_normcheck.core.run.blocks import chunk_completion_order
    from napari_normcheck.core.run.stitch import ChunkAccumulator

    plan = plan_tiles((30, 50, 61), (16, 32, 32), overlap=0.3)
    finished = []
    accumulator = ChunkAccumulator(
        plan,
        1,
        np.ones(plan.window_shape, np.float32),
        lambda chunk, _slices, _values: finished.append(chunk),
        "unused",
    )
    for tile in plan.tiles():
        accumulator.add(tile, np.zeros((1, *plan.window_shape), np.float32))
    assert chunk_completion_order(plan) == finished
    assert len(finished) == np.prod(plan.chunk_grid)


@pytest.mark.parametrize("n_workers", [1, 2, 8])
def test_default_blocks_give_work_to_every_worker(n_workers):
    from napari_normcheck.core.run.blocks import default_block_chunks, plan_blocks

    plan = plan_tiles((64, 192, 192), (32, 64, 64), overlap=0.25)
    blocks = plan_blocks(plan, default_block_chunks(plan, n_workers))
    assert n_workers <= len(blocks) <= np.prod(plan.chunk_grid)


def test_default_blocks_are_slabs_across_the_axis_with_most_chunks():
    from napari_normcheck.core.run.blocks import default_block_chunks, rerun_fraction

    plan = plan_tiles((64, 192, 192), (32, 64, 64), overlap=0.25)
    assert plan.chunk_grid == (3, 4, 4)
    # One worker, one block: no tile runs twice.
    assert default_block_chunks(plan, 1) == plan.chunk_grid
    assert rerun_fraction(plan, plan.chunk_grid) == 0.0
    # Two workers: one cut, across y (y and x have the most chunks; the lower axis goes first).
    assert default_block_chunks(plan, 2) == (3, 2, 4)
    # The cut costs one layer of tiles across z and x, run in both blocks: 12 of 48.
    assert rerun_fraction(plan, (3, 2, 4)) == pytest.approx(12 / 48)
    # Cutting every axis (the earlier default's shape) costs more.
    assert rerun_fraction(plan, (2, 2, 2)) > rerun_fraction(plan, (3, 2, 4))


def test_blocks_that_share_border_tiles_are_cut_where_their_forwards_are_even():
    from napari_normcheck.core.run.blocks import (
        border_tiles,
        default_block_chunks,
        plan_blocks,
        predicted_per_block,
    )

    plan = plan_tiles((64, 192, 192), (32, 64, 64), overlap=0.25)
    # Four rows of tiles along y (last voxels in chunks 1, 2, 3, 3): the block above a cut
    # predicts the tiles crossing it, so the cut after chunk 2 of 4 gives 12 + 36 forwards, after
    # chunk 3 24 + 24.
    assert predicted_per_block(plan, (3, 2, 4)).tolist() == [12, 36]
    assert default_block_chunks(plan, 2, shared=True) == (3, 3, 4)
    assert predicted_per_block(plan, (3, 3, 4)).tolist() == [24, 24]
    blocks = plan_blocks(plan, (3, 3, 4))
    shared = border_tiles(plan, blocks)
    assert len(shared) == 24 and set(shared.values()) == {(0, 1)}
    # Every tile is predicted by exactly one block.
    assert predicted_per_block(plan, (3, 3, 4)).sum() == plan.n_tiles
    assert default_block_chunks(plan, 1, shared=True) == plan.chunk_grid


def test_default_blocks_rerun_few_tiles_on_a_large_volume():
    from napari_normcheck.core.run.blocks import (
        MAX_BLOCK_CHUNKS,
        default_block_chunks,
        plan_blocks,
        rerun_fraction,
    )

    # 1 GB of uint8 at the default tile: slabs along z, a few percent of the tiles run twice.
    plan = plan_tiles((1024, 1024, 1024), (32, 256, 256), overlap=0.25)
    for n_workers in (1, 2, 4):
        block_chunks = default_block_chunks(plan, n_workers)
        assert block_chunks[1:] == plan.chunk_grid[1:]
        assert len(plan_blocks(plan, block_chunks)) >= n_workers
        assert rerun_fraction(plan, block_chunks) < 0.10, (n_workers, block_chunks)
    # A larger volume is cut further so that no block exceeds the bound.
    plan = plan_tiles((4096, 2048, 2048), (32, 256, 256), overlap=0.25)
    block_chunks = default_block_chunks(plan, 2)
    assert np.prod(block_chunks) <= MAX_BLOCK_CHUNKS
    assert block_chunks[1:] == plan.chunk_grid[1:]
