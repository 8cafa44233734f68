import numpy as np

from napari_normcheck.core.measure.slabs import SlabStore


def test_slabs_beyond_the_budget_spill_and_come_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    slabs = {(i, i + 1): rng.random((2, 2, 3, 8, 8), dtype=np.float32) for i in range(6)}
    one = next(iter(slabs.values())).nbytes
    store = SlabStore(max_bytes=2 * one, scratch_dir=tmp_path / "slabs")
    for key, slab in slabs.items():
        store.put(key, slab[:, :, :, :])  # a view: the store keeps its own copy
    assert store.spill_count == 4
    spill_file = tmp_path / "slabs" / "slabs.f32"
    assert spill_file.stat().st_size == 4 * one
    for key in reversed(list(slabs)):
        np.testing.assert_array_equal(store.pop(key), slabs[key])
    assert store.pop((0, 1)) is None
    # Space read back is reused: four more slabs spilled again take no more room.
    for key, slab in slabs.items():
        store.put(key, slab)
    assert store.spill_count == 8 and spill_file.stat().st_size == 4 * one
    store.close()
    assert not spill_file.exists()


def test_parts_of_a_spilled_slab_are_read_bit_for_bit_and_the_last_frees_it(tmp_path):
    rng = np.random.default_rng(2)
    slab = rng.random((2, 2, 4, 6, 8), dtype=np.float32)
    store = SlabStore(max_bytes=0, scratch_dir=tmp_path, next_use=lambda key: key[1])
    store.put((0, 1), slab)
    parts = [np.s_[:, :, :2, 1:4, :], np.s_[:, :, 1:, :, 5:]]
    np.testing.assert_array_equal(store.take((0, 1), parts[0], last=False), slab[parts[0]])
    np.testing.assert_array_equal(store.take((0, 1), parts[1], last=True), slab[parts[1]])
    assert store.take((0, 1), parts[0], last=True) is None
    store.put((3, 4), 2 * slab)  # in the space the first slab left
    assert (tmp_path / "slabs.f32").stat().st_size == slab.nbytes
    np.testing.assert_array_equal(store.pop((3, 4)), 2 * slab)


def test_without_a_budget_everything_stays_in_memory(tmp_path):
    store = SlabStore()
    store.put((0, 1), np.ones((2, 2)))
    assert store.spill_count == 0 and store.pop((0, 1)).sum() == 4
