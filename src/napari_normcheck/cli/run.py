"""``napari-normcheck run``: the two-mode check over a volume, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from napari_normcheck.cli.config_args import run_config_from_args
from napari_normcheck.cli.model_args import add_model_arguments, open_inputs
from napari_normcheck.cli.remedies import (
    add_remedies_arguments,
    check_remedies_arguments,
    remedies_options,
    remedies_wanted,
    report_remedies,
)
from napari_normcheck.core.base.config import DEFAULT_CACHE_MB


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to ``sub`` (argparse subparsers)."""
    run = sub.add_parser("run", help="run the two-mode check over a volume and write OUT.zarr")
    run.add_argument(
        "volume",
        help="zarr / OME-Zarr / TIFF / .npy volume; zarr and OME-Zarr also by URL "
        "(http(s)://, s3://), read lazily",
    )
    run.add_argument(
        "--storage-options",
        metavar="JSON",
        help="fsspec options of a URL volume, e.g. '{\"anon\": true}' or "
        '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\' (S3 also reads the usual '
        "AWS environment)",
    )
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
    run.add_argument(
        "--eval-batch",
        type=int,
        default=None,
        help="tiles per eval-mode forward (default: 1 on the CPU, the most that fit on a GPU); "
        "a tile's result equals its batch-1 forward up to the convolutions' float32 rounding",
    )
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
        help="none | minmax:LO,HI | meanstd:MEAN,STD | percentile:P_LO,P_HI | zscore (default: "
        "the model package's, else percentile:1,99.8 for integer input and none for float)",
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
    run.add_argument(
        "--grid-shift",
        type=float,
        nargs="?",
        const=0.5,
        default=None,
        metavar="F",
        help="also predict on a second grid shifted by round(F * step) voxels along each tiled "
        "axis (F in (0, 1), 0.5 without a value) and report 1 - Dice of the two stitched "
        "results: does the result depend on where the tiles fall? Costs one more set of "
        "forwards per prediction",
    )
    run.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    run.add_argument(
        "--min-foreground",
        metavar="VOXELS[,FRACTION]",
        default=None,
        help="judge a hard Dice (disparity, tile mismatch; global and per tile) only where eval "
        "and train together have at least VOXELS foreground voxels and FRACTION of the voxels "
        "compared (default 1000,0.001: below it one flipped voxel moves 1 - Dice by more than a "
        "tenth of the verdict's 0.02 step); elsewhere it is 'not judged' and the soft Dice "
        "speaks for it. 0,0 judges everything",
    )
    run.add_argument(
        "--cache-mb",
        type=int,
        default=DEFAULT_CACHE_MB,
        help="memory (MB) for unfinished output chunks (and half as much for overlap slabs) "
        "before spilling to a scratch file in OUT (default %(default)s)",
    )
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads torch uses for the forwards and the per-voxel work while tiles run, "
        "per process (each --workers worker uses N); the setting is restored after the run. "
        "Default 0: torch's own choice, which follows OMP_NUM_THREADS (else all cores). "
        "Results do not depend on it",
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
    from napari_normcheck.core.io.remote import parse_storage_options

    volume, loaded = open_inputs(args)
    info = loaded.info
    config = run_config_from_args(args, loaded, volume)
    check_remedies_arguments(args)  # before the long check, not after it
    if info.output_activation and config.activation != "none":
        print(
            f"napari-normcheck: warning: the model's outputs already are probabilities "
            f"({info.output_activation} inside it); --activation {config.activation} applies "
            "another one",
            file=sys.stderr,
        )
    stop = StopSignals()
    with stop:
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
                # Workers read a URL themselves, with the same options (never a local cache).
                "storage_options": parse_storage_options(args.storage_options),
            },
            trust_pickle=args.trust_pickle,
            remedies=remedies_options(args) if remedies_wanted(args) else None,
            on_remedies=lambda finished: report_remedies(args, finished, loaded),
            stop=stop,
        )
    if stop.signum is not None and not report:  # a signal after the run finished stops nothing
        print(f"napari-normcheck: {stopped_message(args, stop.signum)}", file=sys.stderr)
        return 128 + stop.signum
    if args.report:
        from napari_normcheck.core.run.report import write_report

        write_report(args.report, report, overwrite=args.overwrite)
        print(f"report: {args.report}")
    return 0


def warn_if_logits(info, activation: str) -> None:
    """Say on stderr when ``activation`` leaves the model's outputs as logits."""
    if info.logits_with(activation):
        print(
            "napari-normcheck: warning: the model's outputs are not probabilities (no sigmoid or "
            "softmax inside it); with --activation none the hard Dice thresholds the raw outputs "
            "and no soft Dice is judged: pass the activation it was trained with, --activation "
            "sigmoid (independent channels) or softmax (classes)",
            file=sys.stderr,
        )


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
    remedies: dict | None = None,
    on_remedies: Callable[[Any], dict] | None = None,
    stop: StopSignals | None = None,
    warn_logits: bool = True,
) -> dict:
    """Run the check with a progress bar on stderr, print the summary; return the report.

    With ``remedies`` (keyword arguments of
    :func:`~napari_normcheck.core.remedies.check_remedies.check_with_remedies`) the remedies are
    predicted in the same run; ``on_remedies`` then gets the last event and returns the report's
    ``remedies`` entry. When ``stop`` caught a signal, the run is closed after the current tile
    (the writer finishes its chunks, the progress is saved) and the report is empty. With
    ``warn_logits``, a model's logits left as they are (``--activation none``) are named on stderr
    when the run starts.
    """
    from tqdm import tqdm

    from napari_normcheck.core.models.inventory import norm_inventory
    from napari_normcheck.core.remedies.check_remedies import check_with_remedies
    from napari_normcheck.core.remedies.recalibrate import RecalibrationProgress
    from napari_normcheck.core.remedies.remedy_run import RemediesFinished
    from napari_normcheck.core.run.distributed import run_events
    from napari_normcheck.core.run.events import RunFinished, RunStarted, TileDone
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
            **info.recorded_outputs(),
        },
        "norm_layers": inventory.to_dict(),
    }
    run = run_events if remedies is None else check_with_remedies
    events = run(
        volume,
        loaded,
        config,
        out,
        **(remedies or {}),
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
    try:
        for event in events:
            if stop is not None and stop.signum is not None:
                events.close()  # the run's own cleanup: pending chunks written, progress saved
                if bar is not None:
                    bar.close()
                return {}
            if isinstance(event, RecalibrationProgress) and event.stage == "calibration":
                if bar is None:
                    bar = tqdm(
                        total=event.n_total, unit="batch", file=sys.stderr, desc="recalibrate"
                    )
                bar.update(1)
                if event.n_done >= event.n_total:  # not open while a cluster starts
                    bar.close()
                    bar = None
            elif isinstance(event, RunStarted):
                if bar is not None:
                    bar.close()
                if warn_logits:
                    # Once the run has started: a run refused at the door says why, alone.
                    warn_if_logits(info, config.activation)
                desc = (
                    "check with remedies" if remedies and remedies["remedies"] else "two-mode check"
                )
                bar = tqdm(
                    total=event.plan.n_tiles,
                    unit="tile",
                    file=sys.stderr,
                    desc=f"{desc} on {event.device}",
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
            elif isinstance(event, RemediesFinished) and on_remedies is not None:
                report["remedies"] = on_remedies(event)
    finally:
        if bar is not None:  # an error's line starts on a line of its own
            bar.close()
    return report


def _store_attrs(out) -> dict:
    import zarr

    return dict(zarr.open_group(str(out), mode="r").attrs["normcheck"])


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM during a run: stop after the current tile, keeping its work.

    A batch scheduler's time limit sends SIGTERM; the run then ends like a Ctrl-C: reading stops,
    the writer finishes the chunks it has, the progress is saved. A second Ctrl-C stops at once
    (a ``KeyboardInterrupt``; the progress is still saved). Handlers are installed only on the
    main thread (elsewhere signals are not delivered to Python code).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nnapari-normcheck: {signal.Signals(signum).name}: stopping after the current tile "
            "(Ctrl-C again to stop at once)",
            file=sys.stderr,
        )


def stopped_message(args: argparse.Namespace, signum: int | None) -> str:
    """The line a stopped run ends with: what OUT keeps and the command that resumes it."""
    from napari_normcheck.core.io.store import saved_work

    name = "interrupted" if signum in (None, signal.SIGINT) else signal.Signals(signum).name
    kept = saved_work(args.out) if getattr(args, "out", None) else None
    if kept is None:
        return f"{name}; the output is incomplete"
    argv = [a for a in getattr(args, "argv", []) if a not in ("--overwrite", "--resume")]
    command = shlex.join(["napari-normcheck", *argv, "--resume"])
    return f"{name}: {kept} are saved in {args.out}; resume with: {command}"
