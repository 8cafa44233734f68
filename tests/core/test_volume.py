"""Opening every supported source as a lazy (C, Z, Y, X) volume, on real files in tmp_path."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.lazy_array import _contiguous_chunks
from napari_normcheck.core.io.volume import (
    Volume,
    _zarr_dask_chunks,
    list_arrays,
    open_volume,
)

ISBI_RAW = Path(__file__).parents[2].parent / "shared/data/em/isbi2012_train_raw.tif"


def _ramp(shape: tuple[int, ...], dtype: str = "uint16") -> np.ndarray:
    return (np.arange(np.prod(shape)) % 60_000).reshape(shape).astype(dtype)


def _write_array(path, values, chunks, zarr_format):
    array = zarr.create_array(
        str(path), shape=values.shape, chunks=chunks, dtype=values.dtype, zarr_format=zarr_format
    )
    array[:] = values
    return array


def _write_ome(path, levels, axes, dataset_transforms, multiscale_transforms, ngff):
    """An OME-Zarr image written by hand: NGFF 0.4 as zarr v2, 0.5 as zarr v3."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if ngff == "0.4" else 3)
    datasets = []
    for index, (values, (scale, translation)) in enumerate(
        zip(levels, dataset_transforms, strict=True)
    ):
        array = root.create_array(
            f"s{index}",
            shape=values.shape,
            chunks=(1,) * (values.ndim - 2) + (8, 8),
            dtype=values.dtype,
        )
        array[:] = values
        datasets.append(
            {
                "path": f"s{index}",
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    multiscale = {"name": "image", "axes": axes, "datasets": datasets}
    if multiscale_transforms:
        multiscale["coordinateTransformations"] = multiscale_transforms
    if ngff == "0.4":
        multiscale["version"] = "0.4"
        root.attrs["multiscales"] = [multiscale]
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return root


def _axes(names: str) -> list[dict]:
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    return [{"name": name, "type": kinds[name]} for name in names]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array_opens_lazily_with_its_own_chunks(tmp_path, zarr_format):
    values = _ramp((6, 20, 24))
    _write_array(tmp_path / "raw.zarr", values, (2, 8, 8), zarr_format)

    volume = open_volume(tmp_path / "raw.zarr")

    assert isinstance(volume, Volume) and isinstance(volume.data, da.Array)
    assert volume.shape == (1, 6, 20, 24) and volume.spatial_shape == (6, 20, 24)
    assert volume.data.chunksize == (1, 2, 8, 8)
    assert (volume.input_ndim, volume.has_channel_axis, volume.spatial_ndim) == (3, False, 3)
    assert volume.scale == (1.0, 1.0, 1.0) and volume.translation == (0.0, 0.0, 0.0)
    assert volume.dtype == np.uint16 and volume.n_channels == 1
    np.testing.assert_array_equal(volume.data[0, 3:5, 7:13].compute(), values[3:5, 7:13])


def test_zarr_is_read_after_opening_not_at_opening(tmp_path):
    values = _ramp((4, 16, 16)) + 1  # no zeros: a missing chunk reads as fill value 0
    _write_array(tmp_path / "raw.zarr", values, (2, 8, 8), 2)
    volume = open_volume(tmp_path / "raw.zarr")

    (tmp_path / "raw.zarr" / "0.0.0").unlink()  # the chunk holding [0:2, 0:8, 0:8]

    read = volume.data[0].compute()
    assert np.all(read[:2, :8, :8] == 0)
    np.testing.assert_array_equal(read[2:], values[2:])


def test_sharded_zarr_v3_uses_shards_as_dask_chunks(tmp_path):
    values = _ramp((8, 16, 16))
    array = zarr.create_array(
        str(tmp_path / "sharded.zarr"),
        shape=values.shape,
        chunks=(2, 4, 4),
        shards=(4, 8, 8),
        dtype=values.dtype,
    )
    array[:] = values

    volume = open_volume(tmp_path / "sharded.zarr")

    assert volume.data.chunksize == (1, 4, 8, 8)
    np.testing.assert_array_equal(volume.data[0].compute(), values)


def test_too_many_zarr_chunks_are_merged_in_whole_multiples(tmp_path):
    # Metadata only: a 2**30-voxel array in 2**3 chunks is never written or read.
    array = zarr.create_array(
        str(tmp_path / "huge.zarr"), shape=(1024, 1024, 1024), chunks=(8, 8, 8), dtype="uint8"
    )

    chunks = _zarr_dask_chunks(array)

    assert all(c % 8 == 0 and c > 8 for c in chunks)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_group_with_dataset_and_without(tmp_path, zarr_format):
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=zarr_format)
    values = _ramp((2, 4, 8, 8))
    root.create_array("volumes/raw", shape=values.shape, chunks=(1, 2, 8, 8), dtype="uint16")[:] = (
        values
    )
    root.create_array("volumes/labels", shape=(4, 8, 8), dtype="uint8")

    assert list_arrays(tmp_path / "c.zarr") == ["volumes/labels", "volumes/raw"]
    volume = open_volume(tmp_path / "c.zarr", dataset="volumes/raw")
    assert volume.shape == (2, 4, 8, 8) and volume.has_channel_axis
    assert "volumes/raw" in volume.source
    np.testing.assert_array_equal(volume.data.compute(), values)

    with pytest.raises(NormcheckError, match=r"volumes/labels, volumes/raw.*pass --dataset PATH"):
        open_volume(tmp_path / "c.zarr")
    with pytest.raises(NormcheckError, match=r"no dataset 'volumes/nope'.*volumes/raw"):
        open_volume(tmp_path / "c.zarr", dataset="volumes/nope")
    with pytest.raises(NormcheckError, match="not a group"):
        open_volume(tmp_path / "c.zarr" / "volumes" / "raw", dataset="x")


def test_four_d_channel_axis_moves_to_front(tmp_path):
    values = _ramp((4, 8, 10, 3))  # Z, Y, X, C
    _write_array(tmp_path / "zyxc.zarr", values, (2, 8, 10, 3), 3)

    volume = open_volume(tmp_path / "zyxc.zarr", channel_axis=-1)

    assert volume.shape == (3, 4, 8, 10)
    np.testing.assert_array_equal(volume.data.compute(), np.moveaxis(values, -1, 0))
    with pytest.raises(NormcheckError, match="needs a channel axis"):
        open_volume(tmp_path / "zyxc.zarr", channel_axis=None)
    with pytest.raises(NormcheckError, match="out of range"):
        open_volume(tmp_path / "zyxc.zarr", channel_axis=4)


NGFF_04_LEVELS = [
    ([1.0, 2.0, 0.5, 0.5], [0.0, 10.0, 5.0, 5.0]),
    ([1.0, 2.0, 1.0, 1.0], [0.0, 10.0, 5.25, 5.25]),
]
NGFF_04_MULTISCALE = [
    {"type": "scale", "scale": [1.0, 3.0, 1.0, 1.0]},
    {"type": "translation", "translation": [0.0, 1.0, 2.0, 3.0]},
]


@pytest.mark.parametrize(
    ("level", "scale", "translation"),
    # Dataset transform first, then the multiscale one: z = (2 i + 10) * 3 + 1, y = 0.5 i + 5 + 2.
    [(0, (6.0, 0.5, 0.5), (31.0, 7.0, 8.0)), (1, (6.0, 1.0, 1.0), (31.0, 7.25, 8.25))],
)
def test_ome_zarr_04_levels_keep_voxel_size_and_translation(tmp_path, level, scale, translation):
    full = _ramp((2, 3, 16, 16))
    levels = [full, full[:, :, ::2, ::2]]
    _write_ome(
        tmp_path / "img.zarr", levels, _axes("czyx"), NGFF_04_LEVELS, NGFF_04_MULTISCALE, "0.4"
    )

    volume = open_volume(tmp_path / "img.zarr", level=level)

    assert volume.scale == pytest.approx(scale) and volume.translation == pytest.approx(translation)
    assert volume.shape == levels[level].shape and volume.has_channel_axis
    assert volume.data.numblocks[1] == 3  # stored chunks (1, 1, 8, 8): lazy, not one block
    np.testing.assert_array_equal(volume.data.compute(), levels[level])


@pytest.mark.parametrize(("level", "yx_size"), [(0, 0.25), (1, 0.5)])
def test_ome_zarr_05_five_d_with_one_time_point(tmp_path, level, yx_size):
    full = _ramp((1, 2, 4, 16, 16))
    levels = [full, full[..., ::2, ::2]]
    transforms = [
        ([60.0, 1.0, 1.5, 0.25, 0.25], [0.0, 0.0, -3.0, 0.0, 0.0]),
        ([60.0, 1.0, 1.5, 0.5, 0.5], [0.0, 0.0, -3.0, 0.125, 0.125]),
    ]
    _write_ome(tmp_path / "img.zarr", levels, _axes("tczyx"), transforms, None, "0.5")

    volume = open_volume(tmp_path / "img.zarr", level=level)

    assert volume.shape == levels[level].shape[1:]
    assert volume.scale == pytest.approx((1.5, yx_size, yx_size))
    assert volume.translation == pytest.approx((-3.0, yx_size / 2 - 0.125, yx_size / 2 - 0.125))
    assert (volume.input_ndim, volume.has_channel_axis, volume.spatial_ndim) == (5, True, 3)
    np.testing.assert_array_equal(volume.data.compute(), levels[level][0])


def test_ome_zarr_errors_and_dataset_by_path(tmp_path):
    full = _ramp((2, 2, 3, 8, 8))
    _write_ome(
        tmp_path / "img.zarr",
        [full, full],
        _axes("tczyx"),
        [([1.0] * 5, [0.0] * 5)] * 2,
        None,
        "0.5",
    )

    with pytest.raises(NormcheckError, match=r"level 5 requested but .* has 2 levels \(0-1\)"):
        open_volume(tmp_path / "img.zarr", level=5)
    with pytest.raises(NormcheckError, match="2 time points"):
        open_volume(tmp_path / "img.zarr")
    with pytest.raises(NormcheckError, match="contradicts the axes metadata"):
        open_volume(tmp_path / "img.zarr", channel_axis=0)


def test_ome_zarr_two_spatial_axes_and_level_named_as_dataset(tmp_path):
    values = _ramp((3, 16, 16))
    transforms = [([1.0, 0.5, 0.5], [0.0, 1.0, 2.0]), ([1.0, 1.0, 1.0], [0.0, 1.25, 2.25])]
    _write_ome(
        tmp_path / "img.zarr", [values, values[:, ::2, ::2]], _axes("cyx"), transforms, None, "0.4"
    )

    volume = open_volume(tmp_path / "img.zarr", dataset="s1")

    assert volume.shape == (3, 1, 8, 8) and volume.spatial_ndim == 2
    assert volume.scale == (1.0, 1.0, 1.0) and volume.translation == (0.0, 1.25, 2.25)


def test_tiff_stack_opens_lazily_page_by_page(tmp_path):
    values = _ramp((8, 32, 32))
    tifffile.imwrite(tmp_path / "stack.tif", values)

    volume = open_volume(tmp_path / "stack.tif")

    assert volume.shape == (1, 8, 32, 32) and volume.dtype == np.uint16
    assert volume.data.chunksize == (1, 1, 32, 32)  # one chunk per page: no whole-file read
    np.testing.assert_array_equal(volume.data[0, 2:5].compute(), values[2:5])
    np.testing.assert_array_equal(volume.data.compute()[0], values)


def test_imagej_tiff_channels_and_voxel_size(tmp_path):
    values = _ramp((5, 2, 16, 16))  # ImageJ hyperstack Z, C, Y, X
    tifffile.imwrite(
        tmp_path / "hyper.tif",
        values,
        imagej=True,
        resolution=(4.0, 4.0),
        metadata={"axes": "ZCYX", "spacing": 2.5, "unit": "um"},
    )

    volume = open_volume(tmp_path / "hyper.tif")

    assert volume.shape == (2, 5, 16, 16) and volume.scale == pytest.approx((2.5, 0.25, 0.25))
    np.testing.assert_array_equal(volume.data.compute(), np.moveaxis(values, 1, 0))


def test_rgb_tiff_samples_become_channels(tmp_path):
    values = _ramp((16, 20, 3), "uint8")
    tifffile.imwrite(tmp_path / "rgb.tif", values, photometric="rgb")

    volume = open_volume(tmp_path / "rgb.tif")

    assert volume.shape == (3, 1, 16, 20) and volume.spatial_ndim == 2
    np.testing.assert_array_equal(volume.data[:, 0].compute(), np.moveaxis(values, -1, 0))


@pytest.mark.skipif(not ISBI_RAW.exists(), reason="shared ISBI 2012 data not present")
def test_isbi_em_stack_matches_tifffile():
    volume = open_volume(ISBI_RAW)

    assert volume.shape == (1, 30, 512, 512) and volume.dtype == np.uint8
    assert volume.data.numblocks == (1, 30, 1, 1)
    assert volume.scale == pytest.approx((50.0, 4.0, 4.0))  # ImageJ: 50 nm sections, 4 nm pixels
    np.testing.assert_array_equal(volume.data[0, 17].compute(), tifffile.imread(ISBI_RAW, key=17))


def test_npy_is_memory_mapped(tmp_path):
    values = _ramp((4, 6, 8)).astype(np.float32)
    np.save(tmp_path / "raw.npy", values)
    volume = open_volume(tmp_path / "raw.npy")

    on_disk = np.load(tmp_path / "raw.npy", mmap_mode="r+")
    on_disk[1] = -1.0  # written after opening: a memory map sees it, a copy would not
    on_disk.flush()

    expected = values.copy()
    expected[1] = -1.0
    np.testing.assert_array_equal(volume.data[0].compute(), expected)


def test_contiguous_chunks_cut_leading_axes():
    assert _contiguous_chunks((100, 64, 64), 2, target_bytes=64 * 64 * 2 * 10) == (10, 64, 64)
    assert _contiguous_chunks((3, 100, 50), 1, target_bytes=1000) == (1, 20, 50)
    assert _contiguous_chunks((4, 5), 8) == (4, 5)


def test_numpy_and_dask_inputs_and_ndim_rules():
    plane = _ramp((12, 10))
    volume = open_volume(plane)
    assert volume.shape == (1, 1, 12, 10) and volume.spatial_ndim == 2
    plane[0, 0] = 7  # napari layer data is wrapped, not copied (dask's from_array would copy it)
    assert volume.data[0, 0, 0, 0].compute() == 7

    cyx = _ramp((3, 12, 10))
    volume = open_volume(cyx, channel_axis=0)
    assert volume.shape == (3, 1, 12, 10) and volume.has_channel_axis
    assert open_volume(cyx).shape == (1, 3, 12, 10)

    lazy = da.from_array(_ramp((2, 6, 12, 10)), chunks=(1, 3, 6, 5))
    volume = open_volume(lazy)
    assert volume.shape == (2, 6, 12, 10) and volume.data.chunksize == (1, 3, 6, 5)
    np.testing.assert_array_equal(volume.data.compute(), lazy.compute())

    pyramid = [_ramp((6, 12, 10)), _ramp((6, 6, 5))]
    assert open_volume(pyramid, level=1).shape == (1, 6, 6, 5)

    with pytest.raises(NormcheckError, match=r"shape \(1, 2, 3, 4, 5\) \(5D\); supported"):
        open_volume(np.zeros((1, 2, 3, 4, 5)))
    with pytest.raises(NormcheckError, match=r"shape \(7,\) \(1D\)"):
        open_volume(np.zeros(7))
    with pytest.raises(NormcheckError, match="2D .* cannot have a channel axis"):
        open_volume(plane, channel_axis=0)
    with pytest.raises(NormcheckError, match="single resolution level"):
        open_volume(plane, level=1)


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(NormcheckError, match="no such file or folder: .*nothing.zarr"):
        open_volume(tmp_path / "nothing.zarr")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NormcheckError, match="unknown format .* supported: .*TIFF"):
        open_volume(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NormcheckError, match="not a readable zarr array or group"):
        open_volume(tmp_path / "empty")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(NormcheckError, match="cannot read .*broken.tif as TIFF"):
        open_volume(tmp_path / "broken.tif")
