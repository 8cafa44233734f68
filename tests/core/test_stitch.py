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
