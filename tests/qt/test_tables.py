import math

import numpy as np

from napari_normcheck._layers import contrast_for, tile_box, tile_features
from napari_normcheck._qt.plots import DisparityHistogram
from napari_normcheck._qt.tile_table import TileTable, header_name
from napari_normcheck.core.base.tiling import plan_tiles


def test_tile_table_sorts_by_largest_channel_unknown_last(qtbot):
    table = TileTable()
    qtbot.addWidget(table)
    table.set_records(
        [
            {"index": 0, "grid": [0, 0, 0], "disparity_soft": [0.1, 0.3], "disparity_hard": [0, 1]},
            {"index": 1, "grid": [0, 0, 1], "disparity_soft": [float("nan")]},
            {"index": 2, "grid": [0, 1, 0], "disparity_soft": [0.5, 0.0]},
        ]
    )
    assert [table.tile_at_row(r) for r in range(3)] == [2, 0, 1]
    assert table.item(1, 2).text() == "0.300" and table.item(2, 2).text() == "-"
    clicked = []
    table.tile_activated.connect(clicked.append)
    table.cellClicked.emit(0, 3)
    assert clicked == [2]


def test_histogram_bins_finite_values_and_saves_a_picture(qtbot, tmp_path):
    histogram = DisparityHistogram()
    qtbot.addWidget(histogram)
    histogram.resize(400, 300)
    histogram.show()
    histogram.set_values([0.0, 0.1, 0.2, math.nan, 0.2], global_value=0.15, channel="membrane")
    assert histogram.counts.sum() == 4
    assert histogram.edges[-1] == 0.2
    xlabel, ylabel = histogram.labels()
    assert xlabel.startswith("soft disparity") and ylabel == "tiles"
    assert histogram._global.value() == 0.15 and histogram._global.isVisible()
    assert "membrane" in histogram.title() and "0.150" in histogram.title()
    assert not histogram.grab().isNull()
    png = histogram.save(tmp_path / "histogram.png")
    from PIL import Image

    picture = np.asarray(Image.open(png).convert("RGB"))
    assert picture.shape[0] > 200 and picture.shape[1] > 300
    assert picture.reshape(-1, 3).std(axis=0).max() > 20  # not blank
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 20
    svg = histogram.save(tmp_path / "histogram.svg")
    assert "<svg" in svg.read_text()


def test_tile_boxes_follow_write_boxes():
    plan = plan_tiles((16, 48, 48), (16, 32, 32), overlap=0.0, blend="crop")
    boxes = [tile_box(t) for t in plan.tiles()]
    assert len(boxes) == plan.n_tiles == 4
    np.testing.assert_allclose(boxes[3][:, 1:].min(axis=0), (31.5, 31.5))
    np.testing.assert_allclose(boxes[3][:, 1:].max(axis=0), (47.5, 47.5))
    features = tile_features(plan, np.arange(4.0))
    # One outline per tile and plane (16 planes each).
    assert list(features["grid_x"][::16]) == [0, 1, 0, 1]
    assert list(features["tile"][::16]) == [0, 1, 2, 3] and len(features["tile"]) == 64
    np.testing.assert_array_equal(features["disparity"], np.repeat(np.arange(4.0), 16))


def test_contrast_limits_follow_the_output_kind():
    assert contrast_for("pred_eval", {"activation": "sigmoid"}) == (0.0, 1.0)
    assert contrast_for("pred_eval", {"activation": "none"}) is None
    assert contrast_for("disparity", {"activation": "none"}) == (0.0, 1.0)
    # Stored uint8 probabilities are read as 0..1: the same limits.
    assert contrast_for("pred_eval", {"output_dtype": "uint8"}) == (0.0, 1.0)


def test_tile_table_switches_to_mismatch_and_feature_z(qtbot):
    table = TileTable()
    qtbot.addWidget(table)
    table.set_records(
        [
            {
                "index": 0,
                "disparity_soft": [0.9],
                "mismatch_eval_soft": [0.1],
                "feature_z": {"max_abs": 4.0},
            },
            {
                "index": 1,
                "disparity_soft": [0.2],
                "mismatch_eval_soft": [0.7],
                "feature_z": {"max_abs": 1.0},
            },
            {"index": 2, "disparity_soft": [0.5], "mismatch_eval_soft": [0.3], "feature_z": None},
        ]
    )
    assert [table.tile_at_row(r) for r in range(3)] == [0, 2, 1]
    table.set_sort_key("mismatch (eval)")
    assert [table.tile_at_row(r) for r in range(3)] == [1, 2, 0]
    table.set_sort_key("feature z")
    assert [table.tile_at_row(r) for r in range(3)] == [0, 1, 2]
    feature_column = [
        header_name(table.horizontalHeaderItem(j).text()) for j in range(table.columnCount())
    ].index("feature |z|")
    assert table.item(0, feature_column).text() == "4.00"


def test_channel_names_come_from_the_model_when_they_fit():
    from napari_normcheck._layers import channel_names, layer_name

    assert channel_names({}, 2) == ["channel 0", "channel 1"]
    model = {"model": {"output_channel_names": ["membrane", "organelle"]}}
    assert channel_names(model, 2) == ["membrane", "organelle"]
    # Not this output's channels:
    assert channel_names(model, 3) == ["channel 0", "channel 1", "channel 2"]
    assert layer_name("disparity", "membrane") == "disparity · membrane"
    assert layer_name("eval", None) == "eval"
