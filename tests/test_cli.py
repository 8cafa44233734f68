"""The command line, called as ``main([...])`` on real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck.cli import main
from napari_normcheck.core.io.store import is_complete
from tests.conftest import calibrate, synthetic_volume, tiny_unet

ARCH = "monai.networks.nets.BasicUNet"
KWARGS = '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [4, 4, 8, 8, 16, 4], "norm": "batch"}'


@pytest.fixture
def files(tmp_path):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "volume.npy", synthetic_volume((16, 40, 40)))
    return tmp_path


def run_args(files, *extra, volume="volume.npy", out="out.zarr"):
    return [
        "run",
        str(files / volume),
        "--model",
        str(files / "model.pt"),
        "--arch",
        ARCH,
        "--arch-kwargs",
        KWARGS,
        "--out",
        str(files / out),
        "--tile",
        "16,32,32",
        *extra,
    ]


def test_run_writes_outputs_report_and_summary(files, capsys):
    code = main(run_args(files, "--activation", "sigmoid", "--report", str(files / "r.json")))
    assert code == 0
    assert is_complete(files / "out.zarr")
    root = zarr.open_group(str(files / "out.zarr"), mode="r")
    assert root["pred_eval/0"].shape == (2, 16, 40, 40)
    report = json.loads((files / "r.json").read_text())
    for key in (
        "disparity",
        "mismatch_eval",
        "mismatch_train",
        "tiles",
        "norm_layers",
        "params",
        "model_sha256",
        "versions",
        "timing",
    ):
        assert key in report
    assert set(report["disparity"]) >= {"hard", "soft"}
    assert {
        "index",
        "start",
        "stop",
        "disparity_hard",
        "disparity_soft",
        "mismatch_eval",
        "mismatch_train",
        "feature_z",
    } <= set(report["tiles"][0])
    printed = capsys.readouterr().out
    assert "train/eval disparity (hard)" in printed and "verdict:" in printed
    # The printed verdict and the report's hold the same rule, and the report says what it rests on.
    from napari_normcheck.core.run.report import verdict_detail

    assert f"verdict: {report['verdict']}" in printed
    assert report["verdict_detail"] == verdict_detail(report)
    assert report["support"]["min_foreground"] == {"voxels": 1000, "fraction": 0.001}
    assert len(report["support"]["judged"]) == 2
    assert main(run_args(files, "--report", str(files / "r.csv"), "--overwrite")) == 0
    rows = (files / "r.csv").read_text().splitlines()
    assert rows[0].startswith("index,start,stop") and len(rows) == 1 + len(report["tiles"])


def test_min_foreground_option_leaves_too_little_foreground_not_judged(files, capsys):
    args = run_args(files, "--activation", "sigmoid", "--report", str(files / "r.json"))
    assert main([*args, "--min-foreground", "100000000,0"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((files / "r.json").read_text())
    union = report["support"]["union_voxels"]
    assert f"channel 0 not judged ({union[0]} foreground voxels)" in printed
    assert "verdict: train/eval disparity not judged" in printed
    assert report["verdict_detail"] == {
        "level": "not judged",
        "channel": None,
        "basis": "hard",
        "value": 0.0,
    }
    assert report["support"]["min_foreground"] == {"voxels": 100000000, "fraction": 0.0}
    assert report["params"]["min_foreground"] == [100000000, 0.0]
    assert all(t["judged"] == [False, False] for t in report["tiles"])
    assert "worst tiles: none ranked" in printed
    assert main([*args, "--overwrite", "--min-foreground", "lots"]) == 2
    assert "min_foreground" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, f: a.__setitem__(1, str(f / "missing.zarr")), "no such file"),
        (lambda a, f: a.__setitem__(3, str(f / "nothing.pt")), "nothing.pt"),
        (lambda a, f: a.__setitem__(7, "{not json"), "JSON"),
        (lambda a, f: a.__setitem__(5, "monai.networks.nets.NoSuchNet"), "NoSuchNet"),
        (lambda a, f: a.__setitem__(11, "16,30,30"), "divisible"),
        (lambda a, f: a.extend(["--overlap", "1.5"]), "overlap"),
        (lambda a, f: a.extend(["--roi", "0:4,50:60,0:8"]), "ROI"),
    ],
)
def test_user_errors_exit_2_with_one_line(files, capsys, change, message):
    args = run_args(files)
    change(args, files)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message.lower() in err.lower()
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_existing_output_needs_overwrite(files, capsys):
    assert main(run_args(files)) == 0
    assert main(run_args(files)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(run_args(files, "--overwrite")) == 0


def test_channel_count_mismatch(files, capsys):
    np.save(files / "two.npy", np.zeros((2, 16, 32, 32), np.float32))
    args = run_args(files)
    args[1] = str(files / "two.npy")
    assert main(args) == 2
    assert "channel" in capsys.readouterr().err


def test_inspect_prints_inventory(files, capsys):
    assert main(["inspect", str(files / "model.pt"), "--arch", ARCH, "--arch-kwargs", KWARGS]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm3d" in out and "running statistics" in out


def test_demo_shows_disparity_for_batchnorm_and_none_for_groupnorm(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    batch = json.loads((tmp_path / "demo" / "batchnorm_report.json").read_text())
    group = json.loads((tmp_path / "demo" / "groupnorm_report.json").read_text())
    assert max(batch["disparity"]["hard"]) > 0.05
    assert group["disparity"]["hard"] == [0.0, 0.0]
    assert max(group["mismatch_eval"]["hard"]) > 0  # per-tile normalization leaves seams
    assert (tmp_path / "demo" / "batchnorm_report.csv").exists()
    assert "comparison" in capsys.readouterr().out


def test_threads_option_reaches_the_run_config(files, capsys):
    from napari_normcheck.cli import build_parser
    from napari_normcheck.cli.config_args import run_config_from_args
    from napari_normcheck.cli.run import open_inputs

    parser = build_parser()
    args = parser.parse_args(run_args(files, "--threads", "3"))
    volume, loaded = open_inputs(args)
    assert run_config_from_args(args, loaded, volume).threads == 3
    args = parser.parse_args(run_args(files))
    assert run_config_from_args(args, loaded, volume).threads == 0  # torch's own choice
    assert main(run_args(files, "--threads", "-2")) == 2
    assert "threads -2 is negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    assert "OMP_NUM_THREADS" in capsys.readouterr().out


def test_integer_input_is_normalized_by_default_as_in_the_widget(files, capsys):
    from napari_normcheck.core.io.intensity import INTEGER_NORMALIZE

    # uint8 EM-like input without --normalize: percentile:1,99.8, and a line saying so.
    volume = synthetic_volume((16, 40, 40))
    scaled = (volume - volume.min()) / (volume.max() - volume.min()) * 255
    np.save(files / "volume_u8.npy", scaled.astype(np.uint8))
    report = files / "u8.json"
    assert main(run_args(files, "--report", str(report), volume="volume_u8.npy")) == 0
    assert json.loads(report.read_text())["params"]["normalize"] == INTEGER_NORMALIZE
    err = capsys.readouterr().err
    assert f"uint8 input: normalized with {INTEGER_NORMALIZE}" in err
    # Asked for "none": the raw values, with the warning; float input: none, without a line.
    out = ("--out", str(files / "none.zarr"), "--report", str(files / "none.json"))
    with pytest.warns(UserWarning, match="go into the network unscaled"):
        assert main(run_args(files, "--normalize", "none", *out, volume="volume_u8.npy")) == 0
    assert json.loads((files / "none.json").read_text())["params"]["normalize"] == "none"
    capsys.readouterr()
    assert main(run_args(files, "--report", str(files / "f.json"), out="f.zarr")) == 0
    assert json.loads((files / "f.json").read_text())["params"]["normalize"] == "none"
    assert "normalized with" not in capsys.readouterr().err


def test_logits_without_an_activation_are_named_and_no_soft_dice_is_judged(files, capsys):
    # The tiny U-Net returns logits: with the default activation (none) the soft Dice sums of
    # raw outputs meant nothing and once printed a negative "foreground".
    report_path = files / "r.json"
    assert main(run_args(files, "--report", str(report_path), "--grid-shift")) == 0
    captured = capsys.readouterr()
    assert "outputs are not probabilities" in captured.err
    assert "--activation sigmoid" in captured.err
    report = json.loads(report_path.read_text())
    assert report["model"]["output_activation"] is None
    assert report["support"]["probabilities"] is False
    assert report["support"]["soft_judged"] == [False, False]
    assert not any(any(flags) for flags in report["support"]["mismatch_soft_judged"].values())
    assert all(not any(entry["soft_judged"]) for entry in report["grid_shift"].values())
    soft_line = next(
        line for line in captured.out.splitlines() if line.startswith("train/eval disparity (soft)")
    )
    assert "not probabilities" in soft_line and "foreground voxels" not in soft_line
    assert "not probabilities" in report["verdict"]
    assert report["verdict_detail"]["basis"] == "hard"

    assert (
        main(
            run_args(files, "--activation", "sigmoid", "--report", str(report_path), "--overwrite")
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "not probabilities" not in captured.err + captured.out
    report = json.loads(report_path.read_text())
    assert report["support"]["probabilities"] is True
    assert report["support"]["soft_judged"] == [True, True]
