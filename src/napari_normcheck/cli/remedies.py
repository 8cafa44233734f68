"""Command-line pieces for the remedies: ``napari-normcheck recalibrate`` and ``run --remedies``.

Wired into :mod:`napari_normcheck.cli` by three calls (see the module's README section):
``add_recalibrate_parser(sub)`` in ``build_parser``, ``add_remedies_arguments(run)`` on the ``run``
parser, and, in ``run``, :func:`remedies_options` for the run with remedies and
:func:`report_remedies` at its end (its dictionary goes into the report under ``remedies``).
Errors are :class:`~napari_normcheck.core.base.errors.NormcheckError`; ``cli.main`` prints them and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_normcheck.core.base.errors import NormcheckError


def add_recalibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``recalibrate VOLUME --model ... --out-model FILE`` to the ``subparsers`` of the CLI.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``parser.add_subparsers()`` returned.

    Returns
    -------
    argparse.ArgumentParser
        The new subcommand's parser (its handler is :func:`recalibrate_command`).
    """
    from napari_normcheck.cli.model_args import add_model_arguments

    parser = subparsers.add_parser(
        "recalibrate",
        help="re-estimate the running statistics of a copy of the model on a volume and export it",
        description="Precise BatchNorm / AdaBN: reset the running statistics of every layer that "
        "keeps them and re-estimate them as exact averages over tiles sampled across the volume, "
        "with only the normalization layers in train mode. The input model file is never changed.",
    )
    parser.add_argument("volume", help="zarr / OME-Zarr / TIFF / .npy volume")
    add_model_arguments(parser)
    parser.add_argument(
        "--out-model",
        required=True,
        help="state_dict file to write (never overwritten); FILE.json gets the provenance, and a "
        "TorchScript input also gives FILE-stem.scripted.pt",
    )
    parser.add_argument("--dataset", help="array path inside a zarr group")
    parser.add_argument("--level", type=int, default=0, help="OME-Zarr multiscale level")
    parser.add_argument("--channel-axis", type=int, default=None, help="channel axis of the input")
    parser.add_argument("--roi", help="sample tiles only in z0:z1,y0:y1,x0:x1")
    parser.add_argument("--tile", help="training tile Z,Y,X (Y,X for a 2D model)")
    parser.add_argument("--batch-size", type=int, default=1, help="tiles per batch, as in training")
    parser.add_argument("--tiles", type=int, default=32, help="tiles to estimate from")
    parser.add_argument("--holdout", type=int, default=4, help="extra tiles to measure the effect")
    parser.add_argument(
        "--variance",
        choices=("mean", "pooled"),
        default="mean",
        help="mean of per-batch variances (as training accumulates) or pooled over all voxels",
    )
    _add_mask_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the tile positions")
    parser.add_argument(
        "--normalize",
        default=None,
        help="input normalization as in run (none | minmax:LO,HI | percentile:P_LO,P_HI | ...)",
    )
    parser.add_argument("--activation", choices=("none", "sigmoid", "softmax"), default=None)
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.set_defaults(handler=recalibrate_command)
    return parser


def add_fold_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fold MODEL --arch ... --out-model FILE`` (BatchNorm folded into convolutions)."""
    from napari_normcheck.cli.model_args import add_model_arguments

    parser = subparsers.add_parser(
        "fold",
        help="fold BatchNorm into the preceding convolutions and export TorchScript (faster eval)",
        description="Eval-mode BatchNorm after a convolution is absorbed into its weights; the eval "
        "output stays the same (float rounding) and the time of a forward is printed.",
    )
    parser.add_argument("model_path", metavar="MODEL")
    add_model_arguments(parser, with_model=False)
    parser.add_argument("--out-model", required=True, help="TorchScript file (never overwritten)")
    parser.add_argument("--tile", help="tile Z,Y,X for the timing (Y,X for a 2D model)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over 3 random tiles")
    parser.set_defaults(handler=fold_command)
    return parser


def fold_command(args: argparse.Namespace) -> int:
    """``napari-normcheck fold``: fold, compare and time on random tiles, export."""
    import datetime

    import torch

    from napari_normcheck.cli.model_args import load_model_from_args
    from napari_normcheck.core.base.config import parse_int_triple
    from napari_normcheck.core.remedies.fold import export_folded, fold_batchnorm, fold_speedup

    if Path(args.out_model).exists():
        raise NormcheckError(
            f"{args.out_model} already exists and is never overwritten; choose another --out-model"
        )
    loaded = load_model_from_args(args)
    info = loaded.info
    result = fold_batchnorm(loaded.module)
    if not result.folded:
        raise NormcheckError(
            "no BatchNorm directly follows a convolution in a Sequential here: nothing to fold"
        )
    divisor = info.divisor or 16
    divisors = (divisor,) * info.spatial_dims if isinstance(divisor, int) else tuple(divisor)
    if args.tile:
        tile = parse_int_triple(args.tile, "tile")[3 - info.spatial_dims :]
    else:
        tile = tuple(max(d, 64 - 64 % d) for d in divisors)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand((1, info.in_channels, *tile), generator=generator) for _ in range(3)]
    timing = fold_speedup(loaded.module, result.model, inputs, repeats=args.repeats)
    provenance = {
        "kind": "napari-normcheck folded BatchNorm",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_model": {"path": str(loaded.path), "sha256": loaded.sha256},
        "folded": [list(pair) for pair in result.folded],
        "skipped": result.skipped,
        "timing": timing,
    }
    path = export_folded(result, args.out_model, provenance)
    print(
        f"folded {len(result.folded)} BatchNorm layer(s) ({len(result.skipped)} left); eval on 3 "
        f"random tiles {tuple(tile)}: {timing['seconds_original']:.3f} s -> "
        f"{timing['seconds_folded']:.3f} s (speed-up {timing['speedup']:.2f}), largest output "
        f"difference {timing['max_abs_difference']:.2e}"
    )
    print(f"wrote {path}")
    return 0


def _add_mask_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(
        f"--{prefix}mask-below",
        type=float,
        default=None,
        metavar="V",
        help="raw intensities below V are not content (dark background)",
    )
    parser.add_argument(
        f"--{prefix}mask-above",
        type=float,
        default=None,
        metavar="V",
        help="raw intensities above V are not content (bright empty resin)",
    )
    parser.add_argument(
        f"--{prefix}min-content",
        type=float,
        default=0.5,
        help="skip tiles with a smaller fraction of content voxels (padding never counts)",
    )


def add_remedies_arguments(run_parser: argparse.ArgumentParser) -> None:
    """Add ``--remedies``, ``--labels``, ``--label-map`` and their options to the ``run`` parser."""
    group = run_parser.add_argument_group("remedies and ground truth")
    group.add_argument(
        "--remedies",
        action="store_true",
        help="also predict with recalibrated running statistics and with per-tile batch "
        "statistics, write them to OUT and compare them",
    )
    group.add_argument("--labels", help="ground-truth labels on the input's voxel grid")
    group.add_argument("--labels-dataset", help="array path inside a zarr group of labels")
    group.add_argument(
        "--label-map",
        help="label value(s) -> output channel as JSON, e.g. '{\"255\": 0}' or '{\"1,2\": 1}'",
    )
    group.add_argument(
        "--ignore-label",
        type=int,
        action="append",
        default=[],
        metavar="V",
        help="label value outside the labelled region (repeatable)",
    )
    group.add_argument(
        "--recalibration-tiles", type=int, default=32, help="tiles to recalibrate from"
    )
    group.add_argument("--recalibration-holdout", type=int, default=4, help="held-out tiles")
    group.add_argument("--recalibration-variance", choices=("mean", "pooled"), default="mean")
    group.add_argument(
        "--recalibrated-model",
        metavar="FILE",
        help="also export the recalibrated model as a state_dict (never overwritten)",
    )
    # In run the masks only choose recalibration tiles; the prefix keeps run's options apart.
    _add_mask_arguments(run_parser, prefix="recalibration-")


def check_remedies_arguments(args: argparse.Namespace) -> None:
    """Fail before the (long) check when the remedy options cannot work.

    Raises
    ------
    NormcheckError
        For a label map that does not parse, labels without a map or a missing labels file, or an
        export target that exists.
    """
    from napari_normcheck.core.measure.labels import parse_label_map

    labels = getattr(args, "labels", None)
    if getattr(args, "label_map", None) is not None and labels is None:
        raise NormcheckError("--label-map needs --labels (the ground-truth label volume)")
    if labels is not None:
        if args.label_map is None:
            raise NormcheckError(
                "labels need a mapping from label values to output channels: add --label-map '{\"1\": 0}'"
            )
        parse_label_map(args.label_map)
        if not Path(labels).exists():
            raise NormcheckError(f"labels {labels} not found; check the path")
    target = getattr(args, "recalibrated_model", None)
    if target is not None:
        if not args.remedies:
            raise NormcheckError("--recalibrated-model needs --remedies")
        _check_export_free(target, scripted=False)


def _check_export_free(path: str, scripted: bool) -> None:
    from napari_normcheck.core.remedies.recalibrate_export import export_paths

    for target in export_paths(path, scripted).values():
        if target.exists():
            raise NormcheckError(
                f"{target} already exists and is never overwritten; choose another file"
            )


def remedies_wanted(args: argparse.Namespace) -> bool:
    """Whether ``run`` was asked for the remedies or for Dice against labels."""
    return bool(getattr(args, "remedies", False) or getattr(args, "labels", None))


def remedies_options(args: argparse.Namespace) -> dict[str, Any]:
    """The remedies' keyword arguments of a run, from ``run``'s arguments.

    They are those of :func:`~napari_normcheck.core.remedies.check_remedies.check_with_remedies`,
    from the options of :func:`add_remedies_arguments`.
    """
    from napari_normcheck.core.measure.labels import open_labels
    from napari_normcheck.core.remedies.variants import REMEDIES

    check_remedies_arguments(args)
    labels = (
        open_labels(args.labels, dataset=args.labels_dataset) if args.labels is not None else None
    )
    return {
        "remedies": REMEDIES if args.remedies else (),
        "labels": labels,
        "label_map": args.label_map,
        "ignore_labels": tuple(args.ignore_label),
        "recalibration": {
            "n_tiles": args.recalibration_tiles,
            "holdout": args.recalibration_holdout,
            "variance": args.recalibration_variance,
            "mask_below": args.recalibration_mask_below,
            "mask_above": args.recalibration_mask_above,
            "min_content": args.recalibration_min_content,
        },
    }


def report_remedies(args: argparse.Namespace, finished: Any, loaded: Any) -> dict[str, Any]:
    """Print the remedies table, export the recalibrated model when asked; return the table.

    Parameters
    ----------
    args : argparse.Namespace
        The ``run`` arguments.
    finished : RemediesFinished
        The last event of the run.
    loaded : LoadedModel
        The model (its path goes into the export's provenance).
    """
    from napari_normcheck.core.remedies.recalibrate_export import export_recalibrated

    result = finished.remedies
    print(format_remedies(result))
    if args.recalibrated_model and finished.recalibration is not None:
        paths = export_recalibrated(
            finished.recalibration, args.recalibrated_model, input_path=loaded.path
        )
        print("recalibrated model: " + ", ".join(str(p) for p in paths.values()))
    return result


def format_remedies(result: dict[str, Any]) -> str:
    """The comparison table (hard values per channel) and the notes, as printed text."""
    from napari_normcheck.core.remedies.table import ROW_TITLES, ROWS

    def fmt(values: Any) -> str:
        return " ".join(f"{v:.3f}" for v in values) if values else "-"

    lines = [f"{'':<18} {'disparity vs train':<20} {'tile mismatch':<20} Dice vs labels"]
    for row in ROWS:
        entry = result.get(row)
        if entry is None:
            continue
        dice = (entry.get("dice_vs_labels") or {}).get("hard")
        lines.append(
            f"{ROW_TITLES[row]:<18} {fmt(entry['disparity_vs_train']['hard']):<20} "
            f"{fmt(entry['mismatch']['hard']):<20} {fmt(dice)}"
        )
    holdout = (result.get("recalibration") or {}).get("holdout")
    if holdout:
        lines.append(
            f"held-out tiles ({holdout['n_tiles']}): disparity before {fmt(holdout['before']['hard'])}"
            f", after recalibration {fmt(holdout['after']['hard'])}"
        )
    lines.extend(f"note: {note}" for note in result.get("notes", []))
    return "\n".join(lines)


def recalibrate_command(args: argparse.Namespace) -> int:
    """``napari-normcheck recalibrate``: recalibrate a copy of the model and export it."""
    from tqdm import tqdm

    from napari_normcheck.cli.config_args import input_normalize
    from napari_normcheck.cli.model_args import open_inputs, package_default
    from napari_normcheck.core.base.config import parse_int_triple
    from napari_normcheck.core.base.tiling import parse_roi
    from napari_normcheck.core.io.intensity import resolve_intensity
    from napari_normcheck.core.remedies.recalibrate import (
        RecalibrationConfig,
        RecalibrationDone,
        RecalibrationProgress,
        iter_recalibrate,
    )
    from napari_normcheck.core.remedies.recalibrate_export import export_recalibrated
    from napari_normcheck.core.run.planning import check_tile, default_tile

    volume, loaded = open_inputs(args)
    from torch.jit import ScriptModule

    _check_export_free(args.out_model, isinstance(loaded.module, ScriptModule))
    info = loaded.info
    tile = (
        parse_int_triple(args.tile, "tile")
        if args.tile
        else default_tile(volume.spatial_shape, info.spatial_dims, info.divisor or 16)
    )
    check_tile(tile, info.spatial_dims, info.divisor)
    roi = parse_roi(args.roi) if args.roi else None
    if roi is not None and len(roi) == 2:
        roi = ((0, volume.spatial_shape[0]), *roi)
    normalize = input_normalize(args.normalize, loaded, volume)
    config = RecalibrationConfig(
        tile=tile,
        batch_size=args.batch_size,
        n_tiles=args.tiles,
        holdout=args.holdout,
        variance=args.variance,
        seed=args.seed,
        roi=roi,
        mask_below=args.mask_below,
        mask_above=args.mask_above,
        min_content=args.min_content,
        activation=args.activation or package_default(loaded, "activation") or "none",
        threshold=args.threshold,
        device=args.device,
    )
    transform = resolve_intensity(normalize, volume.data)
    result = None
    with tqdm(unit="batch", file=sys.stderr, desc="calibration") as bar:
        for event in iter_recalibrate(
            loaded.module,
            volume,
            config,
            transform=transform,
            spatial_dims=info.spatial_dims,
            source_model={
                "path": str(loaded.path),
                "sha256": loaded.sha256,
                "format": loaded.format,
            },
        ):
            if isinstance(event, RecalibrationProgress):
                if event.stage != bar.desc:  # one bar per stage: calibration, then holdout
                    bar.reset(total=event.n_total)
                    bar.set_description(event.stage)
                bar.update(1)
            elif isinstance(event, RecalibrationDone):
                result = event.result
    assert result is not None
    paths = export_recalibrated(result, args.out_model, input_path=loaded.path)
    provenance = result.provenance
    print(
        f"recalibrated {len(provenance['layers'])} layer(s) from {provenance['n_batches']} "
        f"batch(es) of {config.batch_size} tile(s) {tuple(tile)} ({config.variance} variance; "
        f"{provenance['tiles_rejected_by_mask']} tile(s) skipped by the mask)"
    )
    if result.holdout:
        before = " ".join(f"{v:.3f}" for v in result.holdout["before"]["hard"])
        after = " ".join(f"{v:.3f}" for v in result.holdout["after"]["hard"])
        print(
            f"held-out tiles ({result.holdout['n_tiles']}): disparity vs train mode per channel "
            f"{before} before, {after} after"
        )
    for note in provenance.get("notes", []):
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
