"""``napari-normcheck sweep``: rows equal single runs, refused rows, resume, reports, recommendation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from napari_normcheck.cli import main
from napari_normcheck.core.io.store import read_marker
from napari_normcheck.core.run.sweep import TILING_LIMIT
from napari_normcheck.data import SAMPLE_MODELS, sample_volume
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


def sweep_command(files, *tiles, volume="volume.npy"):
    """``sweep VOLUME ... --out files/sweep --tiles TILES`` with the tiny model and a grid shift."""
    out = ["--out", str(files / "sweep"), "--tiles", *tiles]
    return ["sweep", str(files / volume), *common(files), *out]


def test_sweep_rows_equal_single_runs_refuse_and_resume(files, capsys):
    sweep = [
        *sweep_command(
            files,
            "16,32,32",
            "1,32,32",  # a 3D network does not take a tile one plane thick: refused, the sweep goes on
            "16,48,48",
        ),
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
    marker = (
        files / "sweep" / "tile_16x32x32_gaussian_overlap0.25.zarr" / "zarr.json"
    )  # summary here
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


def test_sweep_csv_report(files):
    args = [
        *sweep_command(
            files,
            "16,48,48",
        ),
        "--overlap",
        "0.25",
        "0.5",
        "--report",
        str(files / "sweep.csv"),
    ]
    assert main(args) == 0
    with open(files / "sweep.csv") as f:
        lines = list(csv.DictReader(f))
    assert [line["overlap"] for line in lines] == ["0.25", "0.5"]
    assert all(len(line["grid_shift_eval_soft"].split(";")) == 2 for line in lines)
    # A hard value on too little foreground reads "not judged", as in the run's summary.
    report = read_marker(files / "sweep" / "tile_16x48x48_gaussian_overlap0.25.zarr")
    for c, judged in enumerate(report["grid_shift"]["eval"]["judged"]):
        cell = lines[0]["grid_shift_eval_hard"].split(";")[c]
        assert (cell == "not judged") == (not judged)


def test_sweep_plot_png_and_svg(files, capsys):
    import xml.etree.ElementTree as ET

    import matplotlib.image  # the testing extra has it

    args = [
        *sweep_command(
            files,
            "16,32,32",
            "16,48,48",
        ),
        "--overlap",
        "0.25",
        "0.5",
        "--max-tiling",
        "1",  # every setting qualifies: the cheapest is recommended and starred
    ]
    assert main([*args, "--plot", str(files / "sweep.png")]) == 0
    assert f"plot: {files / 'sweep.png'}" in capsys.readouterr().out
    png = (files / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(files / "sweep.png")
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800
    assert pixels[..., :3].std() > 0.05  # drawn, not blank

    assert main([*args, "--resume", "--plot", str(files / "sweep.svg")]) == 0
    root = ET.parse(files / "sweep.svg").getroot()
    texts = " ".join(
        "".join(node.itertext()) for node in root.iter("{http://www.w3.org/2000/svg}text")
    )
    for words in ("grid shift (eval)", "tile mismatch (eval)", "train/eval disparity"):
        assert words in texts
    assert "channel 0" in texts and "channel 1" in texts  # a row of panels per channel, named
    assert "gaussian, overlap 0.25" in texts and "gaussian, overlap 0.5" in texts
    assert "recommended" in texts and "limit 1" in texts
    assert "16×32×32" in texts and "16×48×48" in texts  # the x axis names the tiles
    lines = [
        g
        for g in root.iter("{http://www.w3.org/2000/svg}g")
        if g.get("id", "").startswith("line2d")
    ]
    # Two lines (one per overlap) in each of 4 panels x 2 channels, a star, the limit lines.
    assert len(lines) >= 2 * 4 * 2
    assert main([*args, "--resume", "--plot", str(files / "sweep.pdf")]) == 2  # PNG or SVG only


def sample_sweep(tmp_path, name, *extra):
    """A sweep of packaged sample model ``name`` on a crop of the packaged sample volume."""
    np.save(tmp_path / "sample.npy", sample_volume()[:16, :96, :96])
    sample = SAMPLE_MODELS[name]
    args = [
        "sweep",
        str(tmp_path / "sample.npy"),
        "--model",
        str(sample.path),
        "--arch",
        sample.arch,
        "--arch-kwargs",
        json.dumps(sample.arch_kwargs),
        "--normalize",
        sample.normalize,
        "--activation",
        sample.activation,
        "--device",
        "cpu",
        "--grid-shift",
        "--out",
        str(tmp_path / name),
        "--tiles",
        "16,64,64",
        "--report",
        str(tmp_path / f"{name}.json"),
        *extra,
    ]
    assert main(args) == 0
    return json.loads((tmp_path / f"{name}.json").read_text())


def largest_eval_tiling(row):
    """The rule's number read straight off a row: hard where judged, soft where that is."""
    support = row["support"]
    values = []
    for entry, judged, soft_judged in (
        (
            row["mismatch_eval"],
            support["mismatch_judged"]["eval"],
            support["mismatch_soft_judged"]["eval"],
        ),
        (
            row["grid_shift"]["eval"],
            row["grid_shift"]["eval"]["judged"],
            row["grid_shift"]["eval"]["soft_judged"],
        ),
    ):
        for c, hard in enumerate(entry["hard"]):
            if judged[c]:
                values.append(hard)
            elif soft_judged[c]:
                values.append(entry["soft"][c])
    return max(values)


def test_recommendation_groupnorm_sample_model_normalizes_each_tile(tmp_path):
    result = sample_sweep(tmp_path, "groupnorm")
    (row,) = result["rows"]
    assert largest_eval_tiling(row) >= TILING_LIMIT
    # GroupNorm has no running statistics: eval and train are the same prediction.
    assert row["grid_shift"]["eval"]["soft"] == row["grid_shift"]["train"]["soft"]
    recommendation = result["recommendation"]
    assert recommendation["tile"] is None
    assert "normalizes each tile by itself (GroupNorm)" in recommendation["text"]


def test_recommendation_batchnorm_sample_model(tmp_path):
    result = sample_sweep(tmp_path, "batchnorm")
    (row,) = result["rows"]
    value = largest_eval_tiling(row)
    recommendation = result["recommendation"]
    if value < TILING_LIMIT:
        assert recommendation["tile"] == [16, 64, 64]
    else:
        assert recommendation["tile"] is None
        assert "running statistics" in recommendation["text"]
        assert "normalizes each tile by itself" not in recommendation["text"]
    # With a limit above every eval tiling number the eval result counts as tiling-independent:
    # the train/eval disparity is what remains.
    loose = sample_sweep(tmp_path, "batchnorm", "--resume", "--max-tiling", f"{value + 0.01}")
    assert loose["recommendation"]["tile"] == [16, 64, 64]
    assert "tiling-independent at every setting" in loose["recommendation"]["text"]
    assert "train/eval disparity" in loose["recommendation"]["text"]


def test_a_setting_whose_one_tile_fills_the_region_is_not_recommended():
    # No tile pairs and a zero offset: both tiling numbers are 0 by construction, not measured.
    from napari_normcheck.core.run.sweep import eval_tiling, recommend

    empty = {"hard": [0.0], "soft": [0.0]}
    shift = {"hard": [0.0], "soft": [0.0], "judged": [True], "soft_judged": [True]}
    one_tile = {
        "tile": [32, 128, 128],
        "overlap": 0.25,
        "blend": "gaussian",
        "disparity": empty,
        "mismatch_eval": empty,
        "support": {
            "judged": [True],
            "mismatch_judged": {"eval": [False]},
            "mismatch_soft_judged": {"eval": [False]},
        },
        "grid_shift": {"eval": shift},
        "grid_shift_offset": [0, 0, 0],
        "seconds_per_mvoxel": 1.0,
    }
    assert eval_tiling(one_tile) is None
    assert recommend([one_tile])["tile"] is None
    # The same numbers on a grid that did move are a measurement.
    moved = one_tile | {"grid_shift_offset": [0, 48, 48], "tile": [32, 64, 64]}
    assert eval_tiling(moved) == 0.0
    assert recommend([one_tile, moved])["tile"] == [32, 64, 64]


def test_plotted_values_are_the_numbers_the_recommendation_judges():
    # Channel 0 has foreground enough for the hard value, channel 1 for the soft one only,
    # channel 2 for neither: the plot draws 0.3, 0.04 (hollow) and nothing.
    from napari_normcheck.core.run.sweep import eval_tiling, indicator, indicator_kind, recommend

    tiling = {"hard": [0.3, 0.9, 0.8], "soft": [0.02, 0.04, 0.05]}
    row = {
        "tile": [32, 64, 64],
        "overlap": 0.25,
        "blend": "gaussian",
        "disparity": tiling | {"hard": [0.1, 1.0, 1.0]},
        "mismatch_eval": tiling,
        "support": {
            "judged": [True, False, False],
            "soft_judged": [True, True, False],
            "mismatch_judged": {"eval": [True, False, False]},
            "mismatch_soft_judged": {"eval": [True, True, False]},
        },
        "seconds_per_mvoxel": 1.0,
    }
    plotted = [indicator(row, "mismatch_eval", None, c) for c in range(3)]
    assert plotted == [0.3, 0.04, None]
    assert [indicator_kind(row, "mismatch_eval", None, c) for c in range(3)] == [
        "hard",
        "soft",
        None,
    ]
    assert [indicator(row, "disparity", None, c) for c in range(3)] == [0.1, 0.04, None]
    # The recommendation's number is the largest plotted one: a point above the limit on the plot
    # is a setting that does not qualify.
    assert eval_tiling(row) == max(v for v in plotted if v is not None)
    assert recommend([row])["tile"] is None and "0.300" in recommend([row])["text"]


def test_sweep_sample_runs_every_setting_on_the_same_regions_and_pools_them(files, capsys):
    from napari_normcheck.core.measure.metrics import disparity_from_sums
    from tests.core.test_sweep_sample import textured_with_background

    np.save(files / "wide.npy", textured_with_background()[0])
    args = [
        *sweep_command(
            files,
            "16,32,32",
            "16,48,48",
            volume="wide.npy",
        ),
        "--sample",
        "2",
        "--report",
        str(files / "sweep.json"),
    ]
    with pytest.raises(SystemExit):  # --roi or --sample, not both
        main([*args, "--roi", "0:16,0:32,0:32"])
    assert main(args) == 0
    result = json.loads((files / "sweep.json").read_text())
    assert len(result["regions"]) == 2
    for row in result["rows"]:
        assert [r["roi"] for r in row["regions"]] == result["regions"]  # the same regions
        markers = [read_marker(r["out"]) for r in row["regions"]]
        # The row is the Dice of the regions' summed sums.
        for kind in ("hard", "soft"):
            summed = np.sum([m["disparity_sums"][kind] for m in markers], axis=0)
            np.testing.assert_allclose(
                row["disparity"][kind], disparity_from_sums(summed), atol=1e-9
            )
        assert row["grid_shift"]["eval"]["n_voxels"] == sum(
            m["grid_shift"]["eval"]["n_voxels"] for m in markers
        )
    # A region's numbers are what a single run on that region gives.
    region = result["rows"][0]["regions"][1]
    roi = ",".join(f"{a}:{b}" for a, b in region["roi"])
    single = [
        "run",
        str(files / "wide.npy"),
        *common(files),
        "--out",
        str(files / "single.zarr"),
        "--tile",
        "16,32,32",
        "--roi",
        roi,
        "--report",
        str(files / "single.json"),
    ]
    assert main(single) == 0
    report = json.loads((files / "single.json").read_text())
    for key in ("disparity", "mismatch_eval", "grid_shift"):
        assert region[key] == report[key], key
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().err.count("finished earlier") == 4
    again = json.loads((files / "sweep.json").read_text())
    for old, new in zip(result["rows"], again["rows"]):
        for key in ("disparity", "mismatch_eval", "grid_shift", "peak_memory_mib"):
            assert old[key] == new[key], key


def test_a_sweep_of_a_logits_model_warns_once_and_judges_no_soft_value(files, capsys):
    # Without --activation the tiny U-Net's logits are compared as they are.
    sweep = [
        "sweep",
        str(files / "volume.npy"),
        *model_args(files),
        "--device",
        "cpu",
        "--out",
        str(files / "sweep"),
        "--tiles",
        "16,32,32",
        "16,48,48",
        "--report",
        str(files / "sweep.json"),
    ]
    assert main(sweep) == 0
    assert capsys.readouterr().err.count("outputs are not probabilities") == 1
    rows = json.loads((files / "sweep.json").read_text())["rows"]
    assert len(rows) == 2
    assert all(row["support"]["soft_judged"] == [False, False] for row in rows)
