"""Eval with batch statistics equals per-tile train-mode forwards, without touching the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_normcheck.core.base.modes import normalization_mode, running_stats_layers
from napari_normcheck.core.remedies.batchstats import BatchStatsNorm, batch_stats_copy
from tests.conftest import calibrate, tiny_unet

NORMS = {
    "batch": "batch",
    "instance_running": ("instance", {"track_running_stats": True, "affine": True}),
}


def per_tile_train(model, batch):
    with torch.inference_mode(), normalization_mode(model, "train"):
        return torch.cat([model(batch[i : i + 1]) for i in range(batch.shape[0])])


@pytest.mark.parametrize("norm", list(NORMS))
def test_batch_stats_equal_per_tile_train_mode(norm):
    model = calibrate(tiny_unet(NORMS[norm]), (1, 16, 32, 32))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randn((3, 1, 16, 32, 32), generator=torch.Generator().manual_seed(0))
    batch[1] *= 5  # tiles of different statistics in one eval batch
    copy_ = batch_stats_copy(model)
    assert not running_stats_layers(copy_)
    assert sum(isinstance(m, BatchStatsNorm) for m in copy_.modules()) == len(
        running_stats_layers(model)
    )
    with torch.inference_mode():
        together = copy_(batch)
        alone = copy_(batch[1:2])
        eval_output = model.eval()(batch)
    expected = per_tile_train(model, batch)
    np.testing.assert_allclose(together.numpy(), expected.numpy(), atol=1e-5, rtol=0)
    # A tile's prediction does not depend on the other tiles of the batch.
    np.testing.assert_allclose(alone.numpy(), together[1:2].numpy(), atol=1e-5, rtol=0)
    assert (together - eval_output).abs().max() > 1e-3
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not model.training


def test_scripted_model_falls_back_to_per_tile_train_mode():
    model = torch.jit.script(calibrate(tiny_unet("batch"), (1, 16, 32, 32)))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randn((2, 1, 16, 32, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = batch_stats_copy(model)(batch)
    np.testing.assert_allclose(got.numpy(), per_tile_train(model, batch).numpy(), atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
