"""Architecture spec files (``{"arch": ..., "kwargs": {...}}``) read by the core and ``--arch-spec``."""

from __future__ import annotations

import json

import pytest
import torch

from napari_normcheck.cli import main
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models.arch import read_arch_spec
from tests.conftest import tiny_unet, tiny_unet_kwargs

ARCH = "monai.networks.nets.BasicUNet"


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny_unet("batch").state_dict(), path)
    return path


def test_json_and_yaml_specs_give_arch_and_kwargs(tmp_path):
    kwargs = tiny_unet_kwargs("batch")
    (tmp_path / "spec.json").write_text(json.dumps({"arch": ARCH, "kwargs": kwargs}))
    yaml_text = f"arch: {ARCH}\narch_kwargs:\n" + "".join(
        f"  {key}: {json.dumps(value)}\n" for key, value in kwargs.items()
    )
    (tmp_path / "spec.yaml").write_text(yaml_text)
    assert read_arch_spec(tmp_path / "spec.json") == (ARCH, kwargs)
    assert read_arch_spec(tmp_path / "spec.yaml") == (ARCH, kwargs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"kwargs": {}}', '"arch"'),
        ('{"arch": "BasicUNet", "kwargs": [1, 2]}', "object of keyword arguments"),
        ('{"arch": "BasicUNet",', "cannot be read"),
    ],
)
def test_bad_specs_say_what_is_wrong(tmp_path, text, message):
    (tmp_path / "spec.json").write_text(text)
    with pytest.raises(NormcheckError, match=message):
        read_arch_spec(tmp_path / "spec.json")
    with pytest.raises(NormcheckError, match="not found"):
        read_arch_spec(tmp_path / "missing.json")


def test_inspect_with_arch_spec(tmp_path, model_file, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"arch": ARCH, "kwargs": tiny_unet_kwargs("batch")}))
    assert main(["inspect", str(model_file), "--arch-spec", str(spec)]) == 0
    assert "BatchNorm3d" in capsys.readouterr().out
    # --arch-kwargs replaces the spec's: wrong channels now make the weights not fit.
    wrong = json.dumps({**tiny_unet_kwargs("batch"), "out_channels": 5})
    assert main(["inspect", str(model_file), "--arch-spec", str(spec), "--arch-kwargs", wrong]) == 2
