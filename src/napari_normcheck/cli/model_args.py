"""The model flags every subcommand shares, and loading the model and the volume they name."""

from __future__ import annotations

import argparse
from typing import Any

from napari_normcheck.core.base.errors import NormcheckError


def add_model_arguments(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    """Add the model file and how to load it (architecture, layout, trust, output choice)."""
    if with_model:
        parser.add_argument("--model", required=True, dest="model_path", help="model file")
    parser.add_argument("--arch", help="architecture callable: package.module:Name or file.py:Name")
    parser.add_argument("--arch-kwargs", help="architecture keyword arguments: JSON or @file.json")
    parser.add_argument(
        "--arch-spec",
        metavar="SPEC",
        help='architecture spec file (JSON or YAML): {"arch": ..., "kwargs": {...}}; '
        "--arch / --arch-kwargs given as well replace its values",
    )
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None)
    parser.add_argument("--in-channels", type=int, default=None, help="input channels of the model")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a pickled module or a bioimage.io package's architecture source "
        "(runs code from the file)",
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--output-index",
        type=int,
        metavar="N",
        help="the model returns a tuple or list: use item N as the prediction (default: the first "
        "full-resolution tensor)",
    )
    choice.add_argument(
        "--output-key", metavar="NAME", help="the model returns a dict: use this key"
    )


def load_model_from_args(args: argparse.Namespace, *, allow_probe_failure: bool = False):
    """Load the model the flags of :func:`add_model_arguments` name."""
    from napari_normcheck.core.models.models import load_model

    arch, arch_kwargs = architecture_from_args(args)
    return load_model(
        args.model_path,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=args.trust_pickle,
        spatial_dims=args.spatial_dims,
        in_channels=args.in_channels,
        output_index=args.output_index,
        output_key=args.output_key,
        allow_probe_failure=allow_probe_failure,
    )


def architecture_from_args(args: argparse.Namespace) -> tuple[str | None, Any]:
    """The architecture and its keyword arguments: ``--arch-spec``, overridden by the single flags."""
    from napari_normcheck.core.models.arch import read_arch_spec

    arch, arch_kwargs = args.arch, args.arch_kwargs
    if getattr(args, "arch_spec", None):
        spec_arch, spec_kwargs = read_arch_spec(args.arch_spec)
        arch = arch or spec_arch
        arch_kwargs = arch_kwargs if arch_kwargs is not None else spec_kwargs
    return arch, arch_kwargs


def open_inputs(args: argparse.Namespace):
    """The volume and the model of a ``run`` or ``recalibrate`` command, checked against each other.

    Returns
    -------
    volume : Volume
        The lazily opened input.
    loaded : LoadedModel
        The model, with switchable normalization and the volume's channel count.
    """
    from napari_normcheck.core.io.remote import parse_storage_options
    from napari_normcheck.core.io.volume import open_volume

    volume = open_volume(
        args.volume,
        dataset=args.dataset,
        level=args.level,
        channel_axis=args.channel_axis if args.channel_axis is not None else "auto",
        storage_options=parse_storage_options(getattr(args, "storage_options", None)),
    )
    tile_given = bool(getattr(args, "tile", None))
    # With a tile of the user's, that tile is tried with a forward even if the probe found none.
    loaded = load_model_from_args(args, allow_probe_failure=tile_given)
    if not loaded.switchable:
        raise NormcheckError(
            loaded.not_switchable_reason or "the model's normalization mode is fixed"
        )
    if volume.n_channels != loaded.info.in_channels:
        raise NormcheckError(
            f"the volume has {volume.n_channels} channel(s) but the model expects "
            f"{loaded.info.in_channels}; pick the matching image or pass --channel-axis"
        )
    return volume, loaded


def model_tile(loaded, volume) -> tuple[int, int, int] | None:
    """The tile a model with a fixed input size needs (None: the run picks one)."""
    from napari_normcheck.core.run.planning import default_tile

    info = loaded.info
    if info.fixed_shape is None:
        return None
    dims = info.spatial_dims
    tile = list(default_tile(volume.spatial_shape, dims, info.divisor))
    for axis, side in zip(range(3 - dims, 3), info.fixed_shape):
        if side is not None:
            tile[axis] = side
    return tuple(tile)  # type: ignore[return-value]


def package_default(loaded, key: str) -> str | None:
    """A bioimage.io package's own preprocessing or postprocessing, used when not given."""
    source = loaded.preprocessing if key == "normalize" else loaded.postprocessing
    return (source or {}).get(key)
