"""Fixtures of the widget tests: a tiny real MONAI BasicUNet saved as a state_dict, small images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ARCH = "monai.networks.nets.BasicUNet"
ARCH_KWARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "features": [4, 4, 8, 8, 16, 4],
    "norm": "batch",
}


@pytest.fixture
def tiny_model_file(tmp_path):
    """A BatchNorm BasicUNet with running statistics unlike any tile's, as a state_dict file."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    model = BasicUNet(**ARCH_KWARGS)
    generator = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for step in range(2):
            model(torch.randn((1, 1, 16, 32, 32), generator=generator) * (1 + step) + step)
    path = tmp_path / "tiny_unet.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def small_image():
    """A seeded float volume (16, 48, 48) with a dark third, so tiles differ in statistics."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 1.0, size=(16, 48, 48)).astype(np.float32)
    volume[:, :, :16] *= 0.1
    return volume


def fill_model(widget, model_file) -> None:
    """Point the widget's model fields at the tiny model."""
    widget.model_path.setText(str(model_file))
    widget.arch.setText(ARCH)
    widget.arch_kwargs.setText(json.dumps(ARCH_KWARGS))


@pytest.fixture
def errors(monkeypatch):
    """The messages the widget shows as error notifications, instead of showing them."""
    from napari_normcheck._qt import widget as widget_module

    shown = []
    monkeypatch.setattr(widget_module, "_show_error", shown.append)
    return shown
