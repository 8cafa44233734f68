"""Issue 21 in napari: volumes by URL (Open URL, a URL layer read by URL) and a fault mid-run.

A real HTTP server in a thread serves a zarr array of the packaged sample volume written in
``tmp_path``; the check runs the packaged BatchNorm sample model in a real viewer.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_normcheck._qt.model_box import SAMPLE_PREFIX
from napari_normcheck._qt.url_open import layer_url
from napari_normcheck._qt.widget import NormcheckWidget
from napari_normcheck.data import sample_volume

pytest.importorskip("aiohttp", reason="fsspec reads http(s) URLs with aiohttp")

from tests.core.test_url import Server  # noqa: E402 (after the skip)

SHAPE = (16, 64, 64)
CHUNKS = (16, 32, 32)


def sample_widget(viewer, tmp_path):
    widget = NormcheckWidget(viewer)
    widget.model_source.addItem(SAMPLE_PREFIX + "batchnorm")
    widget.model_source.setCurrentText(SAMPLE_PREFIX + "batchnorm")
    widget.tile.setText("16,32,32")
    widget.device.setCurrentText("cpu")
    widget.overwrite.setChecked(True)
    widget.out_path.setText(str(tmp_path / "out.zarr"))
    return widget


@pytest.fixture
def served(tmp_path):
    """The sample volume as a zarr array served over HTTP; yields (server, image)."""
    image = sample_volume(SHAPE)
    folder = tmp_path / "served"
    zarr.create_array(str(folder / "em.zarr"), data=image, chunks=CHUNKS)
    server = Server(folder).start()
    yield server, image
    server.stop()


def test_open_url_adds_a_lazy_layer_that_the_check_reads_by_url(
    make_napari_viewer, qtbot, tmp_path, served
):
    server, image = served
    viewer = make_napari_viewer()
    widget = sample_widget(viewer, tmp_path)
    url = server.url("em.zarr")
    widget.url_row.url_edit.setText(url)
    assert widget.url_row.open() is not None
    qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=30_000)
    layer = viewer.layers[0]
    assert layer.source.path == url and layer_url(layer) == url
    assert type(layer.data).__module__.startswith("dask")  # lazy: nothing read beyond the view
    np.testing.assert_array_equal(np.asarray(layer.data[3]), image[3])
    assert widget.image_combo.currentText() == layer.name

    requests_before = server.httpd.n_requests
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.settled, timeout=120_000)
    assert widget.finished_event is not None, widget.status_label.text()
    # Read by URL through the core (the server answered the run), and the report says so.
    assert widget.run_request.volume.source.startswith(url)
    assert server.httpd.n_requests > requests_before
    attrs = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["normcheck"]
    assert attrs["source"].startswith(url)


def test_open_url_error_is_a_notification(make_napari_viewer, tmp_path, monkeypatch):
    import napari.utils.notifications as notifications

    shown = []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    viewer = make_napari_viewer()
    widget = sample_widget(viewer, tmp_path)
    widget.url_row.url_edit.setText("not a url")
    assert widget.url_row.open() is None
    assert shown and "not a URL" in shown[0]
    assert len(viewer.layers) == 0


def test_fault_mid_run_is_one_line_and_resume_completes(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    """A damaged input chunk: the notification has the command line's line; Resume finishes."""
    import dask.array as da

    from napari_normcheck._qt import widget as widget_module
    from napari_normcheck.core.io.store import is_complete

    shown = []
    monkeypatch.setattr(widget_module, "_show_error", shown.append)
    path = tmp_path / "em.zarr"
    zarr.create_array(str(path), data=sample_volume(SHAPE), chunks=(4, 32, 32))
    damaged = path / "c" / "3" / "1" / "1"  # z 12-15, y and x 32-63: read by the last tiles only
    good_bytes = damaged.read_bytes()
    viewer = make_napari_viewer()
    viewer.add_image(da.from_zarr(str(path)), name="em", contrast_limits=(0, 255))
    viewer.dims.set_current_step(0, 8)
    damaged.write_bytes(b"\x28\xb5\x2f\xfd not a zstd frame" * 4)
    widget = sample_widget(viewer, tmp_path)

    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.settled, timeout=120_000)
    assert widget.finished_event is None
    (line,) = shown
    assert "\n" not in line and "cannot read the input" in line and "chunk" in line
    assert widget.status_label.text() == f"error: {line}"
    # Usable again, and Resume is offered: some chunks were finished.
    assert widget.run_button.isEnabled() and widget.resume_button.isEnabled()

    damaged.write_bytes(good_bytes)
    assert widget.resume() is not None
    qtbot.waitUntil(lambda: widget.settled, timeout=120_000)
    assert widget.finished_event is not None, widget.status_label.text()
    assert is_complete(tmp_path / "out.zarr")
    resumed = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")

    widget.out_path.setText(str(tmp_path / "clean.zarr"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.settled, timeout=120_000)
    clean = zarr.open_group(str(tmp_path / "clean.zarr"), mode="r")
    for name in ("pred_eval", "pred_train"):
        np.testing.assert_array_equal(_level0(resumed[name]), _level0(clean[name]))


def _level0(node):
    return node[...] if isinstance(node, zarr.Array) else node[sorted(node.array_keys())[0]][...]
