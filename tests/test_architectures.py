"""The field's usual U-Nets, as a user brings them: inspect, run, and MONAI's sliding window.

MONAI's BasicUNet, UNet, DynUNet (deep supervision), SegResNet and SwinUNETR (LayerNorm and
InstanceNorm: no running statistics), and nnU-Net's PlainConvUNet (dynamic-network-architectures)
with anisotropic strides, from an nnU-Net-like checkpoint and a network file that builds it from
the plan's class names. Each: ``inspect`` exits 0 with the right inventory, ``run`` exits 0, both
predictions equal ``sliding_window_inference`` of the same model (eval, and a copy with batch
statistics) to 1e-5, and the loaded model's state_dict is bitwise what the file holds.
"""

from __future__ import annotations

import copy
import json
import textwrap

import numpy as np
import pytest
import torch
import zarr
from monai.inferers import sliding_window_inference

import napari_normcheck.cli as cli
import napari_normcheck.cli.model_args as cli_model
from napari_normcheck.core.base.modes import has_running_stats
from tests.conftest import synthetic_volume

NNUNET_BUILDER = """
import pydoc
from dynamic_network_architectures.architectures.unet import PlainConvUNet


def build(**plan):
    # nnU-Net's plans name classes as strings; its own loader locates them the same way.
    for key in ("conv_op", "norm_op", "nonlin", "dropout_op"):
        if isinstance(plan.get(key), str):
            plan[key] = pydoc.locate(plan[key])
    return PlainConvUNet(**plan)
"""

NNUNET_PLAN = {
    "input_channels": 1,
    "n_stages": 4,
    "features_per_stage": [4, 8, 8, 16],
    "conv_op": "torch.nn.Conv3d",
    "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [1, 1, 1, 1],
    "num_classes": 2,
    "n_conv_per_stage_decoder": [1, 1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
    "deep_supervision": True,
}

# name: (arch, kwargs, volume shape, tile, divisor, norm type in the inventory, switching layers)
CASES = {
    "BasicUNet": (
        "monai.networks.nets.BasicUNet",
        {"spatial_dims": 3, "features": [4, 4, 8, 8, 16, 4], "norm": "batch"},
        (16, 40, 40),
        (16, 32, 32),
        (16, 16, 16),
        "BatchNorm3d",
        True,
    ),
    "UNet": (
        "monai.networks.nets:UNet",
        {"spatial_dims": 3, "channels": [4, 8, 16], "strides": [[1, 2, 2], 2], "norm": "batch"},
        (8, 24, 24),
        (8, 16, 16),
        (2, 4, 4),
        "BatchNorm3d",
        True,
    ),
    "DynUNet": (
        "DynUNet",
        {
            "spatial_dims": 3,
            "kernel_size": [3, 3, 3],
            "strides": [1, [1, 2, 2], 2],
            "upsample_kernel_size": [[1, 2, 2], 2],
            "filters": [4, 8, 16],
            "norm_name": "batch",
            "deep_supervision": True,
            "deep_supr_num": 1,
        },
        (8, 24, 24),
        (8, 16, 16),
        (2, 4, 4),
        "BatchNorm3d",
        True,
    ),
    "SegResNet": (
        "monai.networks.nets.SegResNet",
        {
            "spatial_dims": 3,
            "init_filters": 4,
            "blocks_down": [1, 1, 1],
            "blocks_up": [1, 1],
            "norm": "batch",
        },
        (8, 24, 24),
        (8, 16, 16),
        (4, 4, 4),
        "BatchNorm3d",
        True,
    ),
    "SwinUNETR": (
        "monai.networks.nets.SwinUNETR",
        {
            "spatial_dims": 2,  # 2D: a 3D SwinUNETR needs 64³ forwards (InstanceNorm refuses 32³'s
            "feature_size": 12,  # one-voxel bottleneck), too slow for the suite
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 1, 1],
            "window_size": 4,
        },
        (64, 96),
        (1, 64, 64),  # 32 x 32 would leave a 1 x 1 bottleneck, which InstanceNorm refuses
        (32, 32),
        "LayerNorm",
        False,
    ),
    "PlainConvUNet": (
        None,
        NNUNET_PLAN,
        (8, 24, 24),
        (8, 16, 16),
        (2, 8, 8),
        "InstanceNorm3d",
        False,
    ),
}


def _build(name, tmp_path):
    arch, kwargs = CASES[name][:2]
    if name == "PlainConvUNet":
        (tmp_path / "nnunet_net.py").write_text(NNUNET_BUILDER)
        arch = f"{tmp_path / 'nnunet_net.py'}:build"
    elif name != "DynUNet":
        kwargs = {**kwargs, "in_channels": 1, "out_channels": 2}
    else:
        kwargs = {**kwargs, "in_channels": 1, "out_channels": 2}
    factory = cli_resolve(arch)
    torch.manual_seed(0)
    model = factory(**kwargs)
    # Running statistics unlike any one tile's, as small-batch training leaves them.
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(2):
            tile = CASES[name][3][3 - len(CASES[name][4]) :]
            model(torch.randn((1, 1, *tile), generator=generator) * (1 + step) + step)
    return model.eval(), arch, kwargs


def cli_resolve(arch):
    from napari_normcheck.core.models.models import resolve_callable

    return resolve_callable(arch)


def reference(model, volume, tile):
    """MONAI's sliding window, eval and with batch statistics, on the full-resolution head."""
    x = torch.from_numpy(volume)[None, None]
    if volume.ndim == 2:
        tile = tile[1:]
    eval_model = copy.deepcopy(model).eval()
    train_model = copy.deepcopy(model).eval()
    for module in train_model.modules():
        if has_running_stats(module):
            module.train()
            module.momentum = 0.0

    def head(net):
        def predict(batch):
            out = net(batch)
            return out[0] if isinstance(out, list | tuple) else out

        return predict

    with torch.no_grad():
        expected = [
            sliding_window_inference(x, tile, 1, head(net), 0.25, "gaussian")[0].numpy()
            for net in (eval_model, train_model)
        ]
    return expected


@pytest.mark.parametrize("name", list(CASES))
def test_architecture(name, tmp_path, capsys, monkeypatch):
    if name == "PlainConvUNet":
        pytest.importorskip("dynamic_network_architectures.architectures.unet")
    model, arch, kwargs = _build(name, tmp_path)
    _, _, shape, tile, divisor, norm_type, switching = CASES[name]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if name == "PlainConvUNet":  # as nnU-Net v2 saves checkpoint_final.pth
        checkpoint = {"network_weights": state, "current_epoch": 1000, "init_args": {"fold": 0}}
    else:
        checkpoint = state
    torch.save(checkpoint, tmp_path / "model.pt")
    model_args = ["--arch", arch, "--arch-kwargs", json.dumps(kwargs)]

    assert cli.main(["inspect", str(tmp_path / "model.pt"), *model_args]) == 0
    printed = capsys.readouterr().out
    n_norm = sum(type(m).__name__ == norm_type for m in model.modules())
    assert printed.count(f" {norm_type} ") == n_norm > 0
    n_switching = sum(has_running_stats(m) for m in model.modules())
    assert (n_switching > 0) == switching
    if switching:
        assert f"{n_switching} layers use running statistics" in printed
    else:
        assert "No layer keeps running statistics" in printed
    names = ("z", "y", "x")[3 - len(divisor) :]
    assert (
        "tile sides: " + ", ".join(f"{a} a multiple of {d}" for a, d in zip(names, divisor))
        in printed
    )

    volume = synthetic_volume(shape) if len(shape) == 3 else synthetic_volume((1, *shape))[0]
    np.save(tmp_path / "volume.npy", volume)
    loaded_models = []
    real_load = cli_model.load_model_from_args

    def keep(*args, **kwargs):
        loaded_models.append(real_load(*args, **kwargs))
        return loaded_models[-1]

    monkeypatch.setattr(cli_model, "load_model_from_args", keep)
    run = ["run", str(tmp_path / "volume.npy"), "--model", str(tmp_path / "model.pt"), *model_args]
    tiling = ["--tile", ",".join(map(str, tile)), "--overlap", "0.25", "--blend", "gaussian"]
    out = tmp_path / "out.zarr"
    assert cli.main([*run, *tiling, "--out", str(out), "--output-dtype", "float32"]) == 0
    root = zarr.open_group(str(out), mode="r")
    expected_eval, expected_train = reference(model, volume, tile)
    predictions = [root[f"pred_{mode}/0"][:] for mode in ("eval", "train")]
    if volume.ndim == 2:
        predictions = [p[:, 0] for p in predictions]
    np.testing.assert_allclose(predictions[0], expected_eval, atol=1e-5, rtol=0)
    np.testing.assert_allclose(predictions[1], expected_train, atol=1e-5, rtol=0)
    after = loaded_models[0].module.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_nnunet_builder_file_is_what_users_have(tmp_path):
    pytest.importorskip("dynamic_network_architectures.architectures.unet")
    (tmp_path / "nnunet_net.py").write_text(textwrap.dedent(NNUNET_BUILDER))
    net = cli_resolve(f"{tmp_path / 'nnunet_net.py'}:build")(**NNUNET_PLAN)
    outputs = net(torch.zeros(1, 1, 8, 16, 16))
    assert isinstance(outputs, list) and outputs[0].shape == (1, 2, 8, 16, 16)
