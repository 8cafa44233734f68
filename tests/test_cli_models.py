"""The command line on models with shape rules and several outputs (networks of tests/core/test_shapes)."""

from __future__ import annotations

import json

import numpy as np
import torch
import zarr

from napari_normcheck.cli import main
from tests.core.test_shapes import DeepSupervision, FixedSizeNet

SHAPES = "tests.core.test_shapes"


def _save(model, path):
    torch.save(model.state_dict(), path)
    return str(path)


def _run(tmp_path, model_file, arch, kwargs, volume, *extra):
    np.save(tmp_path / "v.npy", volume)
    return main(
        [
            "run",
            str(tmp_path / "v.npy"),
            "--model",
            model_file,
            "--arch",
            arch,
            "--arch-kwargs",
            json.dumps(kwargs),
            "--out",
            str(tmp_path / "o.zarr"),
            "--output-dtype",
            "float32",
            *extra,
        ]
    )


def test_inspect_without_a_working_probe_still_prints_the_inventory(tmp_path, capsys):
    torch.manual_seed(0)
    model_file = _save(FixedSizeNet((48, 32)), tmp_path / "m.pt")
    arch, kwargs = f"{SHAPES}:FixedSizeNet", {"shape": [48, 32]}
    assert main(["inspect", model_file, "--arch", arch, "--arch-kwargs", json.dumps(kwargs)]) == 0
    out = capsys.readouterr().out
    assert "no probe forward worked" in out and "tried (1, 1, 64, 64)" in out
    assert "BatchNorm2d" in out and "running statistics" in out
    volume = np.random.default_rng(0).normal(size=(60, 40)).astype(np.float32)
    assert _run(tmp_path, model_file, arch, kwargs, volume, "--tile", "48,32") == 0
    assert zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["pred_eval/0"].shape[0] == 2


def test_fixed_size_model_gets_its_tile(tmp_path, capsys):
    torch.manual_seed(0)
    model_file = _save(FixedSizeNet(), tmp_path / "m.pt")
    volume = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    assert _run(tmp_path, model_file, f"{SHAPES}:FixedSizeNet", {}, volume) == 0
    params = zarr.open_group(str(tmp_path / "o.zarr"), mode="r").attrs["normcheck"]["params"]
    assert params["tile"] == [1, 32, 32]
    assert (
        _run(
            tmp_path,
            model_file,
            f"{SHAPES}:FixedSizeNet",
            {},
            volume,
            "--tile",
            "40,40",
            "--overwrite",
        )
        == 2
    )
    assert "1,32,32 works" in capsys.readouterr().err


def test_inspect_lists_outputs_and_run_takes_an_output_key(tmp_path, capsys):
    torch.manual_seed(0)
    model_file = _save(DeepSupervision(as_dict=True), tmp_path / "m.pt")
    arch, kwargs = f"{SHAPES}:DeepSupervision", {"as_dict": True}
    assert main(["inspect", model_file, "--arch", arch, "--arch-kwargs", json.dumps(kwargs)]) == 0
    out = capsys.readouterr().out
    assert "the model returns: 'aux' tensor (1, 3, 32, 32); 'seg' tensor (1, 3, 64, 64)" in out
    volume = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    assert (
        _run(tmp_path, model_file, arch, kwargs, volume, "--tile", "16,16", "--output-key", "seg")
        == 0
    )
    attrs = zarr.open_group(str(tmp_path / "o.zarr"), mode="r").attrs["normcheck"]
    assert attrs["model"]["output"] == "--output-key 'seg'"
    assert (
        _run(tmp_path, model_file, arch, kwargs, volume, "--output-key", "mask", "--overwrite") == 2
    )
    assert "'aux', 'seg', 'epoch'" in capsys.readouterr().err
