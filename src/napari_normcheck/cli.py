"""The command line: ``napari-normcheck run | inspect | demo``; each subcommand wraps one core function."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from napari_normcheck.cli_model import (  # noqa: F401 (_load, open_inputs re-exported)
    _add_model_arguments,
    _load,
    _model_tile,
    _package_default,
    open_inputs,
)
from napari_normcheck.cli_remedies import (
    add_fold_parser,
    add_recalibrate_parser,
    add_remedies_arguments,
    check_remedies_arguments,
    run_remedies_after,
)
from napari_normcheck.core.errors import NormcheckError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = argparse.ArgumentParser(
        prog="napari-normcheck",
        description="Compare a segmentation network's predictions with train-mode and eval-mode "
        "normalization, tile by tile, over volumes larger than memory.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the two-mode check over a volume and write OUT.zarr")
    run.add_argument("volume", help="zarr / OME-Zarr / TIFF / .npy volume")
    _add_model_arguments(run)
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
        default=512,
        help="memory for unfinished output chunks before spilling to disk",
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
    run.set_defaults(handler=_run_command)
    add_remedies_arguments(run)
    add_recalibrate_parser(sub)
    add_fold_parser(sub)

    demo = sub.add_parser(
        "demo", help="run the packaged sample models on the packaged sample volume"
    )
    demo.add_argument("--out", default="normcheck-demo", help="folder for the outputs")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument(
        "--gui",
        action="store_true",
        help="open napari with the sample and run the batchnorm sample model in the dock widget",
    )
    demo.add_argument(
        "--screenshot",
        metavar="PATH",
        help="with --gui: save a screenshot of the window to PATH when the run ends, then quit",
    )
    demo.set_defaults(handler=_demo_command)

    inspect = sub.add_parser("inspect", help="load a model and list its normalization layers")
    inspect.add_argument("model_path", metavar="MODEL")
    _add_model_arguments(inspect, with_model=False)
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="bioimage.io package: reproduce its test output (exit 1 when it differs)",
    )
    inspect.set_defaults(handler=_inspect_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return int(args.handler(args) or 0)
    except NormcheckError as error:
        if args.debug:
            raise
        print(f"napari-normcheck: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-normcheck: interrupted; the output is incomplete", file=sys.stderr)
        return 130


def _run_command(args: argparse.Namespace) -> int:
    from napari_normcheck.core.config import RunConfig, parse_int_triple
    from napari_normcheck.core.tiling import parse_roi

    volume, loaded = open_inputs(args)
    info = loaded.info
    tile = parse_int_triple(args.tile, "tile") if args.tile else _model_tile(loaded, volume)
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
        normalize=args.normalize or _package_default(loaded, "normalize") or "none",
        activation=args.activation or _package_default(loaded, "activation") or "none",
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
        from napari_normcheck.core.report import write_report

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

    from napari_normcheck.core.distributed import run_events
    from napari_normcheck.core.engine import RunFinished, RunStarted, TileDone
    from napari_normcheck.core.inventory import norm_inventory
    from napari_normcheck.core.report import build_report, format_summary

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


def _demo_command(args: argparse.Namespace) -> int:
    from napari_normcheck.core.config import RunConfig
    from napari_normcheck.core.models import load_model
    from napari_normcheck.core.report import write_report
    from napari_normcheck.core.volume import open_volume
    from napari_normcheck.data import SAMPLE_MODELS, sample_volume

    if args.gui or args.screenshot:
        from napari_normcheck._qt.demo_gui import run_demo_gui

        out = Path(args.out) / "batchnorm-gui.zarr"
        out.parent.mkdir(parents=True, exist_ok=True)
        return run_demo_gui(args.screenshot, device=args.device, out=out)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    volume = open_volume(sample_volume())
    print(
        f"sample volume {volume.spatial_shape} (synthetic EM: membranes, organelles, empty resin)"
    )
    results = {}
    for name, sample in SAMPLE_MODELS.items():
        print(f"\n== {name}: {sample.description}")
        loaded = load_model(sample.path, arch=sample.arch, arch_kwargs=sample.arch_kwargs)
        config = RunConfig(
            tile=tuple(sample.tile),
            overlap=0.25,
            blend="gaussian",
            normalize=sample.normalize,
            activation=sample.activation,
            device=args.device,
        )
        report = run_and_report(volume, loaded, config, out_dir / f"{name}.zarr", overwrite=True)
        write_report(out_dir / f"{name}_report.json", report, overwrite=True)
        write_report(out_dir / f"{name}_report.csv", report, overwrite=True)
        results[name] = report
    print("\n== comparison (hard, per channel)")
    print(f"{'model':<10} {'disparity':<22} {'mismatch eval':<22} mismatch train")
    for name, report in results.items():

        def fmt(values):
            return " ".join(f"{v:.3f}" for v in values)

        print(
            f"{name:<10} {fmt(report['disparity']['hard']):<22} "
            f"{fmt(report['mismatch_eval']['hard']):<22} {fmt(report['mismatch_train']['hard'])}"
        )
    print(
        f"\noutputs and reports in {out_dir}/ (open a .zarr in napari with the napari-normcheck reader)"
    )
    return 0


def _inspect_command(args: argparse.Namespace) -> int:
    from napari_normcheck.core.inventory import norm_inventory

    loaded = _load(args, allow_probe_failure=True)
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
        return _verify(args, loaded)
    return 0


def _verify(args: argparse.Namespace, loaded) -> int:
    from napari_normcheck.core.bioimageio import verify_package

    if loaded.format != "bioimageio":
        raise NormcheckError("--verify needs a bioimage.io package (a folder or zip with rdf.yaml)")
    result = verify_package(args.model_path, loaded=loaded, trust_pickle=args.trust_pickle)
    verdict = "reproduced" if result.passed else "NOT reproduced"
    print(
        f"test output {verdict}: max abs difference {result.max_abs_diff:.3g} "
        f"(rtol {result.rtol:g}, atol {result.atol:g})"
    )
    return 0 if result.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
