import numpy as np
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.pyramid import downsample_means, n_levels
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
from tests.conftest import synthetic_volume


def box_means(values, factor):
    """Independent reference: mean over factor x factor boxes (partial at the high edges)."""
    c, z, y, x = values.shape
    out = np.zeros((c, z, -(-y // factor), -(-x // factor)), np.float64)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            box = values[..., i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
            out[..., i, j] = box.mean(axis=(-2, -1))
    return out


def test_downsample_means_are_box_means_with_partial_edges():
    values = np.random.default_rng(0).random((2, 3, 13, 10), dtype=np.float32)
    levels = downsample_means(values, 3)
    assert [lv.shape for lv in levels] == [(2, 3, 7, 5), (2, 3, 4, 3), (2, 3, 2, 2)]
    for k, level in enumerate(levels, start=1):
        np.testing.assert_allclose(level, box_means(values, 2**k), rtol=1e-6)


def test_levels_stop_at_one_screen_or_at_the_chunk():
    assert n_levels((512, 512), (192, 192), 1024) == 0
    assert n_levels((8192, 4096), (192, 192), 1024) == 3
    assert n_levels((8192, 8192), (96, 96), 256) == 5
    assert n_levels((8192, 8192), (75, 75), 256) == 0  # odd chunks: no level maps onto one chunk


def test_run_writes_levels_that_are_means_of_level_zero(tmp_path):
    from tests.conftest import calibrate, tiny_unet

    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    volume = open_volume(synthetic_volume((16, 70, 84)))
    config = RunConfig(
        tile=(16, 32, 32), activation="sigmoid", output_dtype="float32", pyramid_side=20
    )
    list(run_check(volume, model, config, tmp_path / "o.zarr"))
    root = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    for name in ("pred_eval", "pred_train", "disparity"):
        datasets = root[name].attrs["ome"]["multiscales"][0]["datasets"]
        assert [d["path"] for d in datasets] == ["0", "1", "2", "3"]
        level0 = root[f"{name}/0"][:]
        for k in (1, 2, 3):
            level = root[f"{name}/{k}"][:]
            np.testing.assert_allclose(level, box_means(level0, 2**k), atol=1e-6)
            scale = datasets[k]["coordinateTransformations"][0]["scale"]
            assert scale[-2:] == [2.0**k, 2.0**k] and scale[1] == 1.0
    # uint8 outputs store the rounded means of the float values
    config = config.replace(output_dtype="uint8")
    list(run_check(volume, model, config, tmp_path / "u.zarr"))
    u8 = zarr.open_group(str(tmp_path / "u.zarr"), mode="r")
    expected = np.round(root["pred_eval/2"][:] * 255)
    assert np.abs(u8["pred_eval/2"][:].astype(float) - expected).max() <= 1


def test_chunks_of_zeros_are_left_out_and_others_written_whole(tmp_path):
    # Writes skip zarr's comparison of every chunk with the fill value; chunks of zeros are still
    # left out (or removed where a chunk was written before), as zarr leaves them out.
    from napari_normcheck.core.io.pyramid import Pyramid

    arrays = [
        zarr.create_array(
            tmp_path / f"{level}.zarr",
            shape=(1, 4, 8 // 2**level, 8 // 2**level),
            chunks=(1, 4, 4 // 2**level, 4 // 2**level),
            dtype=dtype,
            fill_value=0,
        )
        for level, dtype in enumerate(["uint8", "uint8"])
    ]
    pyramid = Pyramid(arrays)
    box = (slice(0, 1), slice(0, 4), slice(0, 4), slice(0, 4))
    values = np.zeros((1, 4, 4, 4), np.float32)
    values[0, 0, 0, 1] = 4.0
    pyramid.write_chunk(box, values, lambda v: np.asarray(v).astype(np.uint8))
    empty = (slice(0, 1), slice(0, 4), slice(4, 8), slice(0, 4))
    pyramid.write_chunk(empty, np.zeros_like(values), lambda v: np.asarray(v).astype(np.uint8))

    def stored(level):
        return sorted(
            str(p.relative_to(tmp_path / f"{level}.zarr"))
            for p in (tmp_path / f"{level}.zarr" / "c").rglob("*")
            if p.is_file()
        )

    assert stored(0) == ["c/0/0/0/0"] and stored(1) == ["c/0/0/0/0"]
    np.testing.assert_array_equal(arrays[0][box], values.astype(np.uint8))
    assert arrays[1][0, 0, 0, 0] == 1  # the mean of the first 2x2
    pyramid.write_chunk(box, np.zeros_like(values), lambda v: np.asarray(v).astype(np.uint8))
    assert stored(0) == [] and stored(1) == []
    # Written whole: a chunk of zeros among nonzero values in one write is kept as written.
    both = (slice(0, 1), slice(0, 4), slice(0, 8), slice(0, 4))
    values = np.zeros((1, 4, 8, 4), np.float32)
    values[0, 0, 0, 0] = 1.0
    pyramid[both] = values.astype(np.uint8)
    assert stored(0) == ["c/0/0/0/0", "c/0/0/1/0"]
