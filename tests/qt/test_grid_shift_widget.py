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

    # The tile table has a grid-shift column: each tile's value of the shown channel, or "-"
    # where the tile's foreground does not pass the support rule.
    table = widget.tile_table
    records = {t["index"]: t for t in summary["tiles"]}
    assert all(len(t["grid_shift_eval_judged"]) == 2 for t in records.values())
    for channel in (0, 1):
        table.set_channel(channel)
        cells = shift_cells(table)
        assert cells.keys() == records.keys()
        for index, text in cells.items():
            record = records[index]
            if record["grid_shift_eval_judged"][channel]:
                assert text == f"{record['grid_shift_eval'][channel]:.3f}"
            else:
                assert text == "-"


def shift_cells(table):
    """The grid-shift column's text by tile (asserting the column is there, before feature |z|)."""
    from napari_normcheck._qt.tile_table import GRID_SHIFT_HEADER, header_name

    headers = [
        header_name(table.horizontalHeaderItem(j).text()) for j in range(table.columnCount())
    ]
    assert GRID_SHIFT_HEADER in headers and headers.index(GRID_SHIFT_HEADER) == len(headers) - 2
    column = headers.index(GRID_SHIFT_HEADER)
    return {table.tile_at_row(r): table.item(r, column).text() for r in range(table.rowCount())}


def test_tile_table_grid_shift_column_follows_the_support_rule(make_napari_viewer, tmp_path):
    from napari_normcheck._qt.tile_table import GRID_SHIFT_HEADER, header_name
    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.run.engine import run_check
    from tests.conftest import calibrate, synthetic_volume, tiny_unet

    _viewer, widget = sample_widget(make_napari_viewer, tmp_path)
    table = widget.tile_table
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    volume = open_volume(synthetic_volume((16, 48, 48)))

    def tiles(**options):
        config = RunConfig(tile=(16, 32, 32), activation="sigmoid", **options)
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}.zarr"
        return list(run_check(volume, model, config, out))[-1].summary["tiles"]

    # Far more foreground asked for than any tile has: no tile's grid shift is judged.
    strict = tiles(grid_shift=0.5, min_foreground=(10**9, 0.0))
    assert all(not any(t["grid_shift_eval_judged"]) for t in strict)
    table.set_records(strict)
    for channel in (0, 1, None):
        table.set_channel(channel)
        assert set(shift_cells(table).values()) == {"-"}
    # The default rule judges these tiles: numbers.
    table.set_records(tiles(grid_shift=0.5))
    table.set_channel(1)
    assert "-" not in shift_cells(table).values()
    # A run without --grid-shift has no such column.
    table.set_records(tiles())
    headers = [
        header_name(table.horizontalHeaderItem(j).text()) for j in range(table.columnCount())
    ]
    assert GRID_SHIFT_HEADER not in headers and "feature" in headers[-1]


def click_point(qtbot, plot, x, y):
    """A real mouse click on the plot at data coordinates ``(x, y)``."""
    from qtpy.QtCore import QPointF, Qt

    plot.item.getViewBox().autoRange()
    scene_pos = plot.item.getViewBox().mapViewToScene(QPointF(x, y))
    view_pos = plot.view.mapFromScene(scene_pos)
    qtbot.mouseClick(plot.view.viewport(), Qt.MouseButton.LeftButton, pos=view_pos)


def test_tile_size_view_runs_the_sweep_plots_it_and_opens_a_setting(
    make_napari_viewer, qtbot, tmp_path
):
    from napari_normcheck._qt.tile_size_view import SWEEP_LAYER_KEY, indicator
    from napari_normcheck.core.run.sweep import recommend

    viewer, widget = sample_widget(make_napari_viewer, tmp_path)
    view = widget.tile_size_view
    qtbot.addWidget(widget)
    widget.resize(520, 900)
    widget.show()
    widget.tabs.setCurrentWidget(widget.tile_size_tab)
    assert not widget.run_buttons.isVisible()  # the tab has its own Run
    view.tiles.setText("16,32,32 16,64,64")
    view.folder.setText(str(tmp_path / "sweep"))
    assert view.run() is not None
    qtbot.waitUntil(lambda: view.worker is None, timeout=240_000)
    assert len(view.rows) == 2 and not any(r.get("refused") for r in view.rows), view.status.text()
    assert view.recommendation == recommend(view.rows, per_tile_norms=[])
    assert view.recommendation_label.text().startswith("recommendation: ")
    # The channel shown at first is the one with the most foreground; the box lists both.
    from napari_normcheck.core.run.sweep import channel_support

    support = channel_support(view.rows)
    first = int(np.argmax(support))
    assert view.channel_combo.count() == 2 and view.channel_combo.currentIndex() == first
    assert view.plot.channel == first
    assert view.channel_combo.currentText() in view.plot.title()
    # One point per setting at (tile x side, grid shift of the channel shown as the
    # recommendation judges it); none where the channel has too little foreground for either.
    for channel in (first, 1 - first):
        view.channel_combo.setCurrentIndex(channel)
        drawn = sorted((spot.pos().x(), spot.pos().y()) for spot in view.plot._points.points())
        expected = sorted(
            (r["tile"][-1], value)
            for r in view.rows
            if (value := indicator(r, "grid_shift", "eval", channel)) is not None
        )
        np.testing.assert_allclose(drawn, expected, rtol=1e-6)
    assert view.plot.channel == 1 - first
    # A choice stays while rows come in (the default is only the first look).
    view._redraw()
    assert view.channel_combo.currentIndex() == 1 - first
    # The default follows the foreground: with the channels' foreground swapped, the other one.
    rows = view.rows
    view.rows = [
        r | {"support": r["support"] | {"soft_foreground": r["support"]["soft_foreground"][::-1]}}
        for r in rows
    ]
    view._channel_chosen = False
    view._redraw()
    assert view.channel_combo.currentIndex() == view.plot.channel == 1 - first
    view.rows = rows
    view.channel_combo.setCurrentIndex(0)
    if view.recommendation["tile"] is not None:
        assert view.plot.star_position() is not None
    for suffix in ("png", "svg"):
        saved = view.plot.save(tmp_path / f"sweep.{suffix}")
        assert saved.stat().st_size > 1000

    # A click on the larger tile's point opens its layers (and only its).
    row = max(view.rows, key=lambda r: r["tile"][-1])
    with qtbot.waitSignal(view.plot.row_clicked, timeout=5_000) as clicked:
        click_point(qtbot, view.plot, row["tile"][-1], indicator(row, "grid_shift", "eval", 0))
    assert clicked.args[0]["out"] == row["out"]
    opened = [layer for layer in viewer.layers if SWEEP_LAYER_KEY in layer.metadata]
    assert opened and all(
        layer.metadata[SWEEP_LAYER_KEY] == "16x64x64 gaussian 0.25" for layer in opened
    )
    assert {layer.metadata.get("normcheck_store") for layer in opened} >= {row["out"]}
    assert len([layer for layer in viewer.layers if layer.visible]) <= MOST_SHOWN
    other = min(view.rows, key=lambda r: r["tile"][-1])
    view.load_setting(other)
    labels = {
        layer.metadata[SWEEP_LAYER_KEY]
        for layer in viewer.layers
        if SWEEP_LAYER_KEY in layer.metadata
    }
    assert labels == {"16x32x32 gaussian 0.25"}


def test_tile_size_plot_draws_soft_values_hollow(qtbot):
    # Channel 0 of the first setting has foreground enough for the hard value, the second's only
    # for the soft one: a filled and a hollow point, at the values the recommendation judges.
    from qtpy.QtCore import Qt

    from napari_normcheck._qt.tile_size_view import SweepPlot

    def row(side, judged):
        values = {"hard": [0.3], "soft": [0.04]}
        return {
            "tile": [16, side, side],
            "overlap": 0.25,
            "blend": "gaussian",
            "disparity": values,
            "mismatch_eval": values,
            "support": {
                "mismatch_judged": {"eval": [judged]},
                "mismatch_soft_judged": {"eval": [True]},
            },
        }

    plot = SweepPlot()
    qtbot.addWidget(plot)
    plot.set_rows(
        [row(32, True), row(64, False)], which=("tile mismatch (eval)", "mismatch_eval", None)
    )
    points = {p.pos().x(): p for p in plot._points.points()}
    assert abs(points[32].pos().y() - 0.3) < 1e-9 and abs(points[64].pos().y() - 0.04) < 1e-9
    assert points[32].brush().style() != Qt.BrushStyle.NoBrush
    assert points[64].brush().style() == Qt.BrushStyle.NoBrush
    assert "hollow: soft" in plot.labels()[1]
