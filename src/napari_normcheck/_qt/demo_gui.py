"""``napari-normcheck demo --gui``: the sample volume and a packaged sample model in the dock widget.

Opens napari with the synthetic EM volume, docks the "Normalization check" widget, chooses a
packaged sample model the way the widget offers it and clicks Run. With a screenshot path, the
whole window is saved once the run has finished (centred on the worst tile) and napari quits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_normcheck._sample_data import SAMPLE_SHAPE, make_sample

DOCK_NAME = "Normalization check"
#: Wait after the run before the screenshot, so the last layer refresh is drawn (ms).
SETTLE_MS = 500
#: Window size (width, height) for the screenshot.
WINDOW_SIZE = (1500, 900)


def setup_demo(
    viewer: Any,
    *,
    shape: tuple[int, int, int] = SAMPLE_SHAPE,
    model: str = "batchnorm",
    device: str = "auto",
    out: str | Path | None = None,
    tile: tuple[int, int, int] | None = None,
) -> Any:
    """Add the sample volume to ``viewer``, dock the widget and fill in the sample model.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer to fill.
    shape : tuple of int
        ``(z, y, x)`` size of the synthetic volume.
    model : str
        The packaged sample model (``"batchnorm"`` or ``"groupnorm"``).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    out : path, optional
        Output OUT.zarr (replaced if it exists); a new temporary folder when not given.
    tile : tuple of int, optional
        Tile size instead of the sample model's.

    Returns
    -------
    NormcheckWidget
        The docked widget, ready to run.
    """
    from napari_normcheck._qt.widget import SAMPLE_PREFIX, NormcheckWidget

    data, kwargs, _kind = make_sample(shape)[0]
    viewer.add_image(data, **kwargs)
    widget = NormcheckWidget(viewer)
    viewer.window.add_dock_widget(widget, name=DOCK_NAME, area="right")
    widget.image_combo.setCurrentText(kwargs["name"])
    widget.model_source.setCurrentText(SAMPLE_PREFIX + model)
    if tile is not None:
        widget.tile.setText(",".join(str(v) for v in tile))
    widget.device.setCurrentText(device if device in ("auto", "cpu", "cuda") else "auto")
    if out is not None:
        widget.out_path.setText(str(out))
        widget.overwrite.setChecked(True)
    return widget


def start_run(widget: Any, on_done: Callable[[], None] | None = None) -> Any:
    """Click Run; ``on_done`` is called on the GUI thread once the run's results are all shown.

    Returns the worker, or ``None`` when the form was refused (a notification says why).
    """
    from qtpy.QtCore import QTimer  # noqa: TID253 (the Qt layer)

    worker = widget.run()
    if worker is not None and on_done is not None:

        def settled() -> None:
            widget.run_settled.disconnect(settled)
            # The final layers are shown; let them be drawn.
            QTimer.singleShot(SETTLE_MS, on_done)

        widget.run_settled.connect(settled)
    return worker


def go_to_worst_tile(widget: Any) -> None:
    """Centre the view on the tile with the largest disparity (if there are tiles)."""
    if widget.tile_table.rowCount():
        widget.go_to_tile(widget.tile_table.tile_at_row(0))


def screenshot_view(viewer: Any, widget: Any) -> None:
    """Arrange the window for a picture: the worst tile's plane, the disparity over the volume.

    The eval predictions are hidden (they would cover the disparity), the whole plane is in view,
    the disparity layer is selected (its controls show) and the dock shows the Results tab: the
    tile table and the ``|z|`` vs disparity plot.
    """
    from napari_normcheck._qt.region import camera_of, canvas_size

    go_to_worst_tile(widget)
    raw = widget.selected_image()
    if raw is not None:  # the whole plane in view (the tile grids reach past the volume)
        (_z0, y0, x0), (_z1, y1, x1) = raw.extent.world
        height, width = canvas_size(viewer)
        camera = camera_of(viewer)
        camera.center = (camera.center[0], (y0 + y1) / 2, (x0 + x1) / 2)
        camera.zoom = 0.95 * min(height / (y1 - y0), width / (x1 - x0))
    disparity = None
    for layer in viewer.layers:
        output = layer.metadata.get("normcheck_output")
        if output == "pred_eval":
            layer.visible = False
        if output == "disparity":
            disparity = layer
    if disparity is not None:
        viewer.layers.selection.active = disparity
    widget.tabs.setCurrentWidget(widget.results_tab)
    widget.plot_tabs.setCurrentWidget(widget.scatter)


def run_demo_gui(
    screenshot: str | Path | None = None,
    *,
    model: str = "batchnorm",
    device: str = "auto",
    out: str | Path | None = None,
) -> int:
    """Open napari, run the sample model on the sample volume; optionally save a screenshot and quit.

    Returns the exit code: 0, or 1 when the run did not finish (no screenshot then).
    """
    import napari
    from qtpy.QtWidgets import QApplication  # noqa: TID253

    viewer = napari.Viewer(title="napari-normcheck demo")
    if screenshot is not None:
        viewer.window.resize(*WINDOW_SIZE)
    widget = setup_demo(viewer, model=model, device=device, out=out)
    status = {"code": 0}

    def done() -> None:
        if widget.finished_event is None:
            status["code"] = 1
            print(f"napari-normcheck: the run did not finish: {widget.status_label.text()}")
        else:
            if screenshot is None:  # (the screenshot's view is arranged already)
                go_to_worst_tile(widget)
            print(widget.summary_label.text())
        if screenshot is None:
            return
        if status["code"] == 0:
            path = Path(screenshot)
            path.parent.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(path), canvas_only=False)
            print(f"screenshot: {screenshot}")
        viewer.close()
        QApplication.quit()

    def on_done() -> None:
        # One more pause after moving the view, so the screenshot shows the worst tile drawn.
        from qtpy.QtCore import QTimer  # noqa: TID253

        if screenshot is not None and widget.finished_event is not None:
            screenshot_view(viewer, widget)
            QTimer.singleShot(SETTLE_MS, done)
        else:
            done()

    if start_run(widget, on_done) is None:
        print(f"napari-normcheck: the run did not start: {widget.status_label.text()}")
        if screenshot is not None:
            viewer.close()
            return 1
    napari.run()
    return status["code"]
