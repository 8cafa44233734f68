import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map

from napari_normcheck.core.run.stitch import importance_map


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("window", [(16, 32, 32), (7, 33, 20), (1, 64, 48)])
def test_importance_map_is_monai_bitwise(mode, window):
    spatial_dims = 2 if window[0] == 1 else 3
    ours = importance_map(window, mode, spatial_dims)
    theirs = compute_importance_map(
        window[-spatial_dims:], mode=mode, sigma_scale=0.125, dtype=torch.float32
    ).numpy()
    assert ours.dtype == np.float32 and ours.shape == window
    np.testing.assert_array_equal(ours.reshape(theirs.shape), theirs)


def test_crop_weights_are_ones():
    assert np.array_equal(importance_map((4, 8, 8), "crop"), np.ones((4, 8, 8), np.float32))


def _numpy_blend(plan, predictions, weights):
    """MONAI's arithmetic in NumPy over whole-volume buffers: sum += pred * w, count += w."""
    total = np.zeros((predictions.shape[1], *plan.roi_shape), np.float32)
    count = np.zeros(plan.roi_shape, np.float32)
    for tile in plan.tiles():
        box = tuple(
            slice(a - r, b - r)
            for a, b, r in zip(tile.write_start, tile.write_stop, plan.roi_start)
        )
        window = tuple(
            slice(a - w, b - w)
            for a, b, w in zip(tile.write_start, tile.write_stop, tile.window_start)
        )
        total[(slice(None), *box)] += (
            predictions[tile.index][(slice(None), *window)] * weights[window]
        )
        count[box] += weights[window]
    return total / count


@pytest.mark.parametrize("as_tensors", [False, True])
def test_chunk_sums_in_torch_are_the_numpy_blend_bit_for_bit(tmp_path, as_tensors):
    """The accumulator's torch sums (the run's device) equal NumPy's float32 arithmetic exactly."""
    from napari_normcheck.core.base.tiling import plan_tiles
    from napari_normcheck.core.run.stitch import ChunkAccumulator

    plan = plan_tiles((30, 70, 61), (16, 32, 32), overlap=0.3)
    weights = importance_map(plan.window_shape, "gaussian")
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=(plan.n_tiles, 2, *plan.window_shape)).astype(np.float32)
    out = np.full((2, *plan.roi_shape), np.nan, np.float32)

    def done(_chunk, slices, values):
        assert isinstance(values, torch.Tensor) and values.dtype == torch.float32
        out[(slice(None), *slices)] = values.numpy()

    chunk_bytes = 2 * 4 * int(np.prod(plan.chunk_shape))
    accumulator = ChunkAccumulator(plan, 2, weights, done, tmp_path, max_bytes=2 * chunk_bytes)
    for tile in plan.tiles():
        prediction = predictions[tile.index]
        # The loop hands each mode's tensor apart; NumPy arrays are taken as well.
        parts = [torch.from_numpy(prediction[:1]), torch.from_numpy(prediction[1:])]
        accumulator.add(tile, parts if as_tensors else prediction)
    assert accumulator.complete and accumulator.spill_count > 0
    np.testing.assert_array_equal(out, _numpy_blend(plan, predictions, weights))
