import numpy as np
import pytest
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.store import read_marker
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.measure.metrics import (
    DisparityAccumulator,
    dice_sums,
    disparity_from_sums,
)
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished
from tests.conftest import synthetic_volume


def numpy_disparity(p, q, threshold=0.5):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    hard, soft = [], []
    for c in range(p.shape[0]):
        a, b = p[c] > threshold, q[c] > threshold
        total = a.sum() + b.sum()
        hard.append(0.0 if total == 0 else 1 - 2 * (a & b).sum() / total)
        s = p[c].sum() + q[c].sum()
        soft.append(0.0 if s == 0 else 1 - 2 * np.minimum(p[c], q[c]).sum() / s)
    return hard, soft


def test_soft_dice_of_identical_maps_is_one_and_empty_counts_as_agreement():
    rng = np.random.default_rng(0)
    p = rng.random((2, 5, 6, 7)).astype(np.float32)
    assert disparity_from_sums(dice_sums(p, p, 0.5)["soft"]) == [0.0, 0.0]
    empty = np.zeros((2, 3, 3, 3), np.float32)
    sums = dice_sums(empty, empty, 0.5)
    assert disparity_from_sums(sums["hard"]) == [0.0, 0.0]
    assert disparity_from_sums(sums["soft"]) == [0.0, 0.0]


def test_accumulated_sums_equal_whole_volume_computation():
    rng = np.random.default_rng(1)
    p, q = rng.random((2, 2, 8, 10, 12)).astype(np.float32)
    acc = DisparityAccumulator(2, 0.5)
    for z in range(0, 8, 3):
        acc.add(p[:, z : z + 3], q[:, z : z + 3])
    hard, soft = numpy_disparity(p, q)
    np.testing.assert_allclose(acc.result()["hard"], hard, rtol=1e-12)
    np.testing.assert_allclose(acc.result()["soft"], soft, rtol=1e-9)


def whole_row_sums(p, q, threshold):
    """The sums of ``dice_sums`` as whole-row NumPy expressions (its earlier implementation)."""
    n = p.shape[0]
    p = np.ascontiguousarray(p, dtype=np.float32).reshape(n, -1)
    q = np.ascontiguousarray(q, dtype=np.float32).reshape(n, -1)
    a, b = p > threshold, q > threshold
    count_a, count_b = a.sum(axis=1), b.sum(axis=1)
    return {
        "hard": np.stack([(a & b).sum(axis=1), count_a + count_b]).astype(np.float64),
        "soft": np.stack(
            [
                np.minimum(p, q).sum(axis=1, dtype=np.float64),
                p.sum(axis=1, dtype=np.float64) + q.sum(axis=1, dtype=np.float64),
            ]
        ),
        "foreground": np.stack([count_a, count_b]).astype(np.float64),
    }


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (3, 5, 7), (1, 90, 91), (2, 128, 256), (5, 129, 257), (3, 211, 300)],
)
def test_step_by_step_sums_are_the_whole_rows_sums_bit_for_bit(shape):
    # Rows shorter than, equal to and longer than a step (65536 values), ending anywhere; strided
    # views (a tile's overlap slab) and float16 input; probabilities over many magnitudes, so
    # that another order of the float64 additions changes the last bits.
    rng = np.random.default_rng(sum(shape))
    scale = 10.0 ** rng.integers(-9, 1, size=(2, 2, *shape))
    p, q = (rng.random((2, 2, *shape)) * scale).astype(np.float32)
    p[:, : shape[0] // 2] = np.round(p[:, : shape[0] // 2])  # saturated voxels too
    views = [(p, q), (p[:, :, :, 1:], q[:, :, :, 1:]), (p[:, :, 1:], q[:, :, 1:])]
    views.append((p.astype(np.float16), q.astype(np.float16)))
    for a, b in views:
        got = dice_sums(a, b, 0.5, counts=True)
        want = whole_row_sums(a, b, 0.5)
        for kind in want:
            assert got[kind].tobytes() == want[kind].tobytes(), (shape, kind)
    # The order matters for these values: adding them one after the other gives other bits.
    row = np.ascontiguousarray(p[0]).reshape(-1)
    if row.size > 2 * 65536:
        one_by_one = np.add.accumulate(row.astype(np.float64))[-1]
        assert one_by_one != row.sum(dtype=np.float64)


def test_engine_disparity_matches_numpy_on_stored_predictions(tmp_path, batchnorm_unet):
    out = tmp_path / "o.zarr"
    events = list(
        run_check(
            open_volume(synthetic_volume((20, 40, 44))),
            batchnorm_unet,
            RunConfig(
                tile=(16, 32, 32),
                blend="crop",
                halo=(0, 8, 8),
                activation="sigmoid",
                output_dtype="float32",
            ),
            out,
        )
    )
    summary = events[-1].summary
    assert isinstance(events[-1], RunFinished)
    root = zarr.open_group(str(out), mode="r")
    p_eval, p_train = root["pred_eval/0"][:], root["pred_train/0"][:]
    hard, soft = numpy_disparity(p_train, p_eval)
    np.testing.assert_allclose(summary["disparity"]["hard"], hard, rtol=1e-9)
    np.testing.assert_allclose(summary["disparity"]["soft"], soft, rtol=1e-6)
    assert max(hard) > 0  # the calibrated BatchNorm model really disagrees with itself
    np.testing.assert_array_equal(root["disparity/0"][:], np.abs(p_train - p_eval))
    # In crop mode a tile's own predictions are what it wrote: per-tile values are checkable.
    grid = root["tile_disparity/0"][:]
    for record in summary["tiles"]:
        box = tuple(slice(a, b) for a, b in zip(record["start"], record["stop"]))
        tile_hard, tile_soft = numpy_disparity(
            p_train[(slice(None), *box)], p_eval[(slice(None), *box)]
        )
        np.testing.assert_allclose(record["disparity_hard"], tile_hard, rtol=1e-9)
        np.testing.assert_allclose(record["disparity_soft"], tile_soft, rtol=1e-6)
        # The grid holds the hard value only where the tile has foreground enough to judge it.
        a, b = p_train[(slice(None), *box)] > 0.5, p_eval[(slice(None), *box)] > 0.5
        foreground = (a.sum(axis=(1, 2, 3)) + b.sum(axis=(1, 2, 3))).tolist()
        judged = [f >= 1000 and f / a[0].size >= 0.001 for f in foreground]
        assert record["foreground_voxels"] == foreground and record["judged"] == judged
        expected = np.where(judged, tile_hard, np.nan)
        np.testing.assert_allclose(grid[(slice(None), *record["grid"])], expected, rtol=1e-6)
    assert read_marker(out)["disparity"] == summary["disparity"]
