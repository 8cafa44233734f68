"""Shared fixtures: tiny real MONAI networks and seeded synthetic volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ISBI_RAW = SHARED_DATA / "em" / "isbi2012_train_raw.tif"


TINY_UNET_ARCH = "monai.networks.nets.BasicUNet"
TINY_FEATURES = (4, 4, 8, 8, 16, 4)


def tiny_unet_kwargs(norm="batch", spatial_dims: int = 3) -> dict:
    """The architecture keyword arguments of :func:`tiny_unet`, as a model file's loader takes them."""
    return {
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "out_channels": 2,
        "features": list(TINY_FEATURES),
        "norm": norm,
        "dropout": 0.0,
    }


def tiny_unet(
    norm, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, seed: int = 0
):
    """A real MONAI BasicUNet with few features (tile sides must be multiples of 16)."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=TINY_FEATURES,
        norm=norm,
        dropout=0.0,
    )


def calibrate(model: torch.nn.Module, shape, steps: int = 3, seed: int = 1) -> torch.nn.Module:
    """Give running statistics values unlike any one tile's (as small-batch training does)."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for step in range(steps):
            x = torch.randn((1, *shape), generator=generator) * (1 + step) + step
            model(x)
    return model.eval()


def synthetic_volume(shape=(20, 40, 44), seed: int = 0) -> np.ndarray:
    """Smooth-ish structure with a dark half, so tiles differ in statistics."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    z, y, x = np.meshgrid(*[np.linspace(0, 3 * np.pi, s) for s in shape], indexing="ij")
    volume += 2 * np.sin(y) * np.cos(x) + np.sin(z)
    volume[:, :, : shape[2] // 3] *= 0.1
    return volume


@pytest.fixture
def batchnorm_unet():
    return calibrate(tiny_unet("batch"), (1, 16, 32, 32))


@pytest.fixture
def isbi_crop():
    if not ISBI_RAW.exists():
        pytest.skip("shared ISBI data not available")
    import tifffile

    return tifffile.imread(ISBI_RAW)[:20, 100:160, 200:264]
