"""What networks take: per-axis divisors by forwards, the user's tile tried first, outputs.

Every network here is written in the test, small, and built to have one shape rule: pooling with
padding, z pooled only at the bottom, strided convolutions, a fixed input size, several outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models.outputs import OutputChoice, attach_choice, select_prediction
from napari_normcheck.core.models.probe import probe_model, probe_with_notes
from napari_normcheck.core.models.tilefit import check_window


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU())


class AnisotropicUNet(nn.Module):
    """Pools with padding: (1, 2, 2) in the upper levels, (2, 2, 2) only at the bottom.

    Odd sizes come back one voxel larger from a padded pool and its upsampling, so the skip
    concatenation fails: z must be even, y and x multiples of 16.
    """

    def __init__(self, width: int = 2, upper: int = 3):
        super().__init__()
        self.encoders = nn.ModuleList([block(1, width)])
        self.encoders.extend(block(width, width) for _ in range(upper))
        self.pools = nn.ModuleList(
            [nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)) for _ in range(upper)]
            + [nn.MaxPool3d(3, 2, 1)]
        )
        self.scales = [(1, 2, 2)] * upper + [(2, 2, 2)]
        self.bottom = block(width, width)
        self.decoders = nn.ModuleList(block(2 * width, width) for _ in range(upper + 1))
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        skips = []
        for encoder, pool in zip(self.encoders, self.pools):
            x = encoder(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom(x)
        for decoder, scale, skip in zip(
            self.decoders, reversed(self.scales), reversed(skips), strict=True
        ):
            x = nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
            x = decoder(torch.cat([x, skip], 1))
        return self.head(x)


class StridedNet(nn.Module):
    """2D, downsampling by strided convolutions (x by 8, y by 2) and transposed convolutions."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=(1, 2), padding=1),
            nn.Conv2d(4, 4, 3, stride=(2, 2), padding=1),
            nn.Conv2d(4, 4, 3, stride=(1, 2), padding=1),
            nn.BatchNorm2d(4),
        )
        self.up = nn.ConvTranspose2d(4, 2, kernel_size=(2, 8), stride=(2, 8))

    def forward(self, x):
        return self.up(self.down(x))


class FixedSizeNet(nn.Module):
    """A Linear bottleneck: only inputs of ``shape`` (32 x 32 by default) fit."""

    def __init__(self, shape: tuple[int, int] = (32, 32)):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(2)
        self.pool = nn.MaxPool2d(4)
        features = 2 * (shape[0] // 4) * (shape[1] // 4)
        self.linear = nn.Linear(features, features)
        self.up = nn.Upsample(scale_factor=4)

    def forward(self, x):
        y = self.pool(torch.relu(self.norm(self.conv(x))))
        y = self.linear(y.flatten(1)).view(y.shape)
        return self.up(y)


class DeepSupervision(nn.Module):
    """Returns heads at 1/2 and full resolution (the full one second), as a list or a dict."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.as_dict = as_dict
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        full = self.norm(self.conv(x))
        half = nn.functional.avg_pool2d(full, 2)
        return {"aux": half, "seg": full, "epoch": 3} if self.as_dict else [half, full]


class SelfActivating(nn.Module):
    """Applies softmax itself outside training."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if self.training else torch.softmax(y, 1)


@pytest.fixture(scope="module")
def anisotropic():
    torch.manual_seed(0)
    return AnisotropicUNet().eval()


def test_anisotropic_padding_pools_get_a_divisor_per_axis(anisotropic):
    before = {k: v.clone() for k, v in anisotropic.state_dict().items()}
    info = probe_model(anisotropic)
    assert info.divisor == (2, 16, 16)
    assert info.fixed_shape is None
    assert all(torch.equal(v, before[k]) for k, v in anisotropic.state_dict().items())


@pytest.mark.parametrize("window", [(10, 64, 64), (6, 32, 32), (32, 32, 32)])
def test_anisotropic_windows_that_work_are_taken(anisotropic, window):
    assert check_window(anisotropic, 1, window, 3, divisor=(2, 16, 16)) == 2


def test_anisotropic_window_that_fails_names_the_axis(anisotropic):
    with pytest.raises(NormcheckError) as caught:
        check_window(anisotropic, 1, (3, 32, 32), 3, divisor=(2, 16, 16))
    message = str(caught.value)
    assert "z 3 fails, 4 or 2 work" in message and "\n" not in message
    with pytest.raises(NormcheckError, match=r"x 40 fails, 48 or 32 work \(multiples of 16\)"):
        check_window(anisotropic, 1, (4, 32, 40), 3, divisor=(2, 16, 16))


def test_strided_convolutions():
    assert probe_model(StridedNet()).divisor == (2, 8)


def test_window_not_a_multiple_of_the_divisor_still_runs_when_the_model_takes_it():
    class Padded(nn.Module):
        """Pools, then pads the upsampled grid back to the input: takes any size."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            low = nn.functional.max_pool2d(self.conv(x), 4)
            up = nn.functional.interpolate(low, size=x.shape[2:])
            return up + self.conv(x)

    model = Padded()
    assert probe_model(model).divisor == (4, 4)  # advice
    assert check_window(model, 1, (1, 30, 33), 2, divisor=(4, 4)) == 2


def test_fixed_input_size_from_a_linear_layer():
    model = FixedSizeNet()
    info, notes = probe_with_notes(model, None, None)
    assert info.fixed_shape == (32, 32)
    assert any("fixed size" in note for note in notes)
    with pytest.raises(NormcheckError, match="1,32,32 works"):
        check_window(model, 1, (1, 64, 64), 2, divisor=info.divisor)


def test_deep_supervision_list_uses_the_full_resolution_head():
    model = DeepSupervision()
    info, notes = probe_with_notes(model, None, None)
    assert info.out_channels == 3 and info.divisor == (2, 2)
    assert len(info.outputs) == 2 and info.outputs[1].startswith("[1] tensor")
    assert any("full-resolution" in note and "[1]" in note for note in notes)
    image = torch.randn(1, 1, 8, 8)
    prediction, _ = select_prediction(model(image), None, (8, 8))
    assert prediction.shape == (1, 3, 8, 8)


def test_output_index_and_key_choose_an_output():
    listed = attach_choice(DeepSupervision(), OutputChoice(index=0))
    with pytest.raises(NormcheckError, match="input's spatial shape"):
        probe_model(listed)  # the half-resolution head cannot be a prediction
    keyed = attach_choice(DeepSupervision(as_dict=True), OutputChoice(key="seg"))
    assert probe_model(keyed).out_channels == 3
    wrong = attach_choice(DeepSupervision(as_dict=True), OutputChoice(key="mask"))
    with pytest.raises(NormcheckError, match="'aux', 'seg', 'epoch'"):
        probe_model(wrong)
    with pytest.raises(NormcheckError, match="--output-index 5.*a list of 2"):
        select_prediction([torch.zeros(1)] * 2, OutputChoice(index=5))


def test_dict_output_default_is_the_first_full_resolution_tensor():
    info, notes = probe_with_notes(DeepSupervision(as_dict=True), None, None)
    assert info.out_channels == 3
    assert any("'seg'" in note for note in notes)
    assert info.outputs[2] == "'epoch' int"


def test_self_activating_model_is_recognised():
    info, notes = probe_with_notes(SelfActivating(), None, None)
    assert info.output_activation == "softmax"
    assert any("--activation none" in note for note in notes)


def test_probe_failure_is_kept_when_allowed():
    model = FixedSizeNet((48, 32))  # not square: the probe cannot derive it
    with pytest.raises(NormcheckError, match="fails on a random input"):
        probe_model(model)
    info, _ = probe_with_notes(model, None, None, allow_failure=True)
    assert info.probe_error and info.tried and info.out_channels == 0
    assert check_window(model, 1, (1, 48, 32), 2) == 2
