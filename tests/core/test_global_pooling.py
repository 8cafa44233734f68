"""A global pooling is not downsampling: Cellpose's style vector and squeeze-and-excitation.

``CellposeNet`` follows Cellpose 3's ``CPnet`` (``cellpose/resnet_torch.py``, v3.1): four residual
levels with a 2x2 max-pool before each level but the first (tile sides: multiples of 8), a style
vector that averages the bottom features over the whole map (``F.avg_pool2d`` with the map's own size
as kernel) and is added, through a Linear layer, to every convolution of the upsampling path. Only
the widths are smaller. ``SqueezeExciteUNet`` is a 3D U-Net (three or four 2x max-pools) whose
bottom block rescales its channels by a squeeze-and-excitation gate (a whole-map average pool, then
two 1x1 convolutions and a sigmoid).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_normcheck.cli import main
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models.probe import probe_model
from napari_normcheck.core.models.shape_search import axis_divisor
from napari_normcheck.core.models.tilefit import check_window
from napari_normcheck.core.models.trials import run_trial, untouched

HERE = "tests.core.test_global_pooling"


def batchconv(cin: int, cout: int, size: int) -> nn.Sequential:
    """Cellpose's pre-activation convolution: BatchNorm, ReLU, then the convolution."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=1e-5, momentum=0.05),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, size, padding=size // 2),
    )


def batchconv0(cin: int, cout: int, size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=1e-5, momentum=0.05), nn.Conv2d(cin, cout, size, padding=size // 2)
    )


class ResDown(nn.Module):
    def __init__(self, cin: int, cout: int, size: int):
        super().__init__()
        self.proj = batchconv0(cin, cout, 1)
        self.conv = nn.Sequential(
            batchconv(cin, cout, size), *(batchconv(cout, cout, size) for _ in range(3))
        )

    def forward(self, x):
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class BatchConvStyle(nn.Module):
    def __init__(self, cin: int, cout: int, style_channels: int, size: int):
        super().__init__()
        self.conv = batchconv(cin, cout, size)
        self.full = nn.Linear(style_channels, cout)

    def forward(self, style, x, y=None):
        if y is not None:
            x = x + y
        feat = self.full(style)[..., None, None]  # broadcast over the whole map
        return self.conv(x + feat)


class ResUp(nn.Module):
    def __init__(self, cin: int, cout: int, style_channels: int, size: int):
        super().__init__()
        self.conv = nn.Sequential(
            batchconv(cin, cout, size),
            BatchConvStyle(cout, cout, style_channels, size),
            BatchConvStyle(cout, cout, style_channels, size),
            BatchConvStyle(cout, cout, style_channels, size),
        )
        self.proj = batchconv0(cin, cout, 1)

    def forward(self, x, y, style):
        x = self.proj(x) + self.conv[1](style, self.conv[0](x), y=y)
        return x + self.conv[3](style, self.conv[2](style, x))


class CellposeNet(nn.Module):
    """Cellpose 3's ``CPnet`` with narrow levels: returns ``(flows, style, bottom features)``."""

    def __init__(self, nbase: tuple[int, ...] = (2, 8, 8, 16, 16), nout: int = 3, size: int = 3):
        super().__init__()
        nbase = list(nbase)
        self.maxpool = nn.MaxPool2d(2, stride=2)
        self.down = nn.ModuleList(ResDown(nbase[n], nbase[n + 1], size) for n in range(4))
        nbaseup = [*nbase[1:], nbase[-1]]
        self.upsampling = nn.Upsample(scale_factor=2, mode="nearest")
        self.up = nn.ModuleList(
            ResUp(nbaseup[n], nbaseup[n - 1], nbaseup[-1], size) for n in range(1, len(nbaseup))
        )
        self.output = batchconv(nbaseup[0], nout, 1)

    def make_style(self, x0):
        style = F.avg_pool2d(x0, kernel_size=x0.shape[2:]).flatten(1)
        return style / torch.sum(style**2, dim=1, keepdim=True) ** 0.5

    def forward(self, data):
        xd = []
        for n, level in enumerate(self.down):
            xd.append(level(self.maxpool(xd[n - 1]) if n > 0 else data))
        style = self.make_style(xd[-1])
        x = self.up[-1](xd[-1], xd[-1], style)
        for n in range(len(self.up) - 2, -1, -1):
            x = self.up[n](self.upsampling(x), xd[n], style)
        return self.output(x), style, xd[-1]


def block3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU())


class SqueezeExcite(nn.Module):
    """Channel gate from the whole map's mean (kernel = the map's size, as Cellpose's style)."""

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv3d(channels, channels // reduction, 1),
            nn.ReLU(),
            nn.Conv3d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.gate(F.avg_pool3d(x, kernel_size=x.shape[2:]))


class SqueezeExciteUNet(nn.Module):
    """3D U-Net, ``levels`` 2x max-pools (tile sides: multiples of 2**levels), a gated bottom."""

    def __init__(self, width: int = 4, levels: int = 3):
        super().__init__()
        self.encoders = nn.ModuleList([block3d(1, width)])
        self.encoders.extend(block3d(width, width) for _ in range(levels - 1))
        self.bottom = nn.Sequential(block3d(width, width), SqueezeExcite(width))
        self.decoders = nn.ModuleList(block3d(2 * width, width) for _ in range(levels))
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self.bottom(x)
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([F.interpolate(x, scale_factor=2), skip], 1))
        return self.head(x)


class PaddingDeepNet(nn.Module):
    """2D, six 2x max-pools (64x), odd grids padded back in the decoder as MONAI's BasicUNet does.

    It takes any side of 64 or more, but only multiples of 64 pass every pooling whole. Probed at
    64 x 64, its last pooling reduces a 2 x 2 map to one voxel, as a global pooling would.
    """

    def __init__(self, width: int = 2, levels: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.levels = levels
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        skips = []
        x = self.stem(x)
        for _ in range(self.levels):
            skips.append(x)
            x = F.max_pool2d(x, 2)
        for skip in reversed(skips):
            x = F.interpolate(x, scale_factor=2)
            pad = [0, skip.shape[3] - x.shape[3], 0, skip.shape[2] - x.shape[2]]
            x = F.pad(x, pad, mode="replicate") + skip
        return self.head(x)


@pytest.fixture(scope="module")
def cellpose():
    torch.manual_seed(0)
    return CellposeNet().eval()


def test_cellpose_style_vector_is_not_downsampling(cellpose):
    before = {k: v.clone() for k, v in cellpose.state_dict().items()}
    info = probe_model(cellpose)
    assert (info.in_channels, info.out_channels) == (2, 3)
    assert info.divisor == (8, 8)
    assert info.describe_shapes() == "tile sides: y a multiple of 8, x a multiple of 8"
    assert all(torch.equal(v, before[k]) for k, v in cellpose.state_dict().items())


@pytest.mark.parametrize("side", [40, 56, 72, 224])
def test_cellpose_tiles_that_are_multiples_of_8_run(cellpose, side):
    # 224 is Cellpose's own tile, and no multiple of 64.
    assert check_window(cellpose, 2, (1, side, side), 2, divisor=(8, 8)) == 3


def test_cellpose_tile_that_fails_is_told_multiples_of_8(cellpose):
    with pytest.raises(NormcheckError, match=r"y 60 fails, 64 or 56 work \(multiples of 8\)"):
        check_window(cellpose, 2, (1, 60, 64), 2, divisor=(8, 8))


def test_inspect_advises_multiples_of_8_for_cellpose(cellpose, tmp_path, capsys):
    torch.save(cellpose.state_dict(), tmp_path / "cp.pt")
    assert main(["inspect", str(tmp_path / "cp.pt"), "--arch", f"{HERE}:CellposeNet"]) == 0
    out = capsys.readouterr().out
    assert "tile sides: y a multiple of 8, x a multiple of 8" in out
    assert "the model returns: [0] tensor (1, 3, 64, 64); [1] tensor (1, 16)" in out
    assert "note: the model pools whole maps (avg_pool2d), as a style vector" in out


def test_a_hint_too_large_is_lowered_by_forwards(cellpose):
    """Were the style pooling taken for a stride (hint 64), smaller divisors that run are kept."""
    with untouched(cellpose, []):

        def trial(spatial, watch=None):
            return run_trial(cellpose, 2, spatial, watch=watch)

        base = trial((64, 64))
        divisor, tried = axis_divisor(trial, base, 0, 64)
    assert divisor == 8
    assert [t.spatial[0] for t in tried] == [192, 32, 48, 56, 60]
    assert tried[-1].error.startswith("StoppedForward") and "remainder" in tried[-1].error


@pytest.mark.parametrize(
    "levels, second, window",
    [(3, (16, 16, 16), (24, 40, 56)), (4, (64, 32, 32), (48, 16, 80))],
)
def test_squeeze_excite_gate_is_not_downsampling(levels, second, window):
    """Probed at 32³, the gate pools a 4³ map (3 levels) or a 2³ one (4 levels) to one voxel."""
    torch.manual_seed(0)
    model = SqueezeExciteUNet(levels=levels).eval()
    info = probe_model(model)
    assert info.divisor == (2**levels,) * 3
    assert f"(1, 1, {', '.join(map(str, second))}): ok" in info.tried
    assert check_window(model, 1, window, 3, divisor=info.divisor) == 2


def test_a_stride_down_to_one_voxel_stays_a_stride():
    model = PaddingDeepNet()
    # It runs 96 x 96 (padding the 3 x 3 map pooled to 1 back), which is no multiple of 64.
    assert check_window(model, 1, (1, 96, 96), 2) == 2
    info = probe_model(model)
    assert info.divisor == (64, 64)
    assert "(1, 1, 128, 64): ok" in info.tried  # the second size: a stride, not global


@pytest.mark.parametrize("scripted", [False, True])
def test_basic_unet_pads_odd_grids_but_keeps_its_16(scripted):
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    model = BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4), norm="batch").eval()
    model = torch.jit.script(model) if scripted else model
    assert check_window(model, 1, (1, 40, 40), 2) == 2  # padded inside: runs
    info = probe_model(model)
    assert info.divisor == (16, 16)
    # The forward on 56 stops at the pooling that leaves a remainder (TorchScript's error too).
    assert "(1, 1, 56, 64): StoppedForward: aten.max_pool2d" in "\n".join(info.tried)
