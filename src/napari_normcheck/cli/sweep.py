"""``napari-normcheck sweep``: the check at several tile sizes, overlaps and blendings, tabulated.

Each setting runs exactly as ``run`` would (the same code, so a row holds the numbers a single run
at that setting gives) into its own OUT under ``--out``; the rows, the recommendation
(:func:`~napari_normcheck.core.run.sweep.recommend`) and a plot are written at the end. With
``--sample N`` every setting runs on the same N regions
(:mod:`~napari_normcheck.core.run.sweep_sample`), each its own OUT in the setting's folder, and the
row pools their Dice sums.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from napari_normcheck.cli.model_args import add_model_arguments, open_inputs
from napari_normcheck.core.base.config import DEFAULT_CACHE_MB
from napari_normcheck.core.base.errors import NormcheckError


def add_sweep_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to ``sub`` (argparse subparsers)."""
    from napari_normcheck.core.run.sweep import TILING_LIMIT

    sweep = sub.add_parser(
        "sweep",
        help="run the check at several tile sizes (overlaps, blendings) and recommend one",
        description="Run the check once per setting on the same voxels, each setting into its own "
        "OUT under --out, and tabulate disparity, tile mismatch, grid shift, time and memory. "
        "The recommendation is the cheapest setting whose eval-mode tiling numbers (grid shift, "
        "tile mismatch) stay below --max-tiling.",
    )
    sweep.add_argument("volume", help="zarr / OME-Zarr / TIFF / .npy volume")
    add_model_arguments(sweep)
    sweep.add_argument("--out", required=True, help="sweep folder; one OUT.zarr per setting")
    sweep.add_argument("--dataset", help="array path inside a zarr group")
    sweep.add_argument("--level", type=int, default=0, help="OME-Zarr multiscale level")
    sweep.add_argument("--channel-axis", type=int, default=None, help="channel axis of the input")
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--roi", help="the region every setting runs on: z0:z1,y0:y1,x0:x1")
    where.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="run every setting on the same N regions spread over the volume's content (each "
        "twice the largest tile per axis, clipped to the volume; chosen from a strided view, "
        "never the whole volume); a row pools the regions' Dice sums",
    )
    sweep.add_argument(
        "--tiles", nargs="+", required=True, metavar="Z,Y,X", help="tile sizes to try"
    )
    sweep.add_argument("--overlap", nargs="+", type=float, default=[0.25], help="overlaps to try")
    sweep.add_argument(
        "--blend",
        nargs="+",
        choices=("constant", "gaussian", "crop"),
        default=["gaussian"],
        help="blendings to try (crop: once per tile, with --halo)",
    )
    sweep.add_argument("--halo", help="context Z,Y,X on each side of a tile in crop mode")
    sweep.add_argument(
        "--grid-shift",
        type=float,
        nargs="?",
        const=0.5,
        default=None,
        metavar="F",
        help="also run each setting on a grid shifted by round(F * step) (0.5 without a value); "
        "one more set of forwards per setting",
    )
    sweep.add_argument("--normalize", default=None, help="input normalization, as for run")
    sweep.add_argument("--activation", choices=("none", "sigmoid", "softmax"), default=None)
    sweep.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sweep.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    sweep.add_argument("--min-foreground", default=None, metavar="VOXELS[,FRACTION]")
    sweep.add_argument("--train-batch", type=int, default=1, help="tiles per train-mode forward")
    sweep.add_argument(
        "--eval-batch",
        type=int,
        default=None,
        help="tiles per eval-mode forward (default: 1 on the CPU, the most that fit on a GPU); "
        "a tile's result equals its batch-1 forward up to the convolutions' float32 rounding",
    )
    sweep.add_argument(
        "--max-tiling",
        type=float,
        default=TILING_LIMIT,
        help=f"the eval-mode tiling numbers (1 - Dice) a recommended setting stays below "
        f"(default {TILING_LIMIT}, the verdict's smallest step)",
    )
    sweep.add_argument("--report", help="write the rows: sweep.json or sweep.csv")
    sweep.add_argument("--plot", help="plot each indicator against tile size: sweep.png or .svg")
    sweep.add_argument("--resume", action="store_true", help="skip settings already finished")
    sweep.add_argument("--overwrite", action="store_true", help="rerun settings already in --out")
    sweep.set_defaults(
        handler=sweep_command,
        # run's options a sweep keeps at their defaults.
        seams=False,
        cache_mb=DEFAULT_CACHE_MB,
        feature_layer=[],
        precision="fp32",
        no_fuse_train=False,
        output_dtype="auto",
        tile=None,
    )
    return sweep


def sweep_command(args: argparse.Namespace) -> int:
    """Run every setting, write the report and the plot; exit code (1 when every one was refused)."""
    from napari_normcheck.cli.config_args import input_normalize
    from napari_normcheck.cli.model_args import package_default
    from napari_normcheck.cli.run import warn_if_logits
    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.models.inventory import norm_inventory
    from napari_normcheck.core.run.sweep import recommend, sweep_settings

    for path, kinds in ((args.report, (".json", ".csv")), (args.plot, (".png", ".svg"))):
        if path and Path(path).suffix.lower() not in kinds:
            raise NormcheckError(f"{path}: give a {' or '.join(kinds)} file")
    tiles = [RunConfig.from_options({"tile": text}).tile for text in args.tiles]
    settings = sweep_settings(tiles, args.overlap, args.blend)
    volume, loaded = open_inputs(args)
    # One normalization for every setting (and one line about it).
    args.normalize = input_normalize(args.normalize, loaded, volume)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    regions = None if args.sample is None else sampled_regions(args, volume, tiles)
    warn_if_logits(loaded.info, args.activation or package_default(loaded, "activation") or "none")
    rows = []
    for n, setting in enumerate(settings, start=1):
        print(f"setting {n}/{len(settings)}: {setting.name.removesuffix('.zarr')}", file=sys.stderr)
        if regions is None:
            rows.append(run_setting(args, volume, loaded, setting, folder / setting.name))
        else:
            out = folder / setting.name.removesuffix(".zarr")
            rows.append(run_sampled_setting(args, volume, loaded, setting, out, regions))
    inventory = norm_inventory(loaded.module)
    per_tile = [layer.type for layer in inventory.layers if not layer.running_stats]
    recommendation = recommend(rows, args.max_tiling, per_tile)
    result = {"rows": rows, "recommendation": recommendation}
    if regions is not None:
        result["regions"] = [[list(axis) for axis in box] for box in regions]
    print(format_rows(rows))
    print(f"recommendation: {recommendation['text']}")
    if args.report:
        write_sweep_report(args.report, result)
        print(f"report: {args.report}")
    if args.plot:
        from napari_normcheck.cli.sweep_plot import plot_sweep

        names = getattr(loaded, "output_channel_names", None)
        if plot_sweep(args.plot, rows, recommendation, names):
            print(f"plot: {args.plot}")
        else:
            print("plot: matplotlib is not installed; no plot written (pip install matplotlib)")
    (folder / "sweep.json").write_text(json.dumps(result, indent=2))
    return 1 if all(r.get("refused") for r in rows) else 0


def sampled_regions(args, volume, tiles) -> list:
    """The ``--sample`` regions (the same for every setting), said on stderr."""
    from napari_normcheck.core.run.sweep_sample import region_size, roi_text, sample_regions

    regions = sample_regions(volume.data, tiles, args.sample)
    size = region_size(tiles, volume.spatial_shape)
    note = ""
    if len(regions) < args.sample:
        note = (
            f" (the volume {'x'.join(map(str, volume.spatial_shape))} holds only {len(regions)} "
            "distinct regions with content of that size)"
        )
    print(
        f"{len(regions)} regions of {'x'.join(map(str, size))}{note}: "
        + " ".join(roi_text(box) for box in regions),
        file=sys.stderr,
    )
    return regions


def run_setting(args, volume, loaded, setting, out: Path) -> dict[str, Any]:
    """One setting's row: from its finished OUT (``--resume``), or from a run into ``out``."""
    from napari_normcheck.core.run.sweep import refused_row, sweep_row

    done = run_or_read(args, volume, loaded, setting, out)
    if done["refused"] is not None:
        return refused_row(setting, done["refused"])
    row = sweep_row(
        setting,
        done["report"],
        out=out,
        peak_memory_mib=done["peak"],
        cuda_peak_mib=done["cuda_peak"],
    )
    return _keep_memory(row, done, out, setting.name)


def run_sampled_setting(args, volume, loaded, setting, folder: Path, regions) -> dict[str, Any]:
    """One setting's row over the ``--sample`` regions: each its own run in ``folder``, pooled."""
    from napari_normcheck.core.run.sweep import refused_row, sweep_row
    from napari_normcheck.core.run.sweep_sample import combine_reports, region_entry, roi_text

    folder.mkdir(parents=True, exist_ok=True)
    done = []
    for k, box in enumerate(regions):
        out = folder / f"region_{k}.zarr"
        print(f"  region {k + 1}/{len(regions)}: {roi_text(box)}", file=sys.stderr)
        one = run_or_read(args, volume, loaded, setting, out, roi=roi_text(box))
        if one["refused"] is not None:
            return refused_row(setting, f"region {roi_text(box)}: {one['refused']}")
        done.append((box, out, one))
    peaks = [one["peak"] for _, _, one in done if one["peak"] is not None]
    cuda = [one["cuda_peak"] for _, _, one in done if one["cuda_peak"] is not None]
    row = sweep_row(
        setting,
        combine_reports([one["report"] for _, _, one in done]),
        out=folder,
        peak_memory_mib=max(peaks) if peaks else None,
        cuda_peak_mib=max(cuda) if cuda else None,
    )
    row["regions"] = [region_entry(box, out, one["report"]) for box, out, one in done]
    if all(one["resumed"] for _, _, one in done):
        row = _keep_memory(row, {"resumed": True}, folder, folder.name)
    return row


def run_or_read(args, volume, loaded, setting, out: Path, roi: str | None = None) -> dict:
    """Run ``setting`` (on ``roi``, else ``--roi``) into ``out``, or read it when finished.

    ``{"report", "refused", "peak", "cuda_peak", "resumed"}``: ``refused`` is the reason when
    the network or the memory did not take the setting (``report`` is then ``None``).
    """
    import torch

    from napari_normcheck.cli.config_args import run_config_from_args
    from napari_normcheck.cli.run import _store_attrs, run_and_report
    from napari_normcheck.core.io.store import is_complete, read_marker
    from napari_normcheck.core.run.report import build_report
    from napari_normcheck.core.run.sweep import peak_rss_mib

    result = {"report": None, "refused": None, "peak": None, "cuda_peak": None, "resumed": False}
    if args.resume and is_complete(out):
        print(f"  finished earlier: {out}", file=sys.stderr)
        return result | {
            "report": build_report(read_marker(out), _store_attrs(out)),
            "resumed": True,
        }
    options = argparse.Namespace(**vars(args))
    options.tile = ",".join(map(str, setting.tile))
    options.overlap = setting.overlap
    options.blend = setting.blend
    if roi is not None:
        options.roi = roi
    cuda = torch.cuda.is_available() and args.device != "cpu"
    # The run's GPU (``cuda:1`` included), not the current one; ``auto`` and ``cuda`` use GPU 0.
    device = torch.device(args.device if args.device.startswith("cuda") else "cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        config = run_config_from_args(options, loaded, volume)
        with peak_rss_mib() as memory:
            report = run_and_report(
                volume,
                loaded,
                config,
                out,
                overwrite=args.overwrite,
                resume=args.resume and out.exists(),
                volume_source={
                    "source": args.volume,
                    "dataset": args.dataset,
                    "level": args.level,
                    "channel_axis": args.channel_axis if args.channel_axis is not None else "auto",
                },
                trust_pickle=args.trust_pickle,
                warn_logits=False,  # said once for the sweep
            )
    except (NormcheckError, MemoryError, torch.OutOfMemoryError) as error:
        print(f"  refused: {error}", file=sys.stderr)
        return result | {"refused": str(error) or type(error).__name__}
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return result | {"report": report, "peak": memory["peak"], "cuda_peak": cuda_peak}


def _keep_memory(row: dict[str, Any], done: dict, out: Path, name: str) -> dict[str, Any]:
    # A setting read back (--resume): the memory it used, as the earlier sweep measured it.
    if not done.get("resumed"):
        return row
    try:
        rows = json.loads((out.parent / "sweep.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return row
    previous = next((r for r in rows if r.get("out", "").endswith(name)), {})
    for key in ("peak_memory_mib", "cuda_peak_memory_mib"):
        if previous.get(key) is not None:
            row[key] = previous[key]
    return row


CSV_COLUMNS = (
    "tile",
    "overlap",
    "blend",
    "refused",
    "seconds_per_mvoxel",
    "peak_memory_mib",
    "disparity_hard",
    "disparity_soft",
    "mismatch_eval_hard",
    "mismatch_eval_soft",
    "grid_shift_eval_hard",
    "grid_shift_eval_soft",
    "grid_shift_train_hard",
    "grid_shift_train_soft",
    "recommended",
)


def csv_values(row: dict[str, Any], recommendation: dict[str, Any]) -> dict[str, Any]:
    """A row's CSV cells: per-channel values joined with ``;``.

    A hard value on too little foreground reads ``not judged`` (the support rule); the JSON keeps
    the number and its flag.
    """

    def channels(values: list[float] | None, judged: list[bool] | None = None) -> str:
        if values is None:
            return ""
        return ";".join(
            "not judged" if judged is not None and not judged[c] else f"{v:.6g}"
            for c, v in enumerate(values)
        )

    support = row.get("support") or {}
    shift = row.get("grid_shift") or {}
    chosen = all(row.get(k) == recommendation.get(k) for k in ("tile", "overlap", "blend"))
    cells = {
        "tile": "x".join(map(str, row["tile"])),
        "overlap": "" if row["overlap"] is None else row["overlap"],
        "blend": row["blend"],
        "refused": row.get("refused") or "",
        "seconds_per_mvoxel": row.get("seconds_per_mvoxel", ""),
        "peak_memory_mib": row.get("peak_memory_mib") or "",
        "recommended": "yes" if chosen and recommendation.get("tile") else "",
    }
    judged_hard = {
        "disparity": support.get("judged"),
        "mismatch_eval": (support.get("mismatch_judged") or {}).get("eval"),
    }
    for key in ("disparity", "mismatch_eval"):
        values = row.get(key) or {}
        cells[f"{key}_hard"] = channels(values.get("hard"), judged_hard[key])
        cells[f"{key}_soft"] = channels(values.get("soft"))
    for mode in ("eval", "train"):
        values = shift.get(mode) or {}
        cells[f"grid_shift_{mode}_hard"] = channels(values.get("hard"), values.get("judged"))
        cells[f"grid_shift_{mode}_soft"] = channels(values.get("soft"))
    return cells


def write_sweep_report(path: str | Path, result: dict[str, Any]) -> Path:
    """Write the sweep as JSON (everything) or CSV (one line per setting)."""
    target = Path(path)
    if target.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow(csv_values(row, result["recommendation"]))
        target.write_text(buffer.getvalue())
    else:
        target.write_text(json.dumps(result, indent=2))
    return target


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The sweep table printed at the end (first channel; hard where judged, else soft)."""
    from napari_normcheck.core.run.sweep import eval_tiling

    lines = [
        f"{'tile':<14}{'blend':<10}{'overlap':>8}{'disparity':>11}{'mismatch':>10}"
        f"{'shift eval':>11}{'shift train':>12}{'eval tiling':>12}{'s/Mvox':>8}{'MiB':>8}"
    ]
    for row in rows:
        head = f"{'x'.join(map(str, row['tile'])):<14}{row['blend']:<10}" + (
            f"{'-' if row['overlap'] is None else row['overlap']:>8}"
        )
        if row.get("refused"):
            lines.append(f"{head}  refused: {row['refused']}")
            continue
        shift = row.get("grid_shift") or {}

        def first(values: dict | None) -> str:
            return "-" if not values else f"{values['soft'][0]:.4f}"

        tiling = eval_tiling(row)
        memory = row["peak_memory_mib"]
        lines.append(
            f"{head}{first(row['disparity']):>11}{first(row['mismatch_eval']):>10}"
            f"{first(shift.get('eval')):>11}{first(shift.get('train')):>12}"
            f"{'-' if tiling is None else f'{tiling:.4f}':>12}"
            f"{row['seconds_per_mvoxel']:>8.2f}"
            f"{'-' if memory is None else f'{memory:.0f}':>8}"
        )
    lines.append("(disparity, mismatch, shift: soft 1 - Dice of the first channel)")
    return "\n".join(lines)
