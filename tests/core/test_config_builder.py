"""``RunConfig.from_options``: the one builder the command line, the demo and the widget share."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_normcheck.cli import build_parser
from napari_normcheck.cli.config_args import run_config_from_args
from napari_normcheck.cli.model_args import model_tile, package_default
from napari_normcheck.core.base.config import RunConfig, parse_int_triple
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import parse_roi


def test_text_as_typed_gives_the_parsed_configuration():
    config = RunConfig.from_options(
        {
            "tile": " 16,32,32 ",
            "halo": "4,8",
            "roi": "0:10,0:64,0:64",
            "overlap": "0.5",
            "train_batch": "2",
            "eval_batch": "auto",
            "feature_layers": "down_1.conv, , final_conv",
            "seams": "yes",
            "normalize": " minmax:0,255 ",
        }
    )
    assert config.tile == (16, 32, 32)
    assert config.halo == (0, 4, 8)
    assert config.roi == ((0, 10), (0, 64), (0, 64))
    assert config.overlap == 0.5
    assert config.train_batch == 2
    assert config.eval_batch is None
    assert config.feature_layers == ("down_1.conv", "final_conv")
    assert config.seams is True
    assert config.normalize == "minmax:0,255"


def test_parsed_values_give_the_same_configuration_as_text():
    parsed = RunConfig.from_options(
        {"tile": [32, 32], "halo": (0, 4, 8), "roi": [[0, 10], [0, 64], [0, 64]], "seams": True}
    )
    typed = RunConfig.from_options(
        {"tile": "32,32", "halo": "0,4,8", "roi": "0:10,0:64,0:64", "seams": "true"}
    )
    assert parsed == typed
    assert parsed.tile == (1, 32, 32)


def test_defaults_fill_only_what_was_not_given():
    defaults = {"normalize": "percentile:1,99", "activation": "sigmoid", "spatial_dims": 3}
    blank = RunConfig.from_options({"normalize": "", "activation": None}, **defaults)
    assert (blank.normalize, blank.activation, blank.spatial_dims) == (
        "percentile:1,99",
        "sigmoid",
        3,
    )
    given = RunConfig.from_options({"normalize": "none", "activation": "softmax"}, **defaults)
    assert (given.normalize, given.activation) == ("none", "softmax")
    # Neither given nor defaulted: the dataclass's own defaults.
    assert RunConfig.from_options({}) == RunConfig()
    assert RunConfig.from_options({"tile": "auto", "halo": ""}).tile is None


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"tile": "a,b"}, "cannot read tile 'a,b'"),
        ({"tile": "0,32,32"}, "tile (0, 32, 32) has a side below one voxel"),
        ({"tile": "1,2,3,4"}, "tile '1,2,3,4' needs 3 values"),
        ({"halo": "-1,0,0"}, "halo (-1, 0, 0) is negative"),
        ({"roi": "0-10,0:64"}, "cannot read ROI"),
        ({"roi": [(0, 10, 3)]}, "cannot read roi"),
        ({"overlap": "much"}, "cannot read overlap 'much'; give a number"),
        ({"train_batch": 1.5}, "cannot read train_batch 1.5; give a whole number"),
        ({"cache_mb": "lots"}, "cannot read cache_mb 'lots'"),
        ({"cache_mb": -5}, "cache -5 MB is negative"),
        ({"seams": "maybe"}, "cannot read seams 'maybe'; give true or false"),
        ({"tiles": "16,32,32"}, "unknown run option(s) tiles"),
        ({"overlap": 1.5}, "overlap 1.5 is outside [0, 1)"),
        ({"blend": "median"}, "unknown blend 'median'"),
    ],
)
def test_bad_values_raise_an_error_naming_the_option(options, words):
    with pytest.raises(NormcheckError) as error:
        RunConfig.from_options(options)
    assert words in str(error.value)


def test_unknown_default_is_refused():
    with pytest.raises(NormcheckError, match="unknown run option"):
        RunConfig.from_options({}, normalise="none")


def test_from_dict_reads_stored_params_with_unknown_and_missing_keys():
    config = RunConfig.from_options(
        {"tile": "16,32,32", "roi": "0:8,0:32,0:32", "feature_layers": "a,b"}, spatial_dims=3
    )
    stored = config.to_dict()
    assert RunConfig.from_dict(stored) == config
    older = {k: v for k, v in stored.items() if k not in ("precision", "pyramid_side")}
    newer = older | {"a_later_option": 7}
    assert RunConfig.from_dict(newer) == config.replace(
        precision="fp32", pyramid_side=RunConfig().pyramid_side
    )


# --- the ``run`` command line ---------------------------------------------------------------------


def legacy_run_config(args, loaded, volume) -> RunConfig:
    """The field-by-field construction ``run_command`` used before ``from_options``."""
    info = loaded.info
    tile = parse_int_triple(args.tile, "tile") if args.tile else model_tile(loaded, volume)
    roi = parse_roi(args.roi) if args.roi else None
    if roi is not None and len(roi) == 2:
        roi = ((0, volume.spatial_shape[0]), *roi)
    return RunConfig(
        tile=tile,
        overlap=args.overlap,
        blend=args.blend,
        halo=parse_int_triple(args.halo, "halo") if args.halo else (0, 0, 0),
        roi=roi,
        train_batch=args.train_batch,
        eval_batch=args.eval_batch,
        device=args.device,
        normalize=args.normalize or package_default(loaded, "normalize") or "none",
        activation=args.activation or package_default(loaded, "activation") or "none",
        output_dtype=args.output_dtype,
        seams=args.seams,
        threshold=args.threshold,
        spatial_dims=info.spatial_dims,
        cache_mb=args.cache_mb,
        feature_layers=tuple(args.feature_layer),
        precision=args.precision,
        fuse_train=not args.no_fuse_train,
    )


def fake_model(spatial_dims=3, fixed_shape=None, preprocessing=None, postprocessing=None):
    """What the builder reads of a loaded model (its info and bioimage.io processing)."""
    info = SimpleNamespace(
        spatial_dims=spatial_dims, fixed_shape=fixed_shape, divisor=(16,) * spatial_dims
    )
    return SimpleNamespace(info=info, preprocessing=preprocessing, postprocessing=postprocessing)


VOLUME = SimpleNamespace(spatial_shape=(24, 100, 120), dtype=np.dtype("float32"))
FULL = [
    "--tile", "16,32,32", "--overlap", "0.5", "--blend", "crop", "--halo", "2,8,8",
    "--roi", "0:16,10:90,0:120", "--train-batch", "2", "--eval-batch", "3", "--device", "cpu",
    "--normalize", "minmax:0,255", "--activation", "sigmoid", "--output-dtype", "float16",
    "--seams", "--threshold", "0.3", "--cache-mb", "64", "--feature-layer", "down_1",
    "--feature-layer", "final_conv", "--precision", "bf16", "--no-fuse-train",
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "model"),
    [
        ([], fake_model()),
        (FULL, fake_model()),
        (["--roi", "10:90,0:64", "--tile", "64,64"], fake_model(spatial_dims=2)),
        ([], fake_model(fixed_shape=(None, 64, 64))),
        (
            ["--activation", "softmax"],
            fake_model(
                preprocessing={"normalize": "percentile:1,99.8"},
                postprocessing={"activation": "sigmoid"},
            ),
        ),
    ],
    ids=["defaults", "every option", "2D roi", "fixed input size", "package defaults"],
)
def test_run_flags_give_the_configuration_run_command_built(extra, model):
    argv = ["run", "volume.npy", "--model", "model.pt", "--out", "out.zarr", *extra]
    args = build_parser().parse_args(argv)
    config = run_config_from_args(args, model, VOLUME)
    assert config == legacy_run_config(args, model, VOLUME)


def test_a_2d_roi_covers_the_whole_z_range():
    args = build_parser().parse_args(
        ["run", "v.npy", "--model", "m.pt", "--out", "o.zarr", "--roi", "10:90,0:64"]
    )
    config = run_config_from_args(args, fake_model(), VOLUME)
    assert config.roi == ((0, 24), (10, 90), (0, 64))


def test_a_bad_flag_value_names_the_flag():
    args = build_parser().parse_args(
        ["run", "v.npy", "--model", "m.pt", "--out", "o.zarr", "--halo", "1,x,2"]
    )
    with pytest.raises(NormcheckError, match="cannot read halo"):
        run_config_from_args(args, fake_model(), VOLUME)
