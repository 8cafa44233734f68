"""``napari-normcheck demo``: the packaged sample models on the packaged sample volume."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_normcheck.cli.run import run_and_report


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``sub`` (argparse subparsers)."""
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
    demo.set_defaults(handler=demo_command)
    return demo


def demo_command(args: argparse.Namespace) -> int:
    """Run both sample models and print their comparison, or open the demo window."""
    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.models.models import load_model
    from napari_normcheck.core.run.report import write_report
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
        config = RunConfig.from_options(
            {"tile": sample.tile, "overlap": 0.25, "blend": "gaussian", "device": args.device},
            normalize=sample.normalize,
            activation=sample.activation,
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
