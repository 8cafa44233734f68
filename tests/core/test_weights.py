"""Weight files as users have them: Lightning checkpoints, safetensors, prefixes, network packages."""

from __future__ import annotations

import argparse
import sys
import textwrap

import pytest
import torch

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models.models import load_model
from tests.conftest import TINY_UNET_ARCH, calibrate, tiny_unet, tiny_unet_kwargs


class TrainingConfig:
    """Stands for a Lightning module's hyper-parameter object (a class only the trainer has)."""

    def __init__(self):
        self.learning_rate = 0.1

    def __reduce__(self):
        # Unpickling this would run code: the loader must never call it.
        return (sys.exit, (3,))


@pytest.fixture(scope="module")
def unet():
    return calibrate(tiny_unet("batch"), (1, 16, 32, 32))


def assert_same_state(module, reference):
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_lightning_checkpoint_loads_without_running_its_objects(tmp_path, unet):
    checkpoint = {
        "epoch": 12,
        "global_step": 340,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"net.{k}": v for k, v in unet.state_dict().items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "hyper_parameters": {"config": TrainingConfig(), "args": argparse.Namespace(depth=4)},
    }
    path = tmp_path / "epoch=12.ckpt"
    torch.save(checkpoint, path)
    loaded = load_model(path, arch=TINY_UNET_ARCH, arch_kwargs=tiny_unet_kwargs())
    assert_same_state(loaded.module, unet)
    assert any("skipped without running" in note and "sys.exit" in note for note in loaded.notes)
    assert any("'net.'" in note for note in loaded.notes)


def test_whole_pickled_model_still_needs_trust(tmp_path, unet):
    torch.save({"model": unet, "config": TrainingConfig()}, tmp_path / "whole.ckpt")
    with pytest.raises(NormcheckError, match="--trust-pickle"):
        load_model(tmp_path / "whole.ckpt", arch=TINY_UNET_ARCH, arch_kwargs=tiny_unet_kwargs())


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.bin"])
def test_safetensors(tmp_path, unet, name):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in unet.state_dict().items()}, path)
    loaded = load_model(path, arch=TINY_UNET_ARCH, arch_kwargs=tiny_unet_kwargs())
    assert loaded.format == "state_dict"
    assert_same_state(loaded.module, unet)


def test_network_file_inside_a_package_with_relative_imports(tmp_path):
    package = tmp_path / "mylab" / "nets"
    package.mkdir(parents=True)
    (tmp_path / "mylab" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "blocks.py").write_text(
        textwrap.dedent("""
        from torch import nn
        def conv(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))
        """)
    )
    (package / "unet.py").write_text(
        textwrap.dedent("""
        from torch import nn
        from .blocks import conv
        class Net(nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.body = conv(1, width)
                self.head = nn.Conv2d(width, 2, 1)
            def forward(self, x):
                return self.head(self.body(x))
        """)
    )
    arch = f"{package / 'unet.py'}:Net"
    from napari_normcheck.core.models.models import resolve_callable

    net = resolve_callable(arch)(width=4)
    torch.save({"model": net.state_dict()}, tmp_path / "net.pt")
    loaded = load_model(tmp_path / "net.pt", arch=arch, arch_kwargs={"width": 4})
    assert type(loaded.module).__module__ == "mylab.nets.unet"
    assert loaded.info.out_channels == 2 and loaded.info.divisor == (1, 1)
