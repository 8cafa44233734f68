import numpy as np
import pytest
import torch
import zarr

from napari_normcheck._qt.region import FIELD_OF_VIEW, SHAPES_BOX, camera_of, canvas_size
from napari_normcheck._qt.widget import NormcheckWidget
from napari_normcheck.core.io.store import is_complete, is_normcheck_store

from .conftest import fill_model

SCALE = (2.0, 0.5, 0.5)
TRANSLATE = (10.0, 5.0, 5.0)


def make_widget(make_napari_viewer, image, model_file, tmp_path, **settings):
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img", scale=SCALE, translate=TRANSLATE)
    widget = NormcheckWidget(viewer)
    fill_model(widget, model_file)
    widget.tile.setText(settings.get("tile", "16,32,32"))
    widget.activation.setCurrentText("sigmoid")
    widget.overlap.setValue(settings.get("overlap", 0.25))
    widget.device.setCurrentText("cpu")
    widget.out_path.setText(str(tmp_path / "out.zarr"))
    return viewer, widget


def plan_tiles(widget):
    return widget.plan.n_tiles


def level0(layer):
    """The layer's full-resolution data as an array (result layers are multiscale)."""
    return np.asarray(layer.data[0] if layer.multiscale else layer.data)


def stand_in(layer):
    """The layer still shows an all-zero stand-in of an output not written."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return type(data).__name__ == "EmptyChannel"


def output_layer(viewer, group):
    """The one layer showing output ``group`` (whatever channel it shows)."""
    (layer,) = [lay for lay in viewer.layers if lay.metadata.get("normcheck_output") == group]
    return layer


def wait_done(qtbot, widget, timeout=60_000):
    """Wait for the worker and for the results it left to be shown (one GUI step per layer)."""
    qtbot.waitUntil(lambda: widget.settled, timeout=timeout)


def test_run_adds_lazy_layers_matching_the_store(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    assert widget.image_combo.currentText() == "img"
    worker = widget.run()
    assert worker is not None
    wait_done(qtbot, widget)
    assert errors == []
    out = tmp_path / "out.zarr"
    assert is_complete(out)
    root = zarr.open_group(str(out), mode="r")
    n_layers = len(viewer.layers)
    assert n_layers <= 9  # the input and at most 8 result layers
    for channel in (1, 0):
        widget.channel_combo.setCurrentIndex(channel)
        for group, short in (("pred_eval", "eval"), ("pred_train", "train")):
            stored = np.asarray(root[f"{group}/0"][...])
            layer = viewer.layers[f"{short} · channel {channel}"]
            np.testing.assert_allclose(layer.scale, SCALE)
            np.testing.assert_allclose(layer.translate, TRANSLATE)
            # Shown on the 0..1 scale of probabilities, however stored.
            divisor = 255.0 if stored.dtype == np.uint8 else 1.0
            np.testing.assert_allclose(level0(layer), stored[channel] / divisor, atol=1e-6)
        assert f"disparity · channel {channel}" in viewer.layers
        # The grids, added before the run as stand-ins, now read the store: each tile's cell
        # over its own voxels, from its start to the next tile's (the last to the region's edge).
        grid = root["tile_disparity_soft/0"][channel]
        drawn = level0(viewer.layers[f"tile disparity · channel {channel}"])
        assert drawn.shape == small_image.shape
        for tile in widget.plan.tiles():
            np.testing.assert_allclose(drawn[tile.write_start], grid[tile.grid])
        assert len(viewer.layers) == n_layers
    assert not any(stand_in(lay) for lay in viewer.layers)
    # BatchNorm with foreign running statistics: the two modes differ.
    assert not np.array_equal(
        np.asarray(root["pred_eval/0"][...]), np.asarray(root["pred_train/0"][...])
    )
    tiles = viewer.layers["tiles"]
    assert set(tiles.features["tile"]) == set(range(widget.plan.n_tiles))
    assert widget.plan.n_tiles == widget.tile_table.rowCount()
    judged = tiles.features["judged"].to_numpy()  # hard disparity where judged, else NaN
    assert np.isfinite(tiles.features["disparity"].to_numpy()[judged]).all()
    assert widget.histogram.counts.sum() == widget.plan.n_tiles
    assert widget.histogram.grab().width() > 0
    # Probabilities: 0..1 at most (the top follows the data), eval and train alike.
    limits = tuple(viewer.layers["eval · channel 0"].contrast_limits)
    assert limits[0] == 0.0 and 0.1 <= limits[1] <= 1.0
    assert tuple(viewer.layers["train · channel 0"].contrast_limits) == limits
    assert widget.status_label.text().startswith(f"done: {plan_tiles(widget)} tiles")
    status = widget.summary_label.text()  # the Results tab's summary
    summary = widget.finished_event.summary
    assert status.startswith(f"done: {plan_tiles(widget)} tiles")
    # Short lines: the core's verdict lines between the run's head and the output.
    from napari_normcheck.core.run.report import verdict_lines

    names = [widget.channel_combo.itemText(i) for i in range(widget.channel_combo.count())]
    assert status.split("\n")[1:-1] == verdict_lines(summary, names)
    assert "disparity (" in status  # the verdict
    # Tile outlines (of channel 0 now): coloured on the fixed scale of the legend (grey: not judged).
    from napari_normcheck._tile_layers import tile_edge_colors

    values = tiles.features["disparity"].to_numpy()
    judged = tiles.features["judged"].to_numpy()
    np.testing.assert_allclose(tiles.edge_color, tile_edge_colors(values, judged=judged), atol=1e-6)
    # The inventory of the model loaded by the run is shown.
    assert widget.inventory_table.rowCount() > 0
    assert "running statistics" in widget.verdict_label.text()


def test_cancel_keeps_partial_store_and_model_state(
    make_napari_viewer, qtbot, tiny_model_file, tmp_path, errors
):
    image = np.random.default_rng(1).normal(size=(32, 48, 48)).astype(np.float32)
    viewer, widget = make_widget(make_napari_viewer, image, tiny_model_file, tmp_path, overlap=0.0)
    tiles_done = []
    worker = widget.run()
    worker.yielded.connect(
        lambda item: tiles_done.append(item) if type(item).__name__ == "TileDone" else None
    )
    # Set before the first tile finishes (the model still loads): the run stops after one tile.
    widget.cancel()
    wait_done(qtbot, widget)
    assert errors == []
    out = tmp_path / "out.zarr"
    assert is_normcheck_store(out) and not is_complete(out)
    assert len(tiles_done) == 1 and tiles_done[0].n_total == 8
    assert widget.progress.value() == 1
    assert widget.tile_table.rowCount() == 1  # from the tile's own metrics
    assert widget.tile_table.tile_at_row(0) == tiles_done[0].tile.index
    assert "partial output" in widget.status_label.text()
    assert "eval · channel 0" in viewer.layers
    # Only what the stopped run wrote is shown: no all-zero stand-ins are left.
    assert not any(stand_in(lay) for lay in viewer.layers)
    module = widget.model_ready.loaded.module
    saved = torch.load(tiny_model_file, weights_only=True)
    for key, value in module.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not module.training


def test_resume_after_cancel_completes_the_same_output(
    make_napari_viewer, qtbot, tiny_model_file, tmp_path, errors
):
    image = np.random.default_rng(1).normal(size=(32, 48, 48)).astype(np.float32)
    viewer, widget = make_widget(make_napari_viewer, image, tiny_model_file, tmp_path, overlap=0.0)
    widget.run()
    widget.cancel()
    wait_done(qtbot, widget)
    out = tmp_path / "out.zarr"
    assert not is_complete(out) and widget.resume_button.isEnabled()
    n_layers = len(viewer.layers)
    worker = widget.resume()
    assert worker is not None
    wait_done(qtbot, widget)
    assert errors == []
    assert is_complete(out) and not widget.resume_button.isEnabled()
    assert len(viewer.layers) >= n_layers and len({layer.name for layer in viewer.layers}) == len(
        viewer.layers
    )
    assert widget.tile_table.rowCount() == 8  # every tile, from the finished run's summary


def test_tile_table_click_moves_the_view(
    make_napari_viewer, qtbot, tiny_model_file, tmp_path, errors
):
    from qtpy.QtCore import Qt

    image = np.random.default_rng(2).normal(size=(32, 48, 48)).astype(np.float32)
    viewer, widget = make_widget(make_napari_viewer, image, tiny_model_file, tmp_path, overlap=0.0)
    widget.run()
    wait_done(qtbot, widget)
    table = widget.tile_table
    assert table.rowCount() == 8
    values = [float(table.item(r, 2).text()) for r in range(table.rowCount())]
    assert values == sorted(values, reverse=True)
    # Pick a row whose tile lies in the upper z half, away from the view's start.
    row = next(
        r
        for r in range(table.rowCount())
        if widget.plan.get_tile(table.tile_at_row(r)).grid[0] == 1
    )
    index = table.tile_at_row(row)
    tile = widget.plan.get_tile(index)
    before = viewer.dims.current_step
    rect = table.visualItemRect(table.item(row, 0))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    z_world = TRANSLATE[0] + SCALE[0] * (tile.write_start[0] + tile.write_stop[0] - 1) // 2
    y_world = TRANSLATE[1] + SCALE[1] * (tile.write_start[1] + tile.write_stop[1] - 1) / 2
    x_world = TRANSLATE[2] + SCALE[2] * (tile.write_start[2] + tile.write_stop[2] - 1) / 2
    assert viewer.dims.current_step != before
    assert viewer.dims.point[0] == pytest.approx(z_world, abs=SCALE[0])
    np.testing.assert_allclose(camera_of(viewer).center[-2:], (y_world, x_world))
    tiles = viewer.layers["tiles"]
    (selected,) = tiles.selected_data
    assert tiles.features["tile"][selected] == index
    assert widget.tile_table.selected_tile() == index


def test_missing_model_file_is_a_notification(
    make_napari_viewer, qtbot, small_image, tmp_path, errors
):
    viewer, widget = make_widget(make_napari_viewer, small_image, tmp_path / "nowhere.pt", tmp_path)
    widget.run()
    wait_done(qtbot, widget)
    assert len(errors) == 1 and "not found" in errors[0]
    assert widget.run_button.isEnabled()


def test_tile_not_divisible_is_a_notification(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    viewer, widget = make_widget(
        make_napari_viewer, small_image, tiny_model_file, tmp_path, tile="16,30,30"
    )
    widget.run()
    wait_done(qtbot, widget)
    assert len(errors) == 1 and "divisible" in errors[0]
    widget.tile.setText("a,b")
    assert widget.run() is None
    assert len(errors) == 2 and "tile" in errors[1]


def test_load_model_shows_inventory(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    worker = widget.load_model()
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        pass
    assert errors == []
    names = [
        widget.inventory_table.item(r, 0).text() for r in range(widget.inventory_table.rowCount())
    ]
    assert names and all(n.startswith("BatchNorm3d, ") for n in names)
    assert "BasicUNet" not in widget.verdict_label.text()
    assert "running statistics" in widget.verdict_label.text()


def test_shapes_box_region(make_napari_viewer, small_image, tmp_path, tiny_model_file):
    viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    # World box y 10..20, x 8..18 -> voxels y 10..30, x 6..26 (scale 0.5, translate 5).
    viewer.add_shapes([[[10, 8], [20, 18]]], shape_type="rectangle", name="box")
    widget.region_combo.setCurrentText(SHAPES_BOX)
    widget.shapes_combo.setCurrentText("box")
    config = widget.build_config((16, 48, 48), viewer.layers["img"])
    assert config.roi == ((0, 16), (10, 31), (6, 27))


def test_sample_layer_offers_sample_models(make_napari_viewer):
    from napari_normcheck._sample_data import make_sample
    from napari_normcheck.data import SAMPLE_MODELS

    viewer = make_napari_viewer()
    widget = NormcheckWidget(viewer)
    assert widget.model_source.count() == 1
    data, kwargs, kind = make_sample(shape=(8, 32, 32))[0]
    assert kind == "image" and data.shape == (8, 32, 32) and data.dtype == np.uint8
    (layer,) = viewer.open_sample("napari-normcheck", "synthetic_em")
    assert layer.metadata["normcheck_sample"]
    assert widget.image_combo.currentText() == kwargs["name"]
    layer.name = "renamed"
    assert widget.image_combo.currentText() == "renamed"
    assert widget.model_source.count() == 1 + len(SAMPLE_MODELS)
    widget.model_source.setCurrentText("sample: batchnorm")
    sample = SAMPLE_MODELS["batchnorm"]
    assert widget.arch.text() == sample.arch
    assert widget.normalize.text() == sample.normalize
    assert widget.tile.text() == ",".join(map(str, sample.tile))


def test_field_of_view_region(make_napari_viewer, small_image, tmp_path, tiny_model_file):
    viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    camera = camera_of(viewer)
    height, width = canvas_size(viewer)
    camera.center = (0.0, 15.0, 12.0)
    camera.zoom = max(height, width) / 4.0  # a world window of at most 4 x 4 units
    widget.region_combo.setCurrentText(FIELD_OF_VIEW)
    roi = widget.build_config((16, 48, 48), viewer.layers["img"]).roi
    assert roi[0] == (0, 16)
    # World y 15 -> voxel 20, x 12 -> voxel 14; the window is at most 8 voxels wide.
    (y0, y1), (x0, x1) = roi[1], roi[2]
    assert y0 <= 20 < y1 and x0 <= 14 < x1
    assert y1 - y0 <= 9 and x1 - x0 <= 9


def test_rerun_with_overwrite_repoints_layers(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    widget.run()
    wait_done(qtbot, widget)
    n_layers = len(viewer.layers)
    # Without overwrite, an existing output is refused with a notification.
    widget.run()
    wait_done(qtbot, widget)
    assert len(errors) == 1 and "already exists" in errors[0]
    # With overwrite and other settings, the same layers show the new (complete) store.
    widget.overwrite.setChecked(True)
    widget.activation.setCurrentText("none")
    widget.tile.setText("16,48,48")  # other tiles: the outlines are replaced
    widget.run()
    wait_done(qtbot, widget)
    assert len(errors) == 1
    assert len(viewer.layers) == n_layers
    out = tmp_path / "out.zarr"
    assert is_complete(out) and not (tmp_path / "out.zarr.inprogress").exists()
    stored = zarr.open_group(str(out), mode="r")["pred_eval/0"][0]
    assert stored.min() < 0  # logits now, not probabilities
    widget.channel_combo.setCurrentIndex(0)
    qtbot.waitUntil(lambda: widget.settled, timeout=10_000)
    np.testing.assert_array_equal(level0(viewer.layers["eval · channel 0"]), stored)
    assert set(viewer.layers["tiles"].features["tile"]) == {0} and widget.plan.n_tiles == 1
    # Logits: the contrast follows the data, not the 0..1 of probabilities.
    low, high = viewer.layers["eval · channel 0"].contrast_limits
    assert low < 0 and low >= stored.min() - 1e-6


def test_2d_image_with_a_2d_model(make_napari_viewer, qtbot, tmp_path, errors):
    import json

    from monai.networks.nets import BasicUNet

    kwargs = {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "features": [4, 4, 8, 8, 16, 4],
    }
    torch.manual_seed(0)
    path = tmp_path / "unet2d.pt"
    torch.save(BasicUNet(**kwargs).state_dict(), path)
    viewer = make_napari_viewer()
    image = np.random.default_rng(3).normal(size=(48, 64)).astype(np.float32)
    viewer.add_image(image, name="plane", scale=(0.5, 0.25))
    widget = NormcheckWidget(viewer)
    widget.model_path.setText(str(path))
    widget.arch.setText("monai.networks.nets.BasicUNet")
    widget.arch_kwargs.setText(json.dumps(kwargs))
    widget.tile.setText("32,32")
    widget.device.setCurrentText("cpu")
    widget.out_path.setText(str(tmp_path / "plane.zarr"))
    widget.run()
    wait_done(qtbot, widget)
    assert errors == []
    layer = viewer.layers["eval"]  # one output channel: no channel suffix
    assert level0(layer).shape == (1, 48, 64)
    np.testing.assert_allclose(layer.scale[-2:], (0.5, 0.25))
    widget.go_to_tile(widget.tile_table.tile_at_row(0))
    assert is_complete(tmp_path / "plane.zarr")


def test_multiscale_layer_runs_at_the_chosen_level(
    make_napari_viewer, qtbot, tiny_model_file, tmp_path, errors
):
    full = np.random.default_rng(2).normal(size=(16, 64, 64)).astype(np.float32)
    viewer = make_napari_viewer()
    layer = viewer.add_image([full, full[:, ::2, ::2]], name="img", multiscale=True, scale=SCALE)
    widget = NormcheckWidget(viewer)
    fill_model(widget, tiny_model_file)
    widget.tile.setText("16,32,32")
    widget.device.setCurrentText("cpu")
    widget.out_path.setText(str(tmp_path / "out.zarr"))
    assert widget.level_spin.maximum() == 1
    widget.level_spin.setValue(1)
    widget.run()
    wait_done(qtbot, widget)
    assert errors == []
    pred = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["pred_eval/0"]
    assert pred.shape[1:] == (16, 32, 32)
    result = output_layer(viewer, "pred_eval")
    np.testing.assert_allclose(result.scale[-3:], np.asarray(layer.scale[-3:]) * [1, 2, 2])


def test_export_report_writes_one_row_per_tile(
    make_napari_viewer, qtbot, tiny_model_file, tmp_path, errors
):
    image = np.random.default_rng(3).normal(size=(16, 48, 48)).astype(np.float32)
    viewer, widget = make_widget(make_napari_viewer, image, tiny_model_file, tmp_path)
    assert widget.export_report(tmp_path / "early.csv") is None and errors  # nothing to report yet
    errors.clear()
    widget.run()
    wait_done(qtbot, widget)
    assert widget.report_button.isEnabled()
    written = widget.export_report(tmp_path / "report.csv")
    rows = written.read_text().splitlines()
    assert rows[0].startswith("index,start,stop,disparity_hard")
    assert len(rows) == 1 + widget.finished_event.summary["n_tiles"]
    assert widget.export_report(tmp_path / "report.csv") is None  # never overwritten silently
    assert "already exists" in errors[-1]


def test_box_region_layers_overlay_the_input(
    make_napari_viewer, qtbot, tiny_model_file, tmp_path, errors
):
    image = np.random.default_rng(4).normal(size=(16, 64, 64)).astype(np.float32)
    viewer, widget = make_widget(make_napari_viewer, image, tiny_model_file, tmp_path)
    # World y 13..29, x 9..29 -> voxels y 16..48, x 8..48 (scale 0.5, translate 5).
    viewer.add_shapes([[[13, 9], [29, 29]]], shape_type="rectangle", name="box")
    widget.region_combo.setCurrentText(SHAPES_BOX)
    widget.shapes_combo.setCurrentText("box")
    widget.run()
    wait_done(qtbot, widget)
    assert errors == []
    roi = widget.finished_event.summary.get("params", {}).get("roi") or widget.plan.to_dict()
    stored = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["pred_eval/0"]
    (y0, y1), (x0, x1) = (16, 49), (8, 49)
    assert stored.shape[1:] == (16, y1 - y0, x1 - x0), roi
    widget.channel_combo.setCurrentIndex(0)
    layer = viewer.layers["eval · channel 0"]
    divisor = 255.0 if stored.dtype == np.uint8 else 1.0
    np.testing.assert_allclose(level0(layer), stored[0] / divisor, atol=1e-6)
    # The result's first voxel lies on the input's voxel (0, y0, x0), in world coordinates.
    raw = viewer.layers["img"]
    np.testing.assert_allclose(layer.data_to_world((0, 0, 0)), raw.data_to_world((0, y0, x0)))
    np.testing.assert_allclose(layer.scale, SCALE)
    tiles = viewer.layers["tiles"]
    first = widget.plan.get_tile(0)
    assert first.write_start[1:] == (y0, x0)
    np.testing.assert_allclose(tiles.scale, SCALE)
    np.testing.assert_allclose(tiles.translate, TRANSLATE)


def test_feature_layers_field_reaches_the_configuration(
    make_napari_viewer, small_image, tiny_model_file, tmp_path
):
    viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
    widget.feature_layers.setText("down_1.convs.conv_0.adn.N, final_conv")
    config = widget.build_config((16, 48, 48), viewer.layers["img"])
    assert config.feature_layers == ("down_1.convs.conv_0.adn.N", "final_conv")


def test_layers_exist_before_the_engine_starts_even_with_one_pool_thread(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    from qtpy.QtCore import QThreadPool

    # napari's workers share one pool (a thread per CPU); the run's worker holds one while it
    # waits for its layers: preparing them must not need another thread of that pool.
    pool = QThreadPool.globalInstance()
    threads = pool.maxThreadCount()
    pool.setMaxThreadCount(1)
    try:
        viewer, widget = make_widget(make_napari_viewer, small_image, tiny_model_file, tmp_path)
        seen = []

        def on_item(item):
            if type(item).__name__ == "RunStarted":
                names = {layer.name for layer in viewer.layers}
                seen.append((widget.run_request.layers_ready.is_set(), names))

        worker = widget.run()
        worker.yielded.connect(on_item)
        wait_done(qtbot, widget)
    finally:
        pool.setMaxThreadCount(threads)
    assert errors == []
    ((ready, names),) = seen
    assert ready
    assert {"eval · channel 0", "disparity · channel 0", "train · channel 0", "tiles"} <= names
    assert {"tile disparity · channel 0", "tile mismatch · channel 0", "feature z"} <= names
    # The seams maps are stored (and shown) only when asked for.
    assert len(names) == 8 if "seams (eval) · channel 0" not in names else 9
