import copy

import pytest
import torch
from torch import nn

from napari_normcheck.core.base.modes import has_running_stats, normalization_mode
from tests.conftest import calibrate, tiny_unet


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(now[key], value), key


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm3d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        return self.head(self.drop(self.norm(self.conv(x))))


def test_train_mode_uses_batch_statistics_without_updating_running_stats(batchnorm_unet):
    x = torch.randn(1, 1, 16, 32, 32) * 3 + 2
    saved = state_copy(batchnorm_unet)
    reference = copy.deepcopy(batchnorm_unet)
    for m in reference.modules():
        if has_running_stats(m):
            m.train()
    with torch.no_grad():
        expected = reference(x)
    with torch.inference_mode(), normalization_mode(batchnorm_unet, "train"):
        got = batchnorm_unet(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert_state_equal(batchnorm_unet, saved)
    with torch.inference_mode(), normalization_mode(batchnorm_unet, "eval"):
        evaluated = batchnorm_unet(x)
    assert (evaluated - got).abs().max() > 1e-3  # the two modes really differ


def test_dropout_stays_off_and_flags_are_restored():
    torch.manual_seed(0)
    model = calibrate(DropoutNet(), (1, 8, 8, 8))
    model.train()  # the user's model was left in training mode: keep it so
    flags = [m.training for m in model.modules()]
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.inference_mode(), normalization_mode(model, "train"):
        assert not model.drop.training and model.norm.training
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # dropout would make them differ
    assert [m.training for m in model.modules()] == flags


def test_state_restored_after_exception_inside():
    model = calibrate(
        tiny_unet(("instance", {"track_running_stats": True, "affine": True})), (1, 16, 32, 32)
    )
    saved = state_copy(model)
    with pytest.raises(RuntimeError), torch.inference_mode(), normalization_mode(model, "train"):
        model(torch.randn(1, 1, 16, 32, 32))
        raise RuntimeError("boom")
    assert_state_equal(model, saved)
    assert not any(m.training for m in model.modules())


def test_has_running_stats_kinds():
    assert has_running_stats(nn.BatchNorm2d(3))
    assert has_running_stats(nn.SyncBatchNorm(3))
    assert has_running_stats(nn.InstanceNorm3d(3, track_running_stats=True))
    assert not has_running_stats(nn.InstanceNorm3d(3))
    assert not has_running_stats(nn.GroupNorm(1, 3))
    assert not has_running_stats(nn.BatchNorm2d(3, track_running_stats=False))
