"""Windows read through the volume's decoded blocks: the store's values, each block read once."""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr

from napari_normcheck.core.io.block_cache import BlockCache
from napari_normcheck.core.io.volume import open_volume


def test_windows_through_the_cache_are_the_stores_values_and_blocks_are_read_once(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 255, size=(20, 50, 70), dtype=np.uint8)
    path = tmp_path / "v.zarr"
    zarr.create_array(path, shape=values.shape, chunks=(8, 16, 32), dtype="uint8")[:] = values
    volume = open_volume(path)
    cache = BlockCache.for_volume(volume.data)
    assert cache is not None
    boxes = [
        (0, 20, 0, 50, 0, 70),  # everything
        (3, 4, 5, 37, 31, 33),  # one plane across block edges
        (7, 9, 15, 17, 63, 70),  # the last, partial blocks
    ]
    for z0, z1, y0, y1, x0, x1 in boxes:
        got = cache.read((slice(0, 1), slice(z0, z1), slice(y0, y1), slice(x0, x1)))
        want = volume.data[:, z0:z1, y0:y1, x0:x1].compute()
        assert got.dtype == want.dtype and np.array_equal(got, want)
    # 3 x 4 x 3 blocks, all read by the first box and kept: the others read none again.
    assert cache.reads == 36


def test_blocks_beyond_the_budget_are_dropped_least_recently_used_first(tmp_path):
    values = np.arange(16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    path = tmp_path / "v.zarr"
    zarr.create_array(path, shape=values.shape, chunks=(4, 16, 16), dtype="float32")[:] = values
    volume = open_volume(path)
    block_bytes = 4 * 16 * 16 * 4
    cache = BlockCache(volume.data, max_bytes=2 * block_bytes)
    for z in (0, 4, 0, 8, 0, 4):  # blocks 0, 1, 0, 2 (drops 1), 0, 1 (read again, drops 2)
        box = (slice(0, 1), slice(z, z + 4), slice(0, 16), slice(0, 16))
        assert np.array_equal(cache.read(box)[0], values[z : z + 4])
    assert cache.reads == 4


def test_sources_with_large_blocks_are_read_as_before():
    data = np.zeros((1, 64, 512, 512), dtype=np.float32)  # one 64 MB block: not cached
    assert BlockCache.for_volume(da.from_array(data, chunks=data.shape)) is None
    assert BlockCache.for_volume(data) is None  # not a lazy array
