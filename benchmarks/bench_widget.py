"""Widget benchmark: napari's responsiveness during a run, and the run time in the widget vs the CLI.

Run (a display is needed; ``xvfb-run -a`` provides one)::

    xvfb-run -a python benchmarks/bench_widget.py [--repeat 2] [--shape 48,128,128] [--device cpu]
    xvfb-run -a python benchmarks/bench_widget.py --hidden   # no window: no canvas drawing

Prints measured figures; asserts nothing.

- responsiveness: a QTimer ticking every 10 ms on the GUI thread while the dock widget runs the
  packaged BatchNorm sample model on the synthetic sample volume, from the click until every result
  is shown; the largest gap between two ticks is how long the GUI was frozen at most (target
  < 100 ms), per phase: before the engine starts (the widget adds its layers; only the first run
  adds any), while tiles run, after (final values). The largest gaps are named by the GUI work,
  canvas draw or garbage collection that overlapped them ("napari/Qt" when none did: Qt's own
  event handling and painting, e.g. the layer list or the dock), and
  napari's own cost of one new layer and one redraw is measured apart (what no plugin can go
  below). With ``--hidden`` the canvas is never drawn: what remains is the widget's own work.
- speed: the run's time inside the widget (click to results shown, and the engine's own total)
  vs ``napari-normcheck run`` (``cli.main``) on the same volume with the same settings
  (target ratio <= 1.1). The first CLI run is a discarded warm-up; runs alternate.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TICK_MS = 10


def instrument(widget) -> list[tuple[str, float, float]]:
    """Time the GUI-thread work of the widget: event handlers and queued result steps.

    Returns the list the intervals ``(label, start, end)`` (perf_counter seconds) are appended to.
    """
    intervals: list[tuple[str, float, float]] = []

    def wrap(owner, attribute, label):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                intervals.append((label, start, time.perf_counter()))

        setattr(owner, attribute, timed)

    original_on_item = widget._on_item

    def on_item(item):
        start = time.perf_counter()
        try:
            return original_on_item(item)
        finally:
            intervals.append((f"_on_item({type(item).__name__})", start, time.perf_counter()))

    widget._on_item = on_item
    wrap(widget.tile_table, "redraw", "tile_table.redraw")
    wrap(widget.tile_table, "add_record", "tile_table.add_record")
    wrap(widget, "update_plots", "update_plots")
    wrap(widget.progress, "setValue", "progress.setValue")
    wrap(widget.status_label, "setText", "status_label.setText")
    widget.results.steps.timings = intervals  # every queued GUI step ("add <layer>", "refresh")
    # The canvas draws (vispy's part of them: the scene, shaders built at a visual's first draw).
    window = getattr(widget.results.viewer, "window", None)
    canvas = getattr(getattr(window, "_qt_viewer", None), "canvas", None)
    scene = getattr(canvas, "_scene_canvas", None)
    if scene is not None:
        draw_start: list[float] = []
        scene.events.draw.connect(
            lambda _e: draw_start.__setitem__(slice(None), [time.perf_counter()]),
            position="first",
        )
        scene.events.draw.connect(
            lambda _e: intervals.append(("canvas draw", draw_start[0], time.perf_counter())),
            position="last",
        )
    # Garbage collections hold the GIL (any thread's): they are named too.
    started: list[float] = []

    def on_gc(phase, info):
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            intervals.append((f"gc gen{info['generation']}", started[0], time.perf_counter()))

    gc.callbacks.append(on_gc)
    return intervals


def worst_gaps(ticks, intervals, count=3):
    """The ``count`` largest gaps between ticks, each with the GUI work that overlapped it most."""
    gaps = sorted(zip(np.diff(ticks), ticks[:-1], ticks[1:]), reverse=True)[:count]
    named = []
    for gap, t0, t1 in gaps:
        overlap = {}
        for label, start, end in intervals:
            covered = min(end, t1) - max(start, t0)
            if covered > 0:
                overlap[label] = overlap.get(label, 0.0) + covered
        label = max(overlap, key=overlap.get) if overlap else "napari/Qt (events, painting)"
        covered = overlap.get(label, gap)
        named.append(f"{gap * 1000:.0f} ms ({label}: {covered * 1000:.0f} ms)")
    return named


def napari_floor(viewer, shape) -> dict:
    """napari's own cost for one new image layer and one redraw, with no run going on (ms).

    Adding a hidden float32 layer with fixed contrast limits is the least any result layer costs
    the GUI thread; the redraw is what the renderer (software OpenGL under Xvfb) takes for the
    whole canvas. Both are napari's and vispy's, not the widget's.
    """
    from qtpy.QtWidgets import QApplication  # noqa: TID253

    adds, draws = [], []
    for index in range(3):
        start = time.perf_counter()
        layer = viewer.add_image(
            np.zeros(shape, np.float32),
            name=f"floor {index}",
            visible=False,
            contrast_limits=(0, 1),
        )
        adds.append(time.perf_counter() - start)
        viewer.window._qt_viewer.canvas.native.update()
        start = time.perf_counter()
        QApplication.processEvents()
        draws.append(time.perf_counter() - start)
        viewer.layers.remove(layer)
        QApplication.processEvents()
    return {"add_ms": 1000 * statistics.median(adds), "draw_ms": 1000 * statistics.median(draws)}


def widget_run(widget, intervals) -> dict:
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

    def settled():
        # The run is over once its results are all shown (the widget adds layers step by step).
        widget.run_settled.disconnect(settled)
        done.append(time.perf_counter())
        loop.quit()

    widget.run_settled.connect(settled)
    loop.exec()
    timer.stop()
    if widget.finished_event is None:
        raise RuntimeError(f"the run did not finish: {widget.status_label.text()}")
    inside = [start, *[t for t in ticks if start <= t <= done[0]], done[0]]
    gaps = np.diff(inside) * 1000
    # Phases: before the engine starts (the widget adds its layers), tiles, final values.
    began = [b for label, b, _e in intervals if label == "_on_item(RunStarted)" and b >= start]
    ended = [b for label, b, _e in intervals if label == "_on_item(RunFinished)" and b >= start]
    phases = {}
    if began and ended:
        for name, lo, hi in (
            ("layers", start, began[-1]),
            ("tiles", began[-1], ended[-1]),
            ("final", ended[-1], done[0]),
        ):
            # A gap belongs to the phase it ends in.
            phase_gaps = [g for g, t1 in zip(gaps, inside[1:]) if lo < t1 <= hi]
            phases[name] = max(phase_gaps, default=0.0)
    return {
        "phases": phases,
        "worst": worst_gaps(inside, intervals),
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
        "--seams",  # (the widget stores the seams maps by default)
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
        intervals = instrument(widget)
        print(
            f"sample {shape}, tile {tile}, device {args.device}, tick every {TICK_MS} ms, "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        cli_run(volume_path, folder / "warmup.zarr", sample, tile, args.device)
        widget_runs, cli_runs = [], []
        for index in range(args.repeat):
            widget_runs.append(widget_run(widget, intervals))
            cli_runs.append(cli_run(volume_path, folder / "cli.zarr", sample, tile, args.device))
            w, c = widget_runs[-1], cli_runs[-1]
            print(
                f"run {index + 1}: widget {w['wall_s']:.2f} s (engine {w['engine_s']:.2f} s), "
                f"max tick gap {w['max_gap_ms']:.0f} ms (p99 {w['p99_gap_ms']:.0f} ms, "
                f"{w['ticks']} ticks); CLI {c['wall_s']:.2f} s (engine {c['engine_s']:.2f} s)"
            )
            print(
                "  largest gap by phase (ms): "
                + ", ".join(f"{name} {gap:.0f}" for name, gap in w["phases"].items())
                + " (layers: before the engine starts; tiles: while it runs; final: after)"
            )
            print("  largest gaps: " + "; ".join(w["worst"]))
        floor = napari_floor(viewer, shape)
        viewer.close()

    def median(runs, key):
        return statistics.median(run[key] for run in runs)

    max_gap = max(run["max_gap_ms"] for run in widget_runs)
    wall_ratio = median(widget_runs, "wall_s") / median(cli_runs, "wall_s")
    engine_ratio = median(widget_runs, "engine_s") / median(cli_runs, "engine_s")
    durations: dict[str, list[float]] = {}
    for label, begin, end in intervals:
        durations.setdefault(label, []).append((end - begin) * 1000)
    print("GUI-thread work (calls, max ms, total ms):")
    for label, values in sorted(durations.items(), key=lambda kv: -max(kv[1]))[:25]:
        print(f"  {label[:40]:<40} {len(values):>4} {max(values):>8.1f} {sum(values):>9.1f}")
    print(
        f"napari alone, no run going on: one hidden image layer added {floor['add_ms']:.0f} ms, "
        f"one canvas redraw {floor['draw_ms']:.0f} ms"
    )
    print(
        "largest GUI gap per run: "
        + ", ".join(
            f"{'first' if i == 0 else f'run {i + 1}'} {run['max_gap_ms']:.0f} ms"
            for i, run in enumerate(widget_runs)
        )
        + " (the first run adds the result layers, later runs re-point them)"
    )
    print(f"largest GUI gap during the runs: {max_gap:.0f} ms (target < 100 ms)")
    print(
        f"widget / CLI run time: {wall_ratio:.3f} wall (click to finished vs cli.main, "
        f"model load included in both on the first widget run only), "
        f"{engine_ratio:.3f} engine total (target <= 1.1)"
    )


if __name__ == "__main__":
    main()
