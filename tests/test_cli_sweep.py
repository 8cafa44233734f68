"""``napari-normcheck sweep``: rows equal single runs, refused rows, resume, reports, recommendation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from napari_normcheck.cli import main
from tests.conftest import calibrate, synthetic_volume, tiny_unet

ARCH = "monai.networks.nets.BasicUNet"
KWARGS = (
    '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [4, 4, 8, 8, 16, 4], '
    '"norm": "batch"}'
)


@pytest.fixture
def files(tmp_path):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "volume.npy", synthetic_volume((16, 48, 48)))
    return tmp_path


def model_args(files):
    return ["--model", str(files / "model.pt"), "--arch", ARCH, "--arch-kwargs", KWARGS]


def common(files):
    return [*model_args(files), "--activation", "sigmoid", "--device", "cpu", "--grid-shift"]


def test_sweep_rows_equal_single_runs_refuse_and_resume(files, capsys):
    sweep = [
        "sweep",
        str(files / "volume.npy"),
        *common(files),
        "--out",
        str(files / "sweep"),
        "--tiles",
        "16,32,32",
        "1,32,32",  # a 3D network does not take a tile one plane thick: refused, the sweep goes on
        "16,48,48",
        "--report",
        str(files / "sweep.json"),
    ]
    assert main(sweep) == 0
    result = json.loads((files / "sweep.json").read_text())
    rows = result["rows"]
    assert [r["tile"] for r in rows] == [[16, 32, 32], [1, 32, 32], [16, 48, 48]]
    assert rows[1]["refused"] and not rows[0]["refused"] and not rows[2]["refused"]
    assert all(r["seconds_per_mvoxel"] > 0 and r["peak_memory_mib"] > 0 for r in rows[::2])

    single = [
        "run",
        str(files / "volume.npy"),
        *common(files),
        "--out",
        str(files / "single.zarr"),
        "--tile",
        "16,32,32",
        "--report",
        str(files / "single.json"),
    ]
    assert main(single) == 0
    report = json.loads((files / "single.json").read_text())
    for key in ("disparity", "mismatch_eval", "mismatch_train", "grid_shift", "grid_shift_offset"):
        assert rows[0][key] == report[key], key

    # Resume: finished settings are read back, not run again; the refused one is tried again.
    marker = files / "sweep" / "tile_16x32x32_gaussian_overlap0.25.zarr" / "COMPLETE.json"
    stamp = marker.stat().st_mtime_ns
    capsys.readouterr()
    assert main([*sweep, "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier") == 2 and "refused" in err
    assert marker.stat().st_mtime_ns == stamp
    again = json.loads((files / "sweep.json").read_text())
    for old, new in zip(rows, again["rows"]):
        assert {k: v for k, v in old.items() if k != "seconds"} == {
            k: v for k, v in new.items() if k != "seconds"
        }


def test_sweep_csv_report_and_plot_without_matplotlib(files, capsys):
    args = [
        "sweep",
        str(files / "volume.npy"),
        *common(files),
        "--out",
        str(files / "sweep"),
        "--tiles",
        "16,48,48",
        "--overlap",
        "0.25",
        "0.5",
        "--report",
        str(files / "sweep.csv"),
        "--plot",
        str(files / "sweep.png"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    with open(files / "sweep.csv") as f:
        lines = list(csv.DictReader(f))
    assert [line["overlap"] for line in lines] == ["0.25", "0.5"]
    assert all(len(line["grid_shift_eval_soft"].split(";")) == 2 for line in lines)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
        assert not (files / "sweep.png").exists()
    else:
        assert (files / "sweep.png").stat().st_size > 0
    assert main([*args[:-2], "--plot", str(files / "sweep.pdf")]) == 2  # PNG or SVG only
