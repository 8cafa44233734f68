"""The normalization inventory of real MONAI networks, eager and TorchScript."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import MedNeXt, UNet
from torch import nn

from napari_normcheck.core.models.inventory import norm_inventory
from napari_normcheck.core.models.models import load_model
from tests.conftest import calibrate, tiny_unet

# Building TorchScript test files is deprecated API; the loader must still read such files.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning")


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_batchnorm_unet():
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    inventory = norm_inventory(model)
    assert len(inventory.layers) == count(model, nn.BatchNorm3d) == 18
    assert inventory.n_switching == 18
    first = inventory.layers[0]
    assert (first.name, first.type) == ("conv_0.conv_0.adn.N", "BatchNorm3d")
    assert first.running_stats and first.affine
    assert (first.momentum, first.eps, first.num_batches_tracked, first.num_features) == (
        0.1,
        1e-5,
        3,
        4,
    )
    assert inventory.verdict.startswith("18 layers use running statistics in eval")
    assert "disparity is possible" in inventory.verdict


def test_instance_norm_with_running_stats_switches():
    inventory = norm_inventory(tiny_unet(("instance", {"track_running_stats": True})))
    assert {layer.type for layer in inventory.layers} == {"InstanceNorm3d"}
    assert inventory.n_switching == len(inventory.layers) == 18
    assert not inventory.layers[0].affine and inventory.layers[0].num_batches_tracked == 0


@pytest.mark.parametrize(
    "norm, kind, affine",
    [("instance", "InstanceNorm3d", False), (("group", {"num_groups": 2}), "GroupNorm", True)],
)
def test_per_sample_norms_do_not_switch(norm, kind, affine):
    model = tiny_unet(norm)
    inventory = norm_inventory(model)
    assert len(inventory.layers) == 18
    assert {layer.type for layer in inventory.layers} == {kind}
    assert inventory.n_switching == 0
    assert all(
        layer.affine == affine and layer.num_batches_tracked is None for layer in inventory.layers
    )
    assert [layer.num_features for layer in inventory.layers[:3]] == [4, 4, 4]
    assert inventory.verdict.startswith("No layer keeps running statistics")
    assert "check tile mismatch" in inventory.verdict


def test_monai_unet_batch_norm_matches_an_independent_count():
    model = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), norm="batch", num_res_units=1)
    inventory = norm_inventory(model)
    assert inventory.n_switching == count(model, nn.BatchNorm3d) > 0
    names = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm3d)}
    assert {layer.name for layer in inventory.layers} == names


def test_layer_norm_mednext():
    model = MedNeXt(
        spatial_dims=3,
        init_filters=4,
        in_channels=1,
        out_channels=2,
        norm_type="layer",
        blocks_down=(1, 1, 1, 1),
        blocks_bottleneck=1,
        blocks_up=(1, 1, 1, 1),
        kernel_size=3,
    )
    inventory = norm_inventory(model)
    assert len(inventory.layers) == count(model, nn.LayerNorm) > 0
    assert {layer.type for layer in inventory.layers} == {"LayerNorm"}
    # MedNeXt normalizes over (channels, k, k, k): the first stage has 4 channels, k = 3.
    assert inventory.layers[0].num_features == 4 * 27
    assert all(not layer.running_stats and layer.momentum is None for layer in inventory.layers)
    assert inventory.n_switching == 0 and "No layer keeps running statistics" in inventory.verdict


def test_sync_and_subclassed_batch_norm():
    class BatchRenorm3d(nn.BatchNorm3d):
        pass

    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_unet("batch"))
    model.conv_0.conv_0.adn.N = BatchRenorm3d(4, momentum=None)
    inventory = norm_inventory(model)
    assert inventory.layers[0].type == "BatchRenorm3d" and inventory.layers[0].momentum is None
    assert {layer.type for layer in inventory.layers[1:]} == {"SyncBatchNorm"}
    assert inventory.n_switching == 18


def test_torchscript_inventory(tmp_path):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    eager = norm_inventory(model)
    assert norm_inventory(torch.jit.script(model)).to_dict() == eager.to_dict()
    image = torch.randn(1, 1, 16, 32, 32)
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(model, image, check_trace=False)
    path = tmp_path / "traced.pt"
    torch.jit.save(traced, str(path))
    inventory = norm_inventory(load_model(path))
    assert [layer.name for layer in inventory.layers] == [layer.name for layer in eager.layers]
    assert inventory.n_switching == 18
    # Tracing keeps buffers and parameters but no attributes.
    assert inventory.layers[0].eps is None and inventory.layers[0].num_batches_tracked == 3
    assert inventory.layers[0].num_features == 4 and inventory.layers[0].affine


def test_torchscript_instance_norm_without_running_stats():
    inventory = norm_inventory(torch.jit.script(tiny_unet("instance")))
    assert len(inventory.layers) == 18 and inventory.n_switching == 0


def test_dropout_is_listed_and_mentioned():
    from monai.networks.nets import BasicUNet

    model = BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4), norm="batch", dropout=0.2)
    inventory = norm_inventory(model)
    assert len(inventory.active_dropout) == len(inventory.dropout) == count(model, nn.Dropout)
    assert "dropout" in inventory.verdict and "both passes" in inventory.verdict
    silent = norm_inventory(tiny_unet("batch"))
    assert silent.dropout and not silent.active_dropout
    assert "dropout" not in silent.verdict


def test_model_without_normalization():
    inventory = norm_inventory(nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU()))
    assert inventory.layers == [] and inventory.n_switching == 0
    assert inventory.verdict.startswith("No normalization layers")
    assert "(no normalization layers)" in inventory.format_table()


def test_table_and_dict():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        nn.LayerNorm([4, 8, 8]),
    )
    inventory = norm_inventory(model)
    table = inventory.format_table().splitlines()
    assert table[0].split() == [
        "name",
        "type",
        "running",
        "stats",
        "momentum",
        "eps",
        "affine",
        "batches",
        "tracked",
    ]
    rows = table[2:5]
    assert [row.split()[:3] for row in rows] == [
        ["1", "BatchNorm2d", "yes"],
        ["2", "GroupNorm", "no"],
        ["3", "LayerNorm", "no"],
    ]
    # Aligned columns: "type" starts at the same offset in every line.
    offset = table[0].index("type")
    assert all(row[offset - 2 : offset] == "  " and row[offset] != " " for row in rows)
    assert table[-1] == inventory.verdict
    data = json.loads(json.dumps(inventory.to_dict()))
    assert data["n_switching"] == 1 and data["layers"][2]["num_features"] == 256
    assert data["layers"][1]["momentum"] is None and data["verdict"] == inventory.verdict


# --- readable names ------------------------------------------------------------------------------


def test_readable_names_of_a_monai_basic_unet():
    from napari_normcheck.core.models.inventory import readable_layer_name

    model = tiny_unet("batch")
    names = {name: module for name, module in model.named_modules()}
    assert readable_layer_name("down_1.convs.conv_0.adn.N", names["down_1.convs.conv_0.adn.N"]) == (
        "BatchNorm3d, encoder 1, conv 0"
    )
    assert readable_layer_name("conv_0.conv_1.adn.N", "BatchNorm3d") == (
        "BatchNorm3d, encoder 0, conv 1"
    )
    assert readable_layer_name("upcat_4.convs.conv_1.adn.N", "BatchNorm3d") == (
        "BatchNorm3d, decoder 4, conv 1"
    )
    # Every norm layer of the network gets its own text.
    layers = norm_inventory(model).layers
    texts = {readable_layer_name(layer.name, layer.type) for layer in layers}
    assert len(texts) == len(layers) == 18


def test_readable_names_of_a_monai_unet_by_depth():
    from napari_normcheck.core.models.inventory import readable_layer_name

    model = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")
    texts = [readable_layer_name(layer.name, layer.type) for layer in norm_inventory(model).layers]
    assert texts[0] == "BatchNorm3d, encoder 0, conv 0"
    assert "BatchNorm3d, encoder 1, conv 0" in texts
    assert "BatchNorm3d, bottleneck, conv 0" in texts
    assert any(text.startswith("BatchNorm3d, decoder 1") for text in texts)
    assert texts[-1].startswith("BatchNorm3d, decoder 0")


@pytest.mark.parametrize(
    ("path", "kind", "expected"),
    [
        # nnU-Net (dynamic_network_architectures PlainConvUNet / ResidualEncoderUNet)
        (
            "encoder.stages.1.0.convs.1.norm",
            "InstanceNorm3d",
            "InstanceNorm3d, encoder 1, block 0, conv 1",
        ),
        ("decoder.stages.2.convs.0.norm", "InstanceNorm3d", "InstanceNorm3d, decoder 2, conv 0"),
        ("encoder.stem.convs.0.norm", "BatchNorm3d", "BatchNorm3d, input block, conv 0"),
        # pytorch-3dunet
        (
            "encoders.1.basic_module.SingleConv1.groupnorm",
            "GroupNorm",
            "GroupNorm, encoder 1, conv 1",
        ),
        (
            "decoders.0.basic_module.SingleConv2.batchnorm",
            "BatchNorm3d",
            "BatchNorm3d, decoder 0, conv 2",
        ),
        # MONAI DynUNet
        ("bottleneck.norm2", "BatchNorm3d", "BatchNorm3d, bottleneck, conv 2"),
        ("upsamples.0.conv_block.norm1", "BatchNorm3d", "BatchNorm3d, decoder 0, conv 1"),
        # unknown networks: the type and the path without the norm's own name
        ("layer1.0.bn1", "BatchNorm2d", "BatchNorm2d in layer1.0"),
        ("features.3", "BatchNorm2d", "BatchNorm2d in features.3"),
        ("", "BatchNorm3d", "BatchNorm3d (the model)"),
        ("down_2.convs.conv_0.adn.N", None, "norm layer, encoder 2, conv 0"),
    ],
)
def test_readable_names_of_other_networks(path, kind, expected):
    from napari_normcheck.core.models.inventory import readable_layer_name

    assert readable_layer_name(path, kind) == expected


def test_readable_name_of_a_scripted_layer():
    from napari_normcheck.core.models.inventory import readable_layer_name

    scripted = torch.jit.script(nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)))
    assert readable_layer_name("down_3.1", scripted[1]) == "BatchNorm3d, encoder 3"
