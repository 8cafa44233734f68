"""``napari-normcheck run``: the two-mode check over a volume, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from napari_normcheck.cli.model_args import (
    add_model_arguments,
    model_tile,
    open_inputs,
    package_default,
)
from napari_normcheck.cli.remedies import (
    add_remedies_arguments,
    check_remedies_arguments,
    run_remedies_after,
)


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to ``sub`` (argparse subparsers)."""
    run = sub.add_parser("run", help="run the two-mode check over a volume and write OUT.zarr")
    run.add_argument("volume", help="zarr / OME-Zarr / TIFF / .npy volume")
    add_model_arguments(run)
    run.add_argument("--out", required=True, help="output OUT.zarr folder")
    run.add_argument("--dataset", help="array path inside a zarr group")
    run.add_argument("--level", type=int, default=0, help="OME-Zarr multiscale level (0 = full)")
    run.add_argument("--channel-axis", type=int, default=None, help="channel axis of the input")
    run.add_argument("--roi", help="region of interest z0:z1,y0:y1,x0:x1")
    run.add_argument("--tile", help="tile Z,Y,X (Y,X or 1,Y,X for a 2D model)")
    run.add_argument("--overlap", type=float, default=0.25, help="tile overlap in [0, 1)")
    run.add_argument("--blend", choices=("constant", "gaussian", "crop"), default="gaussian")
    run.add_argument("--halo", help="context Z,Y,X on each side of a tile in crop mode")
    run.add_argument("--train-batch", type=int, default=1, help="tiles per train-mode forward")
    run.add_argument("--eval-batch", type=int, default=None, help="tiles per eval-mode forward")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--precision",
        choices=("fp32", "tf32", "bf16", "fp16"),
        default="fp32",
        help="forward precision (reduced precision changes the predictions: the report says by "
        "how much on a few tiles); normalization buffers always stay float32",
    )
    run.add_argument(
        "--no-fuse-train",
        action="store_true",
        help="on CUDA, run the train pass one tile per forward instead of several tiles with "
        "per-tile statistics (same result to float rounding)",
    )
    run.add_argument(
        "--normalize",
        default=None,
        help="none | minmax:LO,HI | meanstd:MEAN,STD | percentile:P_LO,P_HI | zscore",
    )
    run.add_argument("--activation", choices=("none", "sigmoid", "softmax"), default=None)
    run.add_argument(
        "--output-dtype",
        choices=("auto", "float32", "float16", "uint8"),
        default="auto",
        help="stored predictions and disparity: auto = uint8 (0-255) after an activation, "
        "float32 for logits",
    )
    run.add_argument(
        "--seams",
        action="store_true",
        help="also store the seams voxel maps (largest disagreement of overlapping tiles)",
    )
    run.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    run.add_argument(
        "--cache-mb",
        type=int,
        default=256,
        help="memory (MB) for unfinished output chunks (and half as much for overlap slabs) "
        "before spilling to disk",
    )
    run.add_argument(
        "--feature-layer",
        action="append",
        default=[],
        metavar="NAME",
        help="also record per-tile input statistics of this module (repeatable)",
    )
    run.add_argument("--report", help="write the report: report.json or report.csv (per tile)")
    run.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUT (and report)"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in OUT (same options); finished chunks are kept",
    )
    run.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on a running dask.distributed cluster: its scheduler address (tcp://host:8786)",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run on a local dask.distributed cluster of N worker processes (1 thread each)",
    )
    run.set_defaults(handler=run_command)
    add_remedies_arguments(run)
    return run


def run_command(args: argparse.Namespace) -> int:
    """Run the check (and the remedies when asked), write the report; exit code."""
    from napari_normcheck.core.base.config import RunConfig, parse_int_triple
    from napari_normcheck.core.base.tiling import parse_roi

    volume, loaded = open_inputs(args)
    info = loaded.info
    tile = parse_int_triple(args.tile, "tile") if args.tile else model_tile(loaded, volume)
    roi = parse_roi(args.roi) if args.roi else None
    if roi is not None and len(roi) == 2:
        roi = ((0, volume.spatial_shape[0]), *roi)
    config = RunConfig(
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
    check_remedies_arguments(args)  # before the long check, not after it
    if info.output_activation and config.activation != "none":
        print(
            f"napari-normcheck: warning: the model's outputs already are probabilities "
            f"({info.output_activation} inside it); --activation {config.activation} applies "
            "another one",
            file=sys.stderr,
        )
    report = run_and_report(
        volume,
        loaded,
        config,
        args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        scheduler=args.scheduler,
        n_workers=args.workers,
        volume_source={
            "source": args.volume,
            "dataset": args.dataset,
            "level": args.level,
            "channel_axis": args.channel_axis if args.channel_axis is not None else "auto",
        },
        trust_pickle=args.trust_pickle,
    )
    remedies = run_remedies_after(args, args.out, loaded, volume)
    if remedies:
        report["remedies"] = remedies
    if args.report:
        from napari_normcheck.core.run.report import write_report

        write_report(args.report, report, overwrite=args.overwrite)
        print(f"report: {args.report}")
    return 0


def run_and_report(
    volume,
    loaded,
    config,
    out,
    *,
    overwrite: bool = False,
    resume: bool = False,
    scheduler: str | None = None,
    n_workers: int | None = None,
    volume_source: dict | None = None,
    trust_pickle: bool = False,
) -> dict:
    """Run the check with a progress bar on stderr, print the summary; return the report."""
    from tqdm import tqdm

    from napari_normcheck.core.models.inventory import norm_inventory
    from napari_normcheck.core.run.distributed import run_events
    from napari_normcheck.core.run.engine import RunFinished, RunStarted, TileDone
    from napari_normcheck.core.run.report import build_report, format_summary

    info = loaded.info
    inventory = norm_inventory(loaded.module)
    attrs = {
        "model": {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            "format": loaded.format,
            "output": loaded.output_choice.describe(),
            "divisor": list(info.divisor),
            "fixed_shape": None if info.fixed_shape is None else list(info.fixed_shape),
        },
        "norm_layers": inventory.to_dict(),
    }
    events = run_events(
        volume,
        loaded,
        config,
        out,
        scheduler=scheduler,
        n_workers=n_workers,
        volume_source=volume_source,
        trust_pickle=trust_pickle,
        overwrite=overwrite,
        spatial_dims=info.spatial_dims,
        divisor=info.divisor,
        extra_attrs=attrs,
        resume=resume,
    )
    bar = None
    report: dict = {}
    for event in events:
        if isinstance(event, RunStarted):
            bar = tqdm(
                total=event.plan.n_tiles,
                unit="tile",
                file=sys.stderr,
                desc=f"two-mode check on {event.device}",
            )
        elif isinstance(event, TileDone) and bar is not None:
            bar.total = event.n_total
            bar.update(1)
        elif isinstance(event, RunFinished):
            if bar is not None:
                bar.close()
            report = build_report(event.summary, attrs | _store_attrs(event.out))
            print(
                f"wrote {event.out} ({event.summary['n_tiles']} tiles, "
                f"{event.summary['timing']['total']:.1f} s)"
            )
            print(format_summary(report))
    return report


def _store_attrs(out) -> dict:
    import zarr

    return dict(zarr.open_group(str(out), mode="r").attrs["normcheck"])
