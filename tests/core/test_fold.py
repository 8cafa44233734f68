"""Folding BatchNorm into the preceding convolution keeps the eval output (speed-up printed only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.remedies.fold import fold_batchnorm, fold_speedup
from napari_normcheck.data import SAMPLE_MODELS, sample_volume
from tests.conftest import calibrate, tiny_unet


def test_packaged_batchnorm_sample_folds_with_equal_eval_output():
    model = SAMPLE_MODELS["batchnorm"].load()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    n_batchnorm = sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    result = fold_batchnorm(model)
    assert len(result.folded) == n_batchnorm and not result.skipped
    assert not any(isinstance(m, nn.BatchNorm3d) for m in result.model.modules())
    raw = sample_volume()[:48, :64, :128].astype(np.float32) / 255.0
    tiles = [torch.from_numpy(raw[None, None, :, :, x : x + 64].copy()) for x in (0, 64)]
    timing = fold_speedup(model, result.model, tiles, repeats=1)
    print(f"fold speed-up on the sample: {timing}")
    with torch.inference_mode():
        for x in tiles:
            expected, got = model(x), result.model(x)
            scale = max(1.0, float(expected.abs().max()))
            # Logits reach ~50 here: 1e-5 relative to their scale, and 1e-5 on probabilities.
            assert float((got - expected).abs().max()) <= 1e-5 * scale
            np.testing.assert_allclose(torch.sigmoid(got), torch.sigmoid(expected), atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_transposed_and_biasless_convolutions_and_non_affine_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4, affine=False),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 3, 2, stride=2),
        nn.BatchNorm2d(3),
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.BatchNorm2d(3))),
    )
    model = calibrate(model, (2, 8, 8))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 2.0)
            nn.init.uniform_(m.bias, -1.0, 1.0)
    result = fold_batchnorm(model)
    assert len(result.folded) == 3
    x = torch.randn(2, 2, 8, 8)
    with torch.inference_mode():
        np.testing.assert_allclose(result.model(x).numpy(), model.eval()(x).numpy(), atol=1e-5)


def test_batchnorm_without_convolution_before_it_is_left_alone():
    model = calibrate(nn.Sequential(nn.Conv3d(1, 2, 1), nn.ReLU(), nn.BatchNorm3d(2)), (1, 4, 4, 4))
    result = fold_batchnorm(model)
    assert result.folded == [] and len(result.skipped) == 1


def test_torchscript_is_refused():
    model = torch.jit.script(calibrate(tiny_unet("batch"), (1, 16, 32, 32)))
    with pytest.raises(NormcheckError, match="eager"):
        fold_batchnorm(model)
