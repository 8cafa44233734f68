"""``demo --gui``: the sample run in a real, shown napari window, and its screenshot."""

import numpy as np

from napari_normcheck import cli
from napari_normcheck._qt import demo_gui
from napari_normcheck._sample_data import SAMPLE_LAYER_NAME
from napari_normcheck.core.io.store import is_complete

SHAPE = (32, 96, 96)


def test_demo_window_screenshot_is_not_blank(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1200, 800)
    out = tmp_path / "demo.zarr"
    widget = demo_gui.setup_demo(viewer, shape=SHAPE, device="cpu", out=out, tile=(32, 64, 64))
    assert widget.model_source.currentText() == "sample: batchnorm"
    assert widget.image_combo.currentText() == SAMPLE_LAYER_NAME
    done = []
    worker = demo_gui.start_run(widget, lambda: done.append(True))
    assert worker is not None
    qtbot.waitUntil(lambda: bool(done), timeout=60_000)
    assert widget.finished_event is not None, widget.status_label.text()
    assert is_complete(out)
    # The sample model's channels are membrane and organelle; the worst one is shown.
    shown = widget.channel_combo.currentText()
    for name in (f"eval · {shown}", f"train · {shown}", f"disparity · {shown}", "tiles"):
        assert name in viewer.layers
    assert len(viewer.layers) <= 9
    assert viewer.layers["tiles"].visible  # (added hidden, shown by the step after its add)
    demo_gui.screenshot_view(viewer, widget)
    assert not viewer.layers[f"eval · {shown}"].visible
    assert viewer.layers.selection.active.name == f"disparity · {shown}"
    assert widget.tabs.currentWidget() is widget.results_tab
    assert [widget.tabs.tabText(i) for i in range(3)] == ["Check", "Results", "Remedies"]
    assert widget.scatter.isVisible() and widget.scatter.tiles.size == widget.plan.n_tiles
    qtbot.wait(200)
    shot = np.asarray(viewer.screenshot(canvas_only=False))
    assert shot.ndim == 3 and shot.shape[0] > 300 and shot.shape[1] > 500
    rgb = shot[..., :3].reshape(-1, 3)
    assert rgb.std() > 20
    assert len(np.unique(rgb[::7], axis=0)) > 200
    # The canvas itself shows the volume (not a black or uniform picture).
    canvas = np.asarray(viewer.screenshot(canvas_only=True))[..., :3]
    assert canvas.std() > 20 and canvas.mean() > 30


def test_cli_demo_gui_is_lazy_and_passes_options(monkeypatch, tmp_path):
    calls = []

    def fake(screenshot, **kwargs):
        calls.append((screenshot, kwargs))
        return 0

    monkeypatch.setattr(demo_gui, "run_demo_gui", fake)
    shot = tmp_path / "shot.png"
    argv = ["demo", "--gui", "--screenshot", str(shot), "--out", str(tmp_path), "--device", "cpu"]
    assert cli.main(argv) == 0
    assert calls == [(str(shot), {"device": "cpu", "out": tmp_path / "batchnorm-gui.zarr"})]
    args = cli.build_parser().parse_args(["demo"])
    assert not args.gui and args.screenshot is None
