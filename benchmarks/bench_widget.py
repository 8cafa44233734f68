"""Widget benchmark: napari's responsiveness during a run, and the run time in the widget vs the CLI.

Run (a display is needed; ``xvfb-run -a`` provides one)::

    xvfb-run -a python benchmarks/bench_widget.py [--repeat 2] [--shape 48,128,128] [--device cpu]

Prints measured figures; asserts nothing.

- responsiveness: a QTimer ticking every 10 ms on the GUI thread while the dock widget runs the
  packaged BatchNorm sample model on the synthetic sample volume; the largest gap between two ticks
  is how long the GUI was frozen at most (target < 100 ms).
- speed: the run's time inside the widget (click to finished signal, and the engine's own total)
  vs ``napari-normcheck run`` (``cli.main``) on the same volume with the same settings
  (target ratio <= 1.1). The first CLI run is a discarded warm-up; runs alternate.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TICK_MS = 10


def instrument(widget) -> dict[str, list[float]]:
    """Time the GUI-thread handlers of the widget (per call, in ms), to name what blocks the GUI."""
    durations: dict[str, list[float]] = {}

    def wrap(owner, attribute, label):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                durations.setdefault(label, []).append((time.perf_counter() - start) * 1000)

        setattr(owner, attribute, timed)

    original_on_item = widget._on_item

    def on_item(item):
        start = time.perf_counter()
        try:
            return original_on_item(item)
        finally:
            label = f"_on_item({type(item).__name__})"
            durations.setdefault(label, []).append((time.perf_counter() - start) * 1000)

    widget._on_item = on_item
    wrap(widget.results, "refresh", "results.refresh")
    wrap(widget.results, "show", "results.show")
    wrap(widget.results, "start", "results.start")
    wrap(widget.tile_table, "redraw", "tile_table.redraw")
    wrap(widget.histogram, "set_values", "histogram.set_values")
    return durations


def widget_run(widget) -> dict:
    """One run in the widget with the tick timer, in napari's event loop; returns its figures."""
    from qtpy.QtCore import QEventLoop, QTimer  # noqa: TID253

    from napari_normcheck._qt import demo_gui

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    done: list[float] = []
    timer.start()
    start = time.perf_counter()
    worker = demo_gui.start_run(widget, None)
    if worker is None:
        raise RuntimeError(f"the run did not start: {widget.status_label.text()}")
    loop = QEventLoop()
    worker.finished.connect(lambda: (done.append(time.perf_counter()), loop.quit()))
    loop.exec()
    timer.stop()
    if widget.finished_event is None:
        raise RuntimeError(f"the run did not finish: {widget.status_label.text()}")
    inside = [t for t in ticks if start <= t <= done[0]]
    gaps = np.diff([start, *inside, done[0]]) * 1000
    return {
        "wall_s": done[0] - start,
        "engine_s": widget.finished_event.summary["timing"]["total"],
        "max_gap_ms": float(gaps.max()),
        "p99_gap_ms": float(np.percentile(gaps, 99)),
        "ticks": len(inside),
    }


def cli_run(volume_path: Path, out: Path, sample, tile, device: str) -> dict:
    """One ``napari-normcheck run`` with the widget's settings; returns its figures."""
    from napari_normcheck import cli

    argv = [
        "run",
        str(volume_path),
        "--model",
        str(sample.path),
        "--arch",
        sample.arch,
        "--arch-kwargs",
        json.dumps(sample.arch_kwargs),
        "--out",
        str(out),
        "--tile",
        ",".join(map(str, tile)),
        "--overlap",
        "0.25",
        "--blend",
        "gaussian",
        "--normalize",
        sample.normalize,
        "--activation",
        sample.activation,
        "--device",
        device,
        "--overwrite",
        "--report",
        str(out.with_suffix(".json")),
    ]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(argv)
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"napari-normcheck run ended with {code}")
    report = json.loads(out.with_suffix(".json").read_text())
    timing = report.get("timing") or report.get("summary", {}).get("timing", {})
    return {"wall_s": wall, "engine_s": timing.get("total", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each kind")
    parser.add_argument("--shape", default="48,128,128", help="sample volume Z,Y,X")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument(
        "--hidden", action="store_true", help="do not show the window (no canvas rendering)"
    )
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))

    import napari

    from napari_normcheck._qt import demo_gui
    from napari_normcheck._sample_data import make_sample
    from napari_normcheck.data import sample_model

    sample = sample_model("batchnorm")
    tile = tuple(min(t, s) for t, s in zip(sample.tile, shape, strict=True))
    with tempfile.TemporaryDirectory(prefix="bench-widget-") as folder:
        folder = Path(folder)
        volume_path = folder / "sample.npy"
        np.save(volume_path, make_sample(shape)[0][0])
        viewer = napari.Viewer(show=not args.hidden)
        widget = demo_gui.setup_demo(
            viewer, shape=shape, device=args.device, out=folder / "widget.zarr", tile=tile
        )
        durations = instrument(widget)
        print(f"sample {shape}, tile {tile}, device {args.device}, tick every {TICK_MS} ms")
        cli_run(volume_path, folder / "warmup.zarr", sample, tile, args.device)
        widget_runs, cli_runs = [], []
        for index in range(args.repeat):
            widget_runs.append(widget_run(widget))
            cli_runs.append(cli_run(volume_path, folder / "cli.zarr", sample, tile, args.device))
            w, c = widget_runs[-1], cli_runs[-1]
            print(
                f"run {index + 1}: widget {w['wall_s']:.2f} s (engine {w['engine_s']:.2f} s), "
                f"max tick gap {w['max_gap_ms']:.0f} ms (p99 {w['p99_gap_ms']:.0f} ms, "
                f"{w['ticks']} ticks); CLI {c['wall_s']:.2f} s (engine {c['engine_s']:.2f} s)"
            )
        viewer.close()

    def median(runs, key):
        return statistics.median(run[key] for run in runs)

    max_gap = max(run["max_gap_ms"] for run in widget_runs)
    wall_ratio = median(widget_runs, "wall_s") / median(cli_runs, "wall_s")
    engine_ratio = median(widget_runs, "engine_s") / median(cli_runs, "engine_s")
    print("GUI-thread handlers (calls, max ms, total ms):")
    for label, values in sorted(durations.items(), key=lambda kv: -max(kv[1])):
        print(f"  {label:<28} {len(values):>4} {max(values):>8.1f} {sum(values):>9.1f}")
    print(f"largest GUI gap during the runs: {max_gap:.0f} ms (target < 100 ms)")
    print(
        f"widget / CLI run time: {wall_ratio:.3f} wall (click to finished vs cli.main, "
        f"model load included in both on the first widget run only), "
        f"{engine_ratio:.3f} engine total (target <= 1.1)"
    )


if __name__ == "__main__":
    main()
