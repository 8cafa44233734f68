"""Model loading from real files in every format, and probing, with real MONAI networks."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import normalization_mode
from napari_normcheck.core.models.models import (
    file_sha256,
    load_model,
    parse_kwargs,
    probe_model,
    resolve_callable,
)
from tests.conftest import calibrate, tiny_unet

# Building TorchScript test files is deprecated API; the loader must still read such files.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning")

ARCH = "monai.networks.nets:BasicUNet"
KWARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "features": [4, 4, 8, 8, 16, 4],
    "norm": "batch",
    "dropout": 0.0,
}


@pytest.fixture(scope="module")
def bn_unet():
    return calibrate(tiny_unet("batch"), (1, 16, 32, 32))


@pytest.fixture(scope="module")
def image():
    return torch.randn((1, 1, 16, 32, 32), generator=torch.Generator().manual_seed(3)) * 2 + 1


def predict(module, image, mode="eval"):
    with torch.inference_mode(), normalization_mode(module, mode):
        return module(image)


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class Heads(nn.Module):
    """Two prediction heads returned as a dict (module level, so it can be pickled)."""

    def __init__(self):
        super().__init__()
        self.unet = tiny_unet("batch", spatial_dims=2, out_channels=3)

    def forward(self, x):
        y = self.unet(x)
        return {"seg": y, "boundary": y[:, :1]}


def trace(model, image):
    with pytest.warns(torch.jit.TracerWarning):  # BasicUNet's shape check becomes a constant
        return torch.jit.trace(model, image, check_trace=False)


def save(obj, path):
    torch.save(obj, path)
    return path


# --- state_dict checkpoints --------------------------------------------------------------------


def test_state_dict_loads(tmp_path, bn_unet, image):
    path = save(bn_unet.state_dict(), tmp_path / "weights.pt")
    loaded = load_model(path, arch=ARCH, arch_kwargs=json.dumps(KWARGS))
    assert loaded.format == "state_dict"
    assert loaded.switchable and loaded.not_switchable_reason is None
    assert loaded.sha256 == file_sha256(path)
    assert not loaded.module.training
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in loaded.module.state_dict().items())
    assert torch.equal(predict(loaded.module, image), predict(bn_unet, image))
    assert loaded.info.in_channels == 1 and loaded.info.out_channels == 2
    assert loaded.to_dict()["arch_kwargs"] == KWARGS


@pytest.mark.parametrize(
    "spec",
    [
        ARCH,
        "monai.networks.nets.BasicUNet",
        "BasicUNet",
        "monai.networks.nets.basic_unet:BasicUNet",
    ],
)
def test_arch_spec_forms(spec):
    assert resolve_callable(spec) is BasicUNet


@pytest.mark.parametrize(
    "key, prefix",
    [("state_dict", "model."), ("model", "module."), ("model_state_dict", ""), ("net", "module.")],
)
def test_nested_and_prefixed_state_dicts_load(tmp_path, bn_unet, key, prefix):
    state = {f"{prefix}{k}": v for k, v in bn_unet.state_dict().items()}
    path = save({key: state, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    loaded = load_model(path, arch=ARCH, arch_kwargs=KWARGS)
    assert_same_state(loaded.module, bn_unet)
    assert any(key in note for note in loaded.notes)
    assert any(repr(prefix) in note for note in loaded.notes) == bool(prefix)


def test_lightning_prefix_is_stripped_only_when_it_is_a_wrapper(tmp_path):
    # MONAI's UNet keys start with "model." themselves: a plain state_dict must keep them.
    torch.manual_seed(0)
    unet = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), norm="batch").eval()
    kwargs = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "norm": "batch",
    }
    plain = load_model(
        save(unet.state_dict(), tmp_path / "plain.pt"),
        arch="monai.networks.nets:UNet",
        arch_kwargs=kwargs,
    )
    assert_same_state(plain.module, unet)
    assert not any("prefix" in note for note in plain.notes)
    lightning = {f"model.{k}": v for k, v in unet.state_dict().items()}
    lightning["loss_fn.weight"] = torch.ones(2)
    wrapped = load_model(
        save({"state_dict": lightning}, tmp_path / "pl.ckpt"),
        arch="monai.networks.nets:UNet",
        arch_kwargs=kwargs,
    )
    assert_same_state(wrapped.module, unet)
    assert any("'model.'" in note and "loss_fn.weight" in note for note in wrapped.notes)


def test_state_dict_without_arch_asks_for_it(tmp_path, bn_unet):
    path = save(bn_unet.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(NormcheckError, match="--arch"):
        load_model(path)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path, bn_unet):
    path = save(bn_unet.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(NormcheckError) as error:
        load_model(
            path,
            arch="monai.networks.nets:UNet",
            arch_kwargs={
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [4, 8],
                "strides": [2],
            },
        )
    message = str(error.value)
    assert "missing" in message and "model.0.conv" in message
    assert "unexpected" in message and "conv_0.conv_0.conv.weight" in message
    assert "\n" not in message


def test_shape_mismatch_names_keys_and_shapes(tmp_path, bn_unet):
    path = save(bn_unet.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(
        NormcheckError, match=r"shape mismatch.*\(4, 1, 3, 3, 3\) vs \(4, 2, 3, 3, 3\)"
    ):
        load_model(path, arch=ARCH, arch_kwargs={**KWARGS, "in_channels": 2})


def test_bad_arch_kwargs_are_reported(tmp_path, bn_unet):
    path = save(bn_unet.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(NormcheckError, match="no_such_argument"):
        load_model(path, arch=ARCH, arch_kwargs={**KWARGS, "no_such_argument": 1})


def test_user_network_file(tmp_path, image):
    (tmp_path / "blocks.py").write_text(
        textwrap.dedent("""
        from torch import nn
        def conv(cin, cout):
            return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU())
    """)
    )
    (tmp_path / "net.py").write_text(
        textwrap.dedent("""
        from torch import nn
        from blocks import conv
        class Net(nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.encode = conv(1, width)
                self.down = nn.MaxPool3d(2)
                self.middle = conv(width, width)
                self.up = nn.Upsample(scale_factor=2)
                self.head = nn.Conv3d(2 * width, 3, 1)
            def forward(self, x):
                skip = self.encode(x)
                return self.head(__import__("torch").cat([skip, self.up(self.middle(self.down(skip)))], 1))
    """)
    )
    net = resolve_callable(f"{tmp_path / 'net.py'}:Net")(width=4)
    calibrate(net, (1, 16, 32, 32))
    path = save(net.state_dict(), tmp_path / "net.pt")
    loaded = load_model(path, arch=f"{tmp_path / 'net.py'}:Net", arch_kwargs='{"width": 4}')
    assert torch.equal(predict(loaded.module, image), predict(net, image))
    assert loaded.info.out_channels == 3
    assert loaded.info.divisor == (2, 2, 2)


# --- TorchScript ------------------------------------------------------------------------------


def test_scripted_torchscript_is_switchable(tmp_path, bn_unet, image):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(bn_unet), str(path))
    loaded = load_model(path)
    assert loaded.format == "torchscript"
    assert loaded.switchable and loaded.not_switchable_reason is None
    assert torch.equal(predict(loaded.module, image), predict(bn_unet, image))
    assert loaded.info.divisor == (16, 16, 16)
    assert loaded.info.in_channels == 1 and loaded.info.out_channels == 2


def test_normalization_mode_switches_a_scripted_model(bn_unet, image):
    scripted = torch.jit.script(bn_unet)
    torch.testing.assert_close(predict(scripted, image, "train"), predict(bn_unet, image, "train"))


def test_traced_batchnorm_torchscript_is_not_switchable(tmp_path, bn_unet, image):
    path = tmp_path / "traced.pt"
    torch.jit.save(trace(bn_unet, image), str(path))
    loaded = load_model(path)
    assert loaded.format == "torchscript"
    assert not loaded.switchable
    assert "torch.jit.trace" in loaded.not_switchable_reason
    assert "torch.jit.script" in loaded.not_switchable_reason
    assert "--arch" in loaded.not_switchable_reason
    # The traced graph really ignores the training flag: eval and train passes agree.
    loaded.module.train()
    with torch.inference_mode():
        assert torch.equal(loaded.module(image), predict(bn_unet, image))
    loaded.module.eval()


def test_traced_model_without_running_stats_is_switchable(tmp_path, image):
    model = tiny_unet("instance").eval()
    path = tmp_path / "traced_instance.pt"
    torch.jit.save(trace(model, torch.randn(1, 1, 32, 32, 32)), str(path))
    assert load_model(path).switchable


def test_frozen_torchscript_is_not_switchable(tmp_path, bn_unet):
    path = tmp_path / "frozen.pt"
    torch.jit.save(torch.jit.freeze(torch.jit.script(bn_unet.eval())), str(path))
    loaded = load_model(path)
    assert not loaded.switchable and "torch.jit.freeze" in loaded.not_switchable_reason
    assert loaded.info.in_channels == 1 and loaded.info.divisor == (16, 16, 16)


def test_model_traced_in_train_mode_keeps_its_buffers(tmp_path, image):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32)).train()
    path = tmp_path / "traced_train.pt"
    traced = trace(model, image)
    with torch.no_grad():
        for name, buffer in model.state_dict().items():
            traced.state_dict()[name].copy_(buffer)
    torch.jit.save(traced, str(path))
    reloaded = torch.jit.load(str(path))
    loaded = load_model(path)
    assert not loaded.switchable and "train-mode" in loaded.not_switchable_reason
    assert_same_state(loaded.module, reloaded)
    assert any("buffers" in note for note in loaded.notes)


# --- pickled modules ----------------------------------------------------------------------------


def test_untrusted_pickle_is_refused(tmp_path, bn_unet):
    path = save(bn_unet, tmp_path / "whole.pt")
    with pytest.raises(NormcheckError, match="--trust-pickle") as error:
        load_model(path)
    assert "BasicUNet" in str(error.value) and "runs code" in str(error.value)


@pytest.mark.parametrize("wrap", [False, True])
def test_trusted_pickle_loads(tmp_path, bn_unet, image, wrap):
    path = save({"model": bn_unet, "epoch": 3} if wrap else bn_unet, tmp_path / "whole.pt")
    loaded = load_model(path, trust_pickle=True, arch=ARCH)
    assert loaded.format == "pickle" and loaded.switchable
    assert torch.equal(predict(loaded.module, image), predict(bn_unet, image))
    assert any("--arch" in note and "ignored" in note for note in loaded.notes)


# --- bad files ------------------------------------------------------------------------------------


def test_missing_and_corrupt_files_are_named(tmp_path, bn_unet):
    with pytest.raises(NormcheckError, match="nothing.pt not found"):
        load_model(tmp_path / "nothing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 20)
    with pytest.raises(NormcheckError, match="garbage.pt.*corrupt"):
        load_model(garbage, arch=ARCH)
    full = save(bn_unet.state_dict(), tmp_path / "full.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(NormcheckError, match="cut.pt.*corrupt"):
        load_model(cut, arch=ARCH)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(NormcheckError, match="empty.pt"):
        load_model(empty, arch=ARCH)


# --- callables and keyword arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, words",
    [
        ("monai.networks.nets:NoSuchNet", "NoSuchNet"),
        ("monai.networks.nets.NoSuchNet", "NoSuchNet"),
        ("no_such_package_xyz.nets:Net", "no_such_package_xyz"),
        ("NoSuchNetAnywhere", "NoSuchNetAnywhere"),
        ("missing/net.py:Net", "not found"),
    ],
)
def test_unknown_callables_are_errors(spec, words):
    with pytest.raises(NormcheckError, match=words):
        resolve_callable(spec)


def test_broken_user_file_is_reported(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_for_normcheck\n")
    with pytest.raises(NormcheckError, match="no_such_module_for_normcheck"):
        resolve_callable(f"{tmp_path / 'broken.py'}:Net")


def test_parse_kwargs_forms(tmp_path):
    assert parse_kwargs(None) == {} and parse_kwargs("") == {}
    assert parse_kwargs({"a": 1}) == {"a": 1}
    assert parse_kwargs('{"features": [4, 8], "norm": ["group", {"num_groups": 2}]}') == {
        "features": [4, 8],
        "norm": ["group", {"num_groups": 2}],
    }
    file = tmp_path / "kwargs.json"
    file.write_text(json.dumps(KWARGS))
    assert parse_kwargs(f"@{file}") == KWARGS


def test_parse_kwargs_errors(tmp_path):
    with pytest.raises(NormcheckError, match=r"not valid JSON.*line 1 column 9 \(char 8\)"):
        parse_kwargs('{"a": 1,}')
    with pytest.raises(NormcheckError, match="JSON object"):
        parse_kwargs("[1, 2]")
    with pytest.raises(NormcheckError, match="absent.json not found"):
        parse_kwargs(f"@{tmp_path / 'absent.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": tru\n}')
    with pytest.raises(NormcheckError, match=r"bad.json is not valid JSON.*line 2"):
        parse_kwargs(f"@{bad}")


# --- probing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_probe_basic_unet(spatial_dims):
    model = tiny_unet("batch", spatial_dims=spatial_dims, in_channels=3, out_channels=5)
    info = probe_model(model)
    assert info.spatial_dims == spatial_dims
    assert (info.in_channels, info.out_channels) == (3, 5)
    assert info.divisor == (16,) * spatial_dims
    assert info.n_parameters == sum(p.numel() for p in model.parameters())


def test_probe_basic_unet_with_instance_norm_needs_larger_input():
    # Instance norm fails on the 1-voxel bottleneck of a 16³ input; the probe must look further.
    assert probe_model(tiny_unet("instance")).divisor == (16, 16, 16)


@pytest.mark.parametrize(
    "strides, divisor", [((2, 2), (4, 4, 4)), (((1, 2, 2), (2, 2, 2)), (2, 4, 4))]
)
def test_probe_unet_strides(strides, divisor):
    model = UNet(3, 2, 3, channels=(4, 8, 16), strides=strides, norm="batch")
    info = probe_model(model)
    assert (info.spatial_dims, info.in_channels, info.out_channels) == (3, 2, 3)
    assert info.divisor == divisor


def test_probe_finds_downsampling_it_cannot_see():
    class SliceNet(nn.Module):
        """Downsamples by strided slicing, which no strided op reveals."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            x = self.conv(x)
            low = nn.functional.interpolate(x[..., ::2, ::2], scale_factor=2)
            return x + low

    model = SliceNet()
    assert probe_model(model).divisor == (2, 2)
    with pytest.raises(NormcheckError, match="--in-channels"):
        probe_model(model, in_channels=3)


def test_probe_takes_first_tensor_of_dict_output(tmp_path):
    path = save(Heads(), tmp_path / "heads.pt")
    loaded = load_model(path, trust_pickle=True)
    assert loaded.info.out_channels == 3 and loaded.info.spatial_dims == 2
    assert any("'seg'" in note for note in loaded.notes)


def test_probe_rejects_shape_changing_models():
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    with pytest.raises(NormcheckError, match="input's spatial shape"):
        probe_model(model)


def test_probe_leaves_the_model_untouched(bn_unet):
    model = copy.deepcopy(bn_unet).train()
    model.down_1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    probe_model(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags


def test_probing_a_model_does_not_import_torch_dynamo(tmp_path):
    # torch wraps a dispatch mode's handler in torch._dynamo.disable by default, which imported
    # torch._dynamo (about 1 s) on the probe's first op in every process that loads a model.
    import subprocess
    import sys

    from tests.conftest import tiny_unet, tiny_unet_kwargs

    torch.save(tiny_unet("batch").state_dict(), tmp_path / "model.pt")
    code = (
        "import json, sys\n"
        "from napari_normcheck.core.models.models import load_model\n"
        f"loaded = load_model({str(tmp_path / 'model.pt')!r}, "
        f"arch='monai.networks.nets.BasicUNet', arch_kwargs={json.dumps(tiny_unet_kwargs())!r})\n"
        "assert loaded.info.divisor == (16, 16, 16), loaded.info\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "False"
