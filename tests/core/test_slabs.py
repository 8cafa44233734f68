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
    assert len(list((tmp_path / "slabs").glob("*.raw"))) == 4
    for key in reversed(list(slabs)):
        np.testing.assert_array_equal(store.pop(key), slabs[key])
    assert store.pop((0, 1)) is None
    assert not list((tmp_path / "slabs").glob("*.raw"))


def test_without_a_budget_everything_stays_in_memory(tmp_path):
    store = SlabStore()
    store.put((0, 1), np.ones((2, 2)))
    assert store.spill_count == 0 and store.pop((0, 1)).sum() == 4
