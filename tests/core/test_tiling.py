import numpy as np
import pytest
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from napari_normcheck.core.errors import NormcheckError
from napari_normcheck.core.tiling import parse_roi, plan_tiles


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
