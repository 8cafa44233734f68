"""``napari-normcheck run --workers N``: a local cluster gives the single-process run's outputs and report."""

from __future__ import annotations

import json

import numpy as np
import torch
import zarr

from napari_normcheck.cli import main
from tests.conftest import calibrate, synthetic_volume, tiny_unet, tiny_unet_kwargs

ARCH_KWARGS = tiny_unet_kwargs("batch")


def test_run_with_workers_equals_single_process(tmp_path, capsys):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    np.save(tmp_path / "v.npy", synthetic_volume((28, 48, 52)))

    def command(name, *extra):
        return [
            "run",
            str(tmp_path / "v.npy"),
            "--model",
            str(tmp_path / "m.pt"),
            "--arch",
            "monai.networks.nets.BasicUNet",
            "--arch-kwargs",
            json.dumps(ARCH_KWARGS),
            "--out",
            str(tmp_path / f"{name}.zarr"),
            "--tile",
            "16,32,32",
            "--blend",
            "crop",
            "--halo",
            "0,8,8",
            "--activation",
            "sigmoid",
            "--seams",
            "--report",
            str(tmp_path / f"{name}.json"),
            *extra,
        ]

    assert main(command("single")) == 0
    assert main(command("cluster", "--workers", "2")) == 0
    single = zarr.open_group(str(tmp_path / "single.zarr"), mode="r")
    cluster = zarr.open_group(str(tmp_path / "cluster.zarr"), mode="r")
    for name in ("pred_eval", "pred_train", "disparity", "seams_eval", "tile_mismatch_eval"):
        np.testing.assert_array_equal(cluster[f"{name}/0"][:], single[f"{name}/0"][:])
    expected = json.loads((tmp_path / "single.json").read_text())
    report = json.loads((tmp_path / "cluster.json").read_text())
    for key in ("disparity", "mismatch_eval", "mismatch_train", "model_sha256", "plan"):
        assert report[key] == expected[key], key
    assert [t["disparity_hard"] for t in report["tiles"]] == [
        t["disparity_hard"] for t in expected["tiles"]
    ]
    # The same output again: refused without --overwrite, exit code 2 and one line.
    assert main(command("cluster", "--workers", "2")) == 2
    assert "already exists" in capsys.readouterr().err
