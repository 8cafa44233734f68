"""Issue 20 in napari: the grid shift in the Check tab, its numbers and maps in Results.

A real viewer, the packaged sample volume and its BatchNorm sample model.
"""

from __future__ import annotations

import numpy as np
import zarr

from napari_normcheck._qt.widget import NormcheckWidget
from napari_normcheck._sample_data import make_sample

SAMPLE_SHAPE = (16, 64, 64)
#: The most result layers shown at a time (the display rule of issue 18).
MOST_SHOWN = 8


def sample_widget(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data, kwargs, _kind = make_sample(shape=SAMPLE_SHAPE)[0]
    viewer.add_image(data, **kwargs)
    widget = NormcheckWidget(viewer)
    widget.model_source.setCurrentText("sample: batchnorm")
    widget.tile.setText("16,32,32")
    widget.device.setCurrentText("cpu")
    widget.overwrite.setChecked(True)
    widget.out_path.setText(str(tmp_path / "out.zarr"))
    return viewer, widget


def test_grid_shift_is_off_by_default_and_half_a_step_when_on(make_napari_viewer, tmp_path):
    viewer, widget = sample_widget(make_napari_viewer, tmp_path)
    layer = widget.selected_image()
    assert widget.build_config(layer.data.shape, layer).grid_shift == 0.0
    widget.grid_shift.enabled.setChecked(True)
    assert widget.build_config(layer.data.shape, layer).grid_shift == 0.5
    widget.grid_shift.amount.setValue(0.25)
    assert widget.build_config(layer.data.shape, layer).grid_shift == 0.25


def test_grid_shift_run_shows_its_numbers_and_maps(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = sample_widget(make_napari_viewer, tmp_path)
    widget.grid_shift.enabled.setChecked(True)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.settled, timeout=120_000)
    event = widget.finished_event
    assert event is not None, widget.status_label.text()
    summary = event.summary
    assert set(summary["grid_shift"]) >= {"eval", "train"}
    # The summary names the offset and each prediction's value of the first channel.
    text = widget.summary_label.text()
    offset = ",".join(str(v) for v in summary["grid_shift_offset"])
    assert f"grid moved by z,y,x {offset}" in text
    soft_eval = summary["grid_shift"]["eval"]["soft"][0]
    assert "eval: " in text and f"soft {soft_eval:.3f}" in text

    shift_layers = {
        layer.metadata["normcheck_output"]: layer
        for layer in viewer.layers
        if str(layer.metadata.get("normcheck_output", "")).startswith("shift_diff_")
    }
    assert set(shift_layers) == {"shift_diff_eval", "shift_diff_train"}
    assert shift_layers["shift_diff_eval"].visible and not shift_layers["shift_diff_train"].visible
    # One channel at a time, the shown one, equal to the store's |P - P_shifted|.
    channel = widget.results.channel
    root = zarr.open_group(str(event.out), mode="r")
    for name, layer in shift_layers.items():
        shown = np.asarray(layer.data[0] if layer.multiscale else layer.data)
        node = root[name]
        stored = node[...] if isinstance(node, zarr.Array) else node["0"][...]
        assert shown.shape == SAMPLE_SHAPE
        expected = stored[channel].astype(np.float32)
        if stored.dtype == np.uint8:
            expected /= 255.0
        np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert stored.max() > 0  # the grid moved and the result changed somewhere
    visible = [layer for layer in viewer.layers if layer.visible]
    assert len(visible) <= MOST_SHOWN, [layer.name for layer in visible]
