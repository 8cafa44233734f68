"""Issue 18: the Results display shows what it measures (one test per numbered item).

Runs the widget in a real viewer on the packaged sample (``napari_normcheck.data``) with its sample
models, and on a tiny model whose second output channel is nearly empty.
"""

import json

import numpy as np
import pytest
import torch

from napari_normcheck._qt.tile_table import header_name
from napari_normcheck._qt.widget import NormcheckWidget
from napari_normcheck._sample_data import make_sample
from napari_normcheck._tile_layers import NOT_JUDGED_COLOR, tile_edge_colors

from .conftest import ARCH, ARCH_KWARGS

SAMPLE_SHAPE = (16, 64, 64)
TILE = "16,32,32"


def sample_widget(make_napari_viewer, tmp_path, model="batchnorm"):
    viewer = make_napari_viewer()
    data, kwargs, _kind = make_sample(shape=SAMPLE_SHAPE)[0]
    viewer.add_image(data, **kwargs)
    widget = NormcheckWidget(viewer)
    widget.model_source.setCurrentText(f"sample: {model}")
    widget.tile.setText(TILE)
    widget.device.setCurrentText("cpu")
    widget.overwrite.setChecked(True)
    widget.out_path.setText(str(tmp_path / "out.zarr"))
    return viewer, widget


def model_file_widget(make_napari_viewer, model_path, out):
    """The widget on a noise image with a BasicUNet state_dict file (activation left as it is)."""
    viewer = make_napari_viewer()
    image = np.random.default_rng(0).normal(size=(16, 48, 48)).astype(np.float32)
    viewer.add_image(image, name="img")
    widget = NormcheckWidget(viewer)
    widget.model_path.setText(str(model_path))
    widget.arch.setText(ARCH)
    widget.arch_kwargs.setText(json.dumps(ARCH_KWARGS))
    widget.tile.setText(TILE)
    widget.device.setCurrentText("cpu")
    widget.out_path.setText(str(out))
    return viewer, widget


def run_and_wait(qtbot, widget):
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.settled, timeout=120_000)
    assert widget.finished_event is not None, widget.status_label.text()


def output_layer(viewer, group):
    (layer,) = [lay for lay in viewer.layers if lay.metadata.get("normcheck_output") == group]
    return layer


def level0(layer):
    return np.asarray(layer.data[0] if layer.multiscale else layer.data)


@pytest.fixture
def faint_channel_model(tmp_path):
    """A BatchNorm BasicUNet whose second output channel is nearly empty (low, flat logits)."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    model = BasicUNet(**ARCH_KWARGS)
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(2):
            model(torch.randn((1, 1, 16, 32, 32), generator=generator) * (1 + step) + step)
        model.final_conv.weight[1] *= 0.2
        model.final_conv.bias[1] = -3.5
    path = tmp_path / "faint.pt"
    torch.save(model.state_dict(), path)
    return path


def test_item2_tile_maps_cover_their_tiles_on_a_readable_scale(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = sample_widget(make_napari_viewer, tmp_path)
    run_and_wait(qtbot, widget)
    plan = widget.plan
    image = viewer.layers[widget.run_input[0]]
    for group in ("tile_disparity_soft", "tile_mismatch_eval"):
        layer = output_layer(viewer, group)
        drawn = level0(layer)
        # Region-sized, placed on the image's voxels: to the right and bottom edges.
        assert drawn.shape == SAMPLE_SHAPE
        np.testing.assert_allclose(layer.data_to_world((0, 0, 0)), image.data_to_world((0, 0, 0)))
        import zarr

        grid = zarr.open_group(widget.finished_event.out, mode="r")[f"{group}/0"]
        grid = np.asarray(grid[widget.results.channel], dtype=float)
        # Each tile's cell starts at its tile's start (the outline's corner); the last cell ends
        # at the region's edge.
        for tile in plan.tiles():
            np.testing.assert_allclose(drawn[tile.write_start], grid[tile.grid], rtol=1e-6)
        last = plan.get_tile(plan.n_tiles - 1)
        np.testing.assert_allclose(drawn[-1, -1, -1], grid[last.grid], rtol=1e-6)
        # Values are 0..1 and the contrast ends at the map's largest value (or a small floor).
        low, high = layer.contrast_limits
        top = np.nanmax(grid)
        assert low == 0.0 and high == pytest.approx(max(top, 0.02), rel=1e-5)
    feature = viewer.layers["feature z"]
    assert level0(feature).shape == SAMPLE_SHAPE


def test_item3_seams_shown_by_default_at_a_visible_contrast(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = sample_widget(make_napari_viewer, tmp_path)
    assert widget.seams.isChecked()  # Advanced's box, checked by default
    run_and_wait(qtbot, widget)
    seams = output_layer(viewer, "seams_eval")
    assert seams.visible
    values = level0(seams)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
    # The status bar reads the 0..1 value at a voxel.
    peak = np.unravel_index(np.argmax(values), values.shape)
    world = seams.data_to_world(peak)
    viewer.dims.set_point(0, world[0])
    read = seams.get_value(world, world=True)
    read = read[1] if isinstance(read, tuple) else read  # (level, value) of a multiscale layer
    assert float(read) == pytest.approx(float(values[peak]))
    _low, high = seams.contrast_limits
    positive = values[values > 0]
    # The seams' course is visible: the top of the colormap at most the largest seam value and
    # no higher than most seam voxels reach (the largest 5 % saturate), never below a floor.
    assert positive.size and high <= max(float(positive.max()), 0.05) + 1e-6
    assert high == pytest.approx(max(float(np.percentile(positive, 95)), 0.05), rel=1e-4)
    disparity = output_layer(viewer, "disparity")
    assert disparity.colorbar.visible and not seams.colorbar.visible
    assert level0(disparity).max() <= 1.0


def test_item3_seams_follow_the_advanced_checkbox(make_napari_viewer, tmp_path):
    viewer, widget = sample_widget(make_napari_viewer, tmp_path)
    layer = viewer.layers[widget.image_combo.currentText()]
    assert widget.build_config(SAMPLE_SHAPE, layer).seams
    widget.seams.setChecked(False)  # a user on a big region turns them off
    assert not widget.build_config(SAMPLE_SHAPE, layer).seams
    widget.seams.setChecked(True)
    assert widget.build_config(SAMPLE_SHAPE, layer).seams


def test_item4_a_second_run_replaces_the_first_runs_display(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = sample_widget(make_napari_viewer, tmp_path, "batchnorm")
    run_and_wait(qtbot, widget)
    assert "feature z" in viewer.layers and widget.feature_layer_combo.count() > 0
    assert widget.scatter.tiles.size == widget.plan.n_tiles and not widget.scatter.message
    widget.model_source.setCurrentText("sample: groupnorm")
    widget.tile.setText(TILE)
    run_and_wait(qtbot, widget)
    # GroupNorm keeps no running statistics: no feature map, no layer choice, plots say why.
    assert "feature z" not in viewer.layers
    assert widget.feature_layer_combo.count() == 0
    assert widget.feature_plot.tile_means.size == 0 and widget.feature_plot.running_mean is None
    assert "running statistics" in widget.scatter.message
    assert "running statistics" in widget.feature_plot.message
    # Every result layer reads this run's store.
    out = str(widget.finished_event.out)
    for layer in widget.results.layers.values():
        if layer in viewer.layers and "normcheck_store" in layer.metadata:
            assert layer.metadata["normcheck_store"] in (out, out + ".inprogress")


def test_item5_table_feature_column_is_the_plots_layer_and_channel(
    make_napari_viewer, qtbot, tmp_path
):
    viewer, widget = sample_widget(make_napari_viewer, tmp_path)
    run_and_wait(qtbot, widget)
    layer_name = widget.feature_layer_combo.currentText()
    channel = widget.feature_channel_combo.currentIndex()
    table = widget.tile_table
    header = table.horizontalHeaderItem(table.columnCount() - 1)
    # The header says the column is the plots' layer; the tooltip names it and its module path.
    assert header.text().splitlines() == ["feature", "|z|", "(plotted)"]
    assert f"in {layer_name}, channel {channel}" in header.toolTip()
    assert widget.norm_layer_text(widget.feature_layer_combo.currentData()) == layer_name
    assert widget.feature_layer_combo.currentData() in header.toolTip()  # the module path
    # The scatter's x label is short (not cut at the plot's edge); layer and channel in its title.
    assert widget.scatter.labels()[0] == "|feature z| per tile"
    assert widget.scatter.title() == f"{layer_name}, channel {channel}"
    plotted = dict(zip(widget.scatter.tiles.tolist(), widget.scatter.z.tolist()))
    assert plotted
    for row in range(table.rowCount()):
        tile = table.tile_at_row(row)
        shown = float(table.item(row, table.columnCount() - 1).text())
        assert shown == pytest.approx(plotted[tile], abs=0.006)
    # Another channel of the layer: the column follows the plot.
    if widget.feature_channel_combo.count() > 1:
        widget.feature_channel_combo.setCurrentIndex(1 - min(channel, 1))
        header = table.horizontalHeaderItem(table.columnCount() - 1).toolTip()
        assert f"channel {widget.feature_channel_combo.currentIndex()}:" in header


def test_item7_words_and_fixed_colours_on_a_faint_channel(
    make_napari_viewer, qtbot, tmp_path, faint_channel_model
):
    viewer, widget = model_file_widget(
        make_napari_viewer, faint_channel_model, tmp_path / "faint.zarr"
    )
    widget.activation.setCurrentText("sigmoid")
    run_and_wait(qtbot, widget)
    # Channel names a biologist reads (the model names none).
    names = [widget.channel_combo.itemText(i) for i in range(widget.channel_combo.count())]
    assert names == ["channel 0", "channel 1"]
    widget.channel_combo.setCurrentIndex(1)
    qtbot.waitUntil(lambda: widget.settled, timeout=10_000)
    # The nearly empty channel's prediction: its largest values plainly visible, not lost in 0..1.
    evaluated = viewer.layers["eval · channel 1"]
    values = level0(evaluated)
    assert values.max() < 0.2
    _low, high = evaluated.contrast_limits
    assert high < 0.5 and high >= min(np.percentile(values[values > 0], 99), 1.0) - 1e-6
    assert tuple(viewer.layers["train · channel 1"].contrast_limits) == tuple(
        evaluated.contrast_limits
    )
    # Tooltips say what soft, hard, flips and mismatch mean.
    table = widget.tile_table
    tips = " ".join(
        table.horizontalHeaderItem(c).toolTip() for c in range(table.columnCount())
    ).lower()
    for word in ("soft:", "hard:", "flips:", "mismatch:"):
        assert word in tips
    # Outline colours follow the verdict's rule: the hard disparity of judged tiles on a fixed
    # scale, grey where the channel is not judged (this nearly empty one), with a legend.
    tiles = viewer.layers["tiles"]
    features = tiles.features
    flags = features["judged"].to_numpy()
    np.testing.assert_allclose(
        tiles.edge_color, tile_edge_colors(features["disparity"].to_numpy(), judged=flags)
    )
    records = {r["index"]: r for r in widget.finished_event.summary["tiles"]}
    for tile, flag, value in zip(features["tile"], flags, features["disparity"]):
        assert flag == records[tile]["judged"][1]
        if flag:
            assert value == pytest.approx(records[tile]["disparity_hard"][1])
    assert not flags.all()  # the faint channel has tiles too empty to judge
    np.testing.assert_allclose(tiles.edge_color[~flags], [NOT_JUDGED_COLOR] * int((~flags).sum()))
    # The summary: short lines, the core's verdict (channel 0 judged, channel 1 not judged).
    from napari_normcheck.core.run.report import verdict_detail, verdict_lines

    summary = widget.finished_event.summary
    assert summary["support"]["judged"] == [True, False]
    lines = widget.summary_label.text().split("\n")
    assert lines[0].startswith("done: ") and lines[-1].startswith("Output: ")
    assert lines[1:-1] == verdict_lines(summary, ["channel 0", "channel 1"])
    assert verdict_detail(summary)["channel"] == 0 and "(channel 0, hard " in lines[1]
    assert any(line.startswith("channel 1: ") and "not judged" in line for line in lines[2:-1])
    legend = widget.tile_legend.text()
    assert "hard disparity" in legend and "0.1 and above" in legend and "not judged" in legend
    np.testing.assert_allclose(tile_edge_colors(np.array([0.06])), [(1.0, 0.55, 0.0, 1.0)])
    np.testing.assert_allclose(tile_edge_colors(np.array([0.65])), [(1.0, 0.0, 0.0, 1.0)])


def test_item8_layout_table_rows_and_selected_layer(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = sample_widget(lambda: make_napari_viewer(show=True), tmp_path)
    viewer.window.add_dock_widget(widget, area="right")
    table = widget.tile_table
    assert table.minimumSizeHint().height() >= table.rows_height(8)
    run_and_wait(qtbot, widget)
    active = viewer.layers.selection.active
    assert active is not None and active.metadata.get("normcheck_output") == "disparity"
    assert viewer.layers["tiles"] not in viewer.layers.selection
    # At both window sizes, after a run (its feature column named), the tile table shows 8 rows
    # under its header and every column fits the dock: no horizontal scrolling, no column cut.
    window = viewer.window._qt_window
    widget.tabs.setCurrentWidget(widget.results_tab)
    for size in ((1600, 1000), (1280, 800)):
        window.resize(*size)
        qtbot.waitUntil(lambda s=size: window.width() == s[0], timeout=5_000)
        qtbot.wait(50)
        rows = table.viewport().height() / table.verticalHeader().defaultSectionSize()
        assert rows >= 8, (size, rows)
        assert table.horizontalHeader().length() <= table.viewport().width(), size
        for column in range(table.columnCount()):
            assert table.columnWidth(column) >= table.sizeHintForColumn(column), (size, column)


def test_support_rule_not_judged_shows_dash_ranks_last_and_greys_the_outline(qtbot):
    from napari_normcheck._qt.tile_table import TileTable

    table = TileTable()
    qtbot.addWidget(table)
    records = [
        {
            "index": 0,
            "grid": [0, 0, 0],
            "disparity_soft": [0.1, 0.9],
            "disparity_hard": [0.1, 0.95],
            "judged": [True, False],
        },
        {
            "index": 1,
            "grid": [0, 0, 1],
            "disparity_soft": [0.2, 0.3],
            "disparity_hard": [0.2, 0.3],
            "judged": [True, True],
        },
        {"index": 2, "grid": [0, 1, 0], "disparity_soft": [0.05, 0.05]},  # no "judged": judged
    ]
    table.set_records(records)
    table.set_channel(1)
    headers = [
        header_name(table.horizontalHeaderItem(c).text()) for c in range(table.columnCount())
    ]
    hard = headers.index("hard disparity")
    row_of = {table.tile_at_row(r): r for r in range(table.rowCount())}
    assert table.item(row_of[0], hard).text() == "-"
    assert table.item(row_of[1], hard).text() == "0.300"
    # The hard value of a tile not judged never ranks first (here it is the largest).
    from napari_normcheck._qt.tile_table import metric_value

    value = metric_value("disparity_hard")
    ranked = sorted(records, key=lambda r: -np.nan_to_num(value(r, 1), nan=-1.0))
    assert ranked[0]["index"] == 1
    assert np.isnan(value(records[0], 1)) and value(records[0], None) == pytest.approx(0.1)
    colors = tile_edge_colors(np.array([0.9, 0.3, 0.05]), judged=np.array([False, True, True]))
    np.testing.assert_allclose(colors[0], NOT_JUDGED_COLOR)
    np.testing.assert_allclose(colors[1], (1.0, 0.0, 0.0, 1.0))


def test_logits_without_an_activation_are_named_in_the_model_box_and_the_verdict(
    make_napari_viewer, qtbot, tmp_path, faint_channel_model
):
    # The widget's activation defaults to none; this model returns logits.
    _viewer, widget = model_file_widget(
        make_napari_viewer, faint_channel_model, tmp_path / "l.zarr"
    )
    assert widget.activation.currentText() == "none"
    run_and_wait(qtbot, widget)
    assert "outputs are not probabilities" in widget.model_label.text()
    summary = widget.finished_event.summary
    assert summary["support"]["probabilities"] is False
    assert summary["support"]["soft_judged"] == [False, False]
    text = widget.summary_label.text()
    assert "The predictions are not probabilities" in text and "sigmoid or softmax" in text
    assert "speaks for it" not in text  # no soft value stands in for a channel
