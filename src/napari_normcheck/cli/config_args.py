"""The :class:`RunConfig` of a ``run`` command line: its flags over the model's own defaults."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from napari_normcheck.cli.model_args import model_tile, package_default
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.tiling import parse_roi
from napari_normcheck.core.io.intensity import default_normalize


def input_normalize(given: str | None, loaded: Any, volume: Any) -> str:
    """The input normalization: the flag's, else the model package's, else the input type's.

    Integer input (uint8 EM, uint16 light sheet) is normalized by default, as in the widget; a
    line on stderr says so, since it decides what the network sees.
    """
    if given:
        return given
    packaged = package_default(loaded, "normalize")
    if packaged:
        return packaged
    dtype = volume.dtype
    chosen = default_normalize(dtype)
    if chosen != "none":
        print(
            f"{dtype} input: normalized with {chosen} (the default for integer images); "
            "--normalize none feeds the raw intensities, --normalize minmax:LO,HI fixed ones",
            file=sys.stderr,
        )
    return chosen


def run_config_from_args(args: argparse.Namespace, loaded: Any, volume: Any) -> RunConfig:
    """The configuration the flags of ``run`` ask for.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``run`` subcommand (see ``add_run_parser``).
    loaded : LoadedModel
        The model: its fixed input size, bioimage.io pre/postprocessing and spatial dims fill
        what the flags leave out.
    volume : Volume
        The input; a 2D ``--roi y0:y1,x0:x1`` covers its whole z range.

    Returns
    -------
    RunConfig
        Validated; :class:`NormcheckError` names a flag whose value cannot be read.
    """
    roi = parse_roi(args.roi) if args.roi else None
    if roi is not None and len(roi) == 2:
        roi = ((0, volume.spatial_shape[0]), *roi)
    options = {
        "tile": args.tile,
        "overlap": args.overlap,
        "blend": args.blend,
        "halo": args.halo,
        "roi": roi,
        "train_batch": args.train_batch,
        "eval_batch": args.eval_batch,
        "device": args.device,
        "normalize": args.normalize,
        "activation": args.activation,
        "output_dtype": args.output_dtype,
        "seams": args.seams,
        "grid_shift": getattr(args, "grid_shift", None),
        "threshold": args.threshold,
        "min_foreground": args.min_foreground,
        "cache_mb": args.cache_mb,
        "threads": getattr(args, "threads", None),
        "feature_layers": tuple(args.feature_layer),
        "precision": args.precision,
        "fuse_train": not args.no_fuse_train,
    }
    return RunConfig.from_options(
        options,
        tile=model_tile(loaded, volume),
        normalize=input_normalize(args.normalize, loaded, volume),
        activation=package_default(loaded, "activation"),
        spatial_dims=loaded.info.spatial_dims,
    )
