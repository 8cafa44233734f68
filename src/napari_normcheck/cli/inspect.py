"""``napari-normcheck inspect``: what a model is, what it accepts, and its normalization layers."""

from __future__ import annotations

import argparse
from typing import Any

from napari_normcheck.cli.model_args import add_model_arguments, load_model_from_args
from napari_normcheck.core.base.errors import NormcheckError


def add_inspect_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to ``sub`` (argparse subparsers)."""
    inspect = sub.add_parser("inspect", help="load a model and list its normalization layers")
    inspect.add_argument("model_path", metavar="MODEL")
    add_model_arguments(inspect, with_model=False)
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="bioimage.io package: reproduce its test output (exit 1 when it differs)",
    )
    inspect.set_defaults(handler=inspect_command)
    return inspect


def inspect_command(args: argparse.Namespace) -> int:
    """Print the model's layout, accepted shapes, outputs and normalization inventory."""
    from napari_normcheck.core.models.inventory import norm_inventory

    loaded = load_model_from_args(args, allow_probe_failure=True)
    info = loaded.info
    outputs = (
        f"{info.out_channels} output channel(s)" if not info.probe_error else "outputs unknown"
    )
    print(
        f"{loaded.path}: {loaded.format}, {info.n_parameters:,} parameters, "
        f"{info.in_channels} input channel(s), {outputs}, {info.spatial_dims}D"
    )
    print(info.describe_shapes())
    if info.outputs:
        print("the model returns: " + "; ".join(info.outputs))
    if loaded.input_channel_names or loaded.output_channel_names:
        print(f"channels: input {loaded.input_channel_names}, output {loaded.output_channel_names}")
    for note in loaded.notes:
        print(f"note: {note}")
    if info.probe_error:
        print(f"warning: no probe forward worked: {info.probe_error}")
        for trial in info.tried:
            print(f"  tried {trial}")
    if not loaded.switchable:
        print(f"warning: {loaded.not_switchable_reason}")
    print(norm_inventory(loaded.module).format_table())
    if getattr(args, "verify", False):
        return verify(args, loaded)
    return 0


def verify(args: argparse.Namespace, loaded) -> int:
    """Reproduce a bioimage.io package's test output; exit code 1 when it differs."""
    from napari_normcheck.core.models.bioimageio import verify_package

    if loaded.format != "bioimageio":
        raise NormcheckError("--verify needs a bioimage.io package (a folder or zip with rdf.yaml)")
    result = verify_package(args.model_path, loaded=loaded, trust_pickle=args.trust_pickle)
    verdict = "reproduced" if result.passed else "NOT reproduced"
    print(
        f"test output {verdict}: max abs difference {result.max_abs_diff:.3g} "
        f"(rtol {result.rtol:g}, atol {result.atol:g})"
    )
    return 0 if result.passed else 1
