"""The dock widget with what issues 6 and 7 added: the Remedies section, precision and a cluster."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_normcheck.core.io.store import is_complete
from napari_normcheck.core.remedies.table import ROWS

from .test_widget import SCALE, TRANSLATE, make_widget, wait_done


def test_remedies_section_uses_the_last_finished_check(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    assert widget.remedy_context() is None  # nothing to remedy before a check has finished
    widget.run()
    wait_done(qtbot, widget)
    context = widget.remedy_context()
    assert context is not None and context.out == tmp_path / "out.zarr"
    assert context.model is widget.model_ready.loaded.module
    panel = widget.remedies_panel
    panel.tiles.setValue(4)
    assert panel.run() is not None
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120_000)
    assert errors == []
    assert panel.table.rowCount() == len(ROWS)
    out = tmp_path / "out.zarr"
    root = zarr.open_group(str(out), mode="r")
    remedies = root.attrs["normcheck"]["remedies"]
    # The table's eval row is the widget's own check; batch statistics equal train mode.
    np.testing.assert_allclose(
        remedies["eval"]["disparity_vs_train"]["hard"],
        widget.finished_event.summary["disparity"]["hard"],
        atol=1e-12,
    )
    assert remedies["batchstats"]["disparity_vs_train"]["hard"] == [0.0, 0.0]
    # One layer per remedy, following the widget's channel choice like the check's own layers,
    # among the result layers (the tile outlines stay on top).
    n_layers = len(viewer.layers)
    assert viewer.layers[-1].name == "tiles" and viewer.layers[0].name == "img"
    for channel in (0, 1):
        widget.channel_combo.setCurrentIndex(channel)
        layer = viewer.layers[f"recalibrated · channel {channel}"]
        np.testing.assert_allclose(layer.scale, SCALE)
        np.testing.assert_allclose(layer.translate, TRANSLATE)
        stored = root["pred_recalibrated/0"]
        divisor = 255.0 if stored.dtype == np.uint8 else 1.0  # shown as 0..1
        np.testing.assert_allclose(np.asarray(layer.data[0]), stored[channel] / divisor, atol=1e-6)
        assert f"batch-stats · channel {channel}" in viewer.layers
        assert len(viewer.layers) == n_layers
    # The plugin's reader opens the remedies' predictions too, placed like the others.
    from napari_normcheck._reader import get_reader

    read = {kwargs["name"]: (data, kwargs) for data, kwargs, _ in get_reader(str(out))(str(out))}
    for short, group in (("recalibrated", "pred_recalibrated"), ("batch-stats", "pred_batchstats")):
        data, kwargs = read[short]
        np.testing.assert_allclose(kwargs["scale"], (1.0, *SCALE))
        np.testing.assert_allclose(kwargs["translate"], (0.0, *TRANSLATE))
        stored = root[f"{group}/0"]
        divisor = 255.0 if stored.dtype == np.uint8 else 1.0
        np.testing.assert_allclose(np.asarray(data), stored[...] / divisor, atol=1e-6)


def test_precision_choice_reaches_the_run_and_its_summary(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    _viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    widget.precision.setCurrentText("bf16")
    widget.run()
    wait_done(qtbot, widget)
    assert errors == []
    summary = widget.finished_event.summary
    assert summary["precision_effect"]["precision"] == "bf16"
    attrs = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["normcheck"]
    assert attrs["params"]["precision"] == "bf16"


def test_run_on_a_dask_cluster_from_the_widget(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    """The cluster field: tiles run on the scheduler's workers; the layers fill in the same way."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        _viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
        widget.scheduler.setText(cluster.scheduler_address)
        widget.run()
        wait_done(qtbot, widget, timeout=180_000)
        assert errors == []
        out = tmp_path / "out.zarr"
        assert is_complete(out)
        summary = widget.finished_event.summary
        assert summary["distributed"]["n_blocks"] >= 1
        assert widget.tile_table.rowCount() == widget.plan.n_tiles


def test_an_unreachable_cluster_is_a_notification(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    _viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    widget.scheduler.setText("tcp://127.0.0.1:1")
    widget.run()
    wait_done(qtbot, widget, timeout=120_000)
    assert len(errors) == 1 and "127.0.0.1:1" in errors[0]
    assert widget.run_button.isEnabled()
