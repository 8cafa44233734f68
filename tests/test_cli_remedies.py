"""The remedies' command-line pieces, on a parser built with argparse and on a real ``run`` output."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck.cli import main
from napari_normcheck.cli.remedies import (
    add_remedies_arguments,
    check_remedies_arguments,
    remedies_wanted,
)
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.data import SAMPLE_MODELS, make_synthetic_em

SAMPLE = SAMPLE_MODELS["batchnorm"]
MODEL_ARGS = [
    "--model",
    str(SAMPLE.path),
    "--arch",
    SAMPLE.arch,
    "--arch-kwargs",
    json.dumps(SAMPLE.arch_kwargs),
]


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_remedies")
    raw, truth = make_synthetic_em((48, 64, 112), seed=5)
    np.save(folder / "raw.npy", raw)
    np.save(folder / "labels.npy", (truth[0] + 2 * truth[1] * (truth[0] == 0)).astype(np.uint8))
    return folder


def recalibrate_parser():
    from napari_normcheck.cli import build_parser

    return build_parser()  # the command line's own parser, with the recalibrate subcommand


def test_recalibrate_command_exports_without_touching_the_input(sample_files, capsys):
    input_bytes = SAMPLE.path.read_bytes()
    out_model = sample_files / "recal.pt"
    args = recalibrate_parser().parse_args(
        [
            "recalibrate",
            str(sample_files / "raw.npy"),
            *MODEL_ARGS,
            "--out-model",
            str(out_model),
            "--tile",
            "48,64,64",
            "--tiles",
            "3",
            "--holdout",
            "1",
            "--normalize",
            "minmax:0,255",
            "--activation",
            "sigmoid",
            "--variance",
            "pooled",
            "--mask-above",
            "250",
        ]
    )
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "held-out tiles (1)" in printed and str(out_model) in printed
    assert SAMPLE.path.read_bytes() == input_bytes
    provenance = json.loads((sample_files / "recal.pt.json").read_text())
    assert provenance["variance"] == "pooled" and len(provenance["tiles"]) == 3
    assert provenance["source_model"]["path"] == str(SAMPLE.path)
    model = SAMPLE.build()
    model.load_state_dict(torch.load(out_model, weights_only=True))
    original = SAMPLE.load()
    assert not torch.equal(
        model.state_dict()["conv_0.conv_0.adn.N.running_mean"],
        original.state_dict()["conv_0.conv_0.adn.N.running_mean"],
    )
    # Never overwrite: neither the export nor the input model.
    for target in (out_model, SAMPLE.path):
        again = recalibrate_parser().parse_args(
            ["recalibrate", str(sample_files / "raw.npy"), *MODEL_ARGS, "--out-model", str(target)]
        )
        with pytest.raises(NormcheckError, match="never overwritten") as error:
            again.handler(again)
        assert "\n" not in str(error.value)
    assert SAMPLE.path.read_bytes() == input_bytes


def test_run_with_remedies_and_labels_through_main(sample_files, capsys):
    out = sample_files / "out.zarr"
    report = sample_files / "report.json"
    argv = [
        "run",
        str(sample_files / "raw.npy"),
        *MODEL_ARGS,
        "--out",
        str(out),
        "--tile",
        "48,64,64",
        "--normalize",
        "minmax:0,255",
        "--activation",
        "sigmoid",
        "--report",
        str(report),
        "--remedies",
        "--labels",
        str(sample_files / "labels.npy"),
        "--label-map",
        '{"1": 0, "2": 1}',
        "--recalibration-tiles",
        "3",
        "--recalibration-holdout",
        "1",
        "--recalibrated-model",
        str(sample_files / "from_run.pt"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "batch-stats eval" in printed and "recalibrated eval" in printed
    assert (sample_files / "from_run.pt").exists()
    result = json.loads(report.read_text())["remedies"]
    assert zarr.open_group(str(out), mode="r").attrs["normcheck"]["remedies"] == result
    assert len(result["recalibrated"]["dice_vs_labels"]["hard"]) == 2
    assert result["batchstats"]["disparity_vs_train"]["hard"] == [0.0, 0.0]
    # The main check's own numbers are the remedies table's eval row.
    main_report = json.loads(report.read_text())
    np.testing.assert_allclose(
        result["eval"]["disparity_vs_train"]["hard"], main_report["disparity"]["hard"], atol=1e-12
    )
    # Without --remedies nothing more happens.
    parser = argparse.ArgumentParser()
    add_remedies_arguments(parser)
    nothing = parser.parse_args([])
    check_remedies_arguments(nothing)
    assert not remedies_wanted(nothing)
    # A remedies error is found before the long check runs, and exits 2.
    bad = argv[:-2]  # without --recalibrated-model, which exists now
    bad[bad.index("--label-map") + 1] = "{oops"
    marker = (out / "zarr.json").stat().st_mtime_ns  # the summary is in it
    assert main([*bad, "--overwrite"]) == 2
    assert "label map" in capsys.readouterr().err
    assert (out / "zarr.json").stat().st_mtime_ns == marker  # OUT was not rewritten


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--labels", "x.npy"], "label-map"),
        (["--label-map", '{"1": 0}'], "needs --labels"),
        (["--labels", "missing.npy", "--label-map", "{oops"], "label map"),
        (["--labels", "missing.npy", "--label-map", '{"1": 0}'], "not found"),
        (["--recalibrated-model", "x.pt"], "needs --remedies"),
    ],
)
def test_remedy_argument_errors_are_one_line(argv, message):
    parser = argparse.ArgumentParser()
    add_remedies_arguments(parser)
    with pytest.raises(NormcheckError, match=message) as error:
        check_remedies_arguments(parser.parse_args(argv))
    assert "\n" not in str(error.value)


def test_fold_command_exports_torchscript_with_equal_output(tmp_path, capsys):
    from napari_normcheck.cli.remedies import add_fold_parser

    parser = argparse.ArgumentParser()
    add_fold_parser(parser.add_subparsers(dest="command", required=True))
    target = tmp_path / "folded.pt"
    args = parser.parse_args(
        [
            "fold",
            str(SAMPLE.path),
            *MODEL_ARGS[2:],
            "--out-model",
            str(target),
            "--repeats",
            "1",
            "--tile",
            "16,32,32",
        ]
    )
    assert args.handler(args) == 0
    assert "speed-up" in capsys.readouterr().out
    folded = torch.jit.load(str(target))
    x = torch.rand((1, 1, 16, 32, 32), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = SAMPLE.load()(x)
        got = folded(x)
    assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
    with pytest.raises(NormcheckError, match="never overwritten"):
        args.handler(args)
