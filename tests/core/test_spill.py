"""Unfinished chunks and overlap slabs beyond their budgets: what spills, and that it comes back exact."""

from __future__ import annotations

import numpy as np

from napari_normcheck.core.base.tiling import plan_tiles
from napari_normcheck.core.measure.slabs import SlabStore
from napari_normcheck.core.run.stitch import ChunkAccumulator, importance_map


def _stitch(plan, predictions, scratch, max_bytes):
    finished = {}
    accumulator = ChunkAccumulator(
        plan,
        2,
        importance_map(plan.window_shape, "gaussian", 3),
        lambda chunk, _slices, values: finished.update({chunk: values.clone()}),
        scratch,
        max_bytes=max_bytes,
    )
    for tile in plan.tiles():
        accumulator.add(tile, predictions[tile.index])
    accumulator.close()
    return finished, accumulator.spill_count


def _lru_spills(plan, max_bytes):
    """How many chunks the least-recently-used policy spilled (what ran before), by replay."""
    shape = np.array(plan.chunk_shape)
    memory: dict = {}
    remaining = plan.chunk_contributors()
    spills = 0
    for tile in plan.tiles():
        accumulator = ChunkAccumulator(plan, 2, np.ones(plan.window_shape, np.float32), None, "x")
        for chunk in accumulator.tile_chunks(tile):
            memory.pop(chunk, None)
            memory[chunk] = 2 * 4 * int(np.prod(shape))  # 2 values, float32
            while sum(memory.values()) > max_bytes and len(memory) > 1:
                memory.pop(next(iter(memory)))
                spills += 1
            remaining[chunk] -= 1
            if remaining[chunk] == 0:
                memory.pop(chunk, None)
    return spills


def test_chunks_needed_last_spill_and_the_stitched_result_is_bitwise_the_same(tmp_path):
    # Two z-layers of tiles over a wide plane: a layer's pending chunks exceed the budget.
    plan = plan_tiles((24, 96, 160), (16, 32, 32), overlap=0.25)
    rng = np.random.default_rng(0)
    predictions = rng.random((plan.n_tiles, 2, *plan.window_shape), dtype=np.float32)
    in_memory, none = _stitch(plan, predictions, tmp_path / "a", max_bytes=2**40)
    chunk_bytes = 2 * 4 * int(np.prod(plan.chunk_shape))
    budget = 12 * chunk_bytes
    spilled, count = _stitch(plan, predictions, tmp_path / "b", max_bytes=budget)
    assert none == 0 and count > 0
    assert in_memory.keys() == spilled.keys()
    for chunk, values in in_memory.items():
        np.testing.assert_array_equal(spilled[chunk], values)
    # Spilling the chunk whose next tile comes last moves fewer chunks than spilling the oldest.
    assert count < _lru_spills(plan, budget)
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_slabs_needed_last_spill_first(tmp_path):
    slab = np.ones((2, 2, 4, 4, 4), dtype=np.float32)
    store = SlabStore(2 * slab.nbytes, tmp_path, next_use=lambda key: key[1])
    store.put((0, 9), slab)
    store.put((1, 2), 2 * slab)
    store.put((1, 5), 3 * slab)  # over budget: (0, 9) waits longest, it spills
    assert store.spill_count == 1 and store.spilled == [(0, 9)]
    np.testing.assert_array_equal(store.pop((0, 9)), slab)
    np.testing.assert_array_equal(store.pop((1, 2)), 2 * slab)


def test_a_slab_needed_after_all_others_goes_straight_to_disk(tmp_path):
    rng = np.random.default_rng(1)
    slab = rng.random((2, 2, 6, 6, 6), dtype=np.float32)
    store = SlabStore(slab.nbytes, tmp_path, next_use=lambda key: key[1])
    store.put((0, 1), slab)
    view = np.asfortranarray(2 * slab)[:, :, ::-1]  # not contiguous: written as it comes
    store.put((0, 7), view)
    assert store.spill_count == 1 and store.spilled == [(0, 7)]
    np.testing.assert_array_equal(store.pop((0, 7)), view)
    np.testing.assert_array_equal(store.pop((0, 1)), slab)


def test_a_chunk_holds_only_the_box_its_tiles_have_added_to(tmp_path):
    # After the first z-layer of tiles, the next layer of chunks has only the tiles' overlap
    # added (4 of 12 planes here); the rest is zeros, which take no memory and no spill.
    plan = plan_tiles((36, 96, 160), (16, 32, 32), overlap=0.25)  # z tiles at 0, 12, 20
    accumulator = ChunkAccumulator(
        plan, 2, importance_map(plan.window_shape, "gaussian", 3), lambda *_: None, tmp_path
    )
    first_layer = [tile for tile in plan.tiles() if tile.write_start[0] == 0]
    for tile in first_layer:
        accumulator.add(tile, np.ones((2, *plan.window_shape), np.float32))
    chunk_z, chunk_y, chunk_x = plan.chunk_shape
    assert chunk_z == 12  # the tiles' step: their last 4 planes reach into the next chunk layer
    pending = {
        chunk for tile in first_layer for chunk in accumulator.tile_chunks(tile)
    } - accumulator.done_chunks
    assert pending and all(chunk[0] == 1 for chunk in pending)
    plane_bytes = 2 * 4 * 96 * 160
    assert accumulator.held_bytes == 4 * plane_bytes  # not len(pending) whole chunks
    accumulator.close()


def test_a_spill_file_reuses_freed_space_of_any_size_and_returns_every_value(tmp_path):
    from napari_normcheck.core.io.spill import SpillFile

    rng = np.random.default_rng(0)
    spill = SpillFile(tmp_path / "x.f32")
    box = rng.random((2, 2, 12, 40, 40), dtype=np.float32)
    arrays = {
        "chunk": rng.random((4, 8, 32, 32), dtype=np.float32),
        "face": box[:, :, 4:, 2:30, :],  # a strided view, as a tile's overlap slab is cut
        "small": rng.random((3, 5), dtype=np.float32),
    }
    for key, array in arrays.items():
        spill.write(key, array)
    most = spill._end
    assert most == sum(a.nbytes for a in arrays.values())
    # Freed space serves arrays of other sizes (a larger one over two freed neighbours).
    np.testing.assert_array_equal(spill.read("chunk"), arrays["chunk"])
    np.testing.assert_array_equal(
        spill.read("face", (slice(1), slice(None), slice(2, 5)), keep=True),
        arrays["face"][:1, :, 2:5],
    )
    np.testing.assert_array_equal(spill.read("face"), arrays["face"])
    later = rng.random((2, 2, 7, 40, 40), dtype=np.float32)
    spill.write("later", later)
    spill.write("tiny", arrays["small"][:, ::2])
    assert spill._end == most  # no new space: the freed chunk and face held both
    np.testing.assert_array_equal(spill.read("small"), arrays["small"])
    np.testing.assert_array_equal(spill.read("tiny"), arrays["small"][:, ::2])
    np.testing.assert_array_equal(spill.read("later"), later)
    assert spill._end == 0 and not spill._free  # all free again, merged into the end
    spill.close()


def test_the_memory_a_gpu_run_reserves_covers_the_chunk_sums_it_holds(tmp_path):
    """The eval-batch probe leaves ``run_memory_bytes`` free: the accumulator holds at most its
    budget and one chunk beyond it (the newest is never spilled), which that reserve counts."""
    from napari_normcheck.core.run.forward import run_memory_bytes

    plan = plan_tiles((24, 256, 320), (16, 64, 64), overlap=0.25)
    cache_mb, n_values = 1, 2
    chunk_bytes = 4 * n_values * int(np.prod(plan.chunk_shape))
    rng = np.random.default_rng(1)
    accumulator = ChunkAccumulator(
        plan,
        n_values,
        importance_map(plan.window_shape, "gaussian", 3),
        lambda chunk, _slices, values: None,
        tmp_path,
        max_bytes=cache_mb * 2**20,
    )
    held = []
    for tile in plan.tiles():
        accumulator.add(tile, rng.random((n_values, *plan.window_shape), dtype=np.float32))
        held.append(accumulator.held_bytes)
    accumulator.close()
    assert accumulator.spill_count > 0  # the front outgrew the budget
    assert max(held) <= cache_mb * 2**20 + chunk_bytes
    reserve = run_memory_bytes(n_values, plan.window_shape, plan.chunk_shape, cache_mb)
    slabs = cache_mb * 2**20 // 2
    assert max(held) + slabs + 8 * chunk_bytes <= reserve
