"""One layer per output whatever the channel count, the channel choice, the clickable plot, pyramids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck import _layers
from napari_normcheck._qt.region import camera_of
from napari_normcheck._qt.results import ResultLayers
from napari_normcheck._reader import layers_from_store
from napari_normcheck._tile_layers import tile_center, to_world
from napari_normcheck.core.run.report import tile_hard_value

from .conftest import ARCH, ARCH_KWARGS
from .test_widget import SCALE, TRANSLATE, level0, make_widget, wait_done

MAX_RESULT_LAYERS = 8


@pytest.fixture
def five_channel_model(tmp_path):
    """The tiny BatchNorm U-Net with five output channels, as a state_dict file."""
    from monai.networks.nets import BasicUNet

    kwargs = {**ARCH_KWARGS, "out_channels": 5}
    torch.manual_seed(0)
    model = BasicUNet(**kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn((1, 1, 16, 32, 32)) * 3 + 1)
    path = tmp_path / "five.pt"
    torch.save(model.state_dict(), path)
    return path, kwargs


def result_layers(viewer):
    return [layer for layer in viewer.layers if "normcheck_output" in layer.metadata]


def test_five_channels_keep_eight_layers_and_switching_repoints_them(
    make_napari_viewer, qtbot, small_image, five_channel_model, tmp_path, errors
):
    path, kwargs = five_channel_model
    viewer, widget = make_widget(make_napari_viewer, small_image, path, tmp_path)
    widget.arch_kwargs.setText(json.dumps(kwargs))
    widget.seams.setChecked(True)  # every output the widget shows
    widget.run()
    wait_done(qtbot, widget)
    assert errors == []
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    layers = result_layers(viewer)
    assert len(layers) == MAX_RESULT_LAYERS  # eval, train, disparity, seams, 2 grids, z, tiles
    assert len(viewer.layers) == MAX_RESULT_LAYERS + 1
    assert widget.channel_combo.count() == 5
    # The default channel is the one with the highest disparity.
    soft = widget.finished_event.summary["disparity"]["soft"]
    assert widget.channel_combo.currentIndex() == int(np.argmax(soft))
    # Short whole names, grouped at the top of the layer list above the input.
    assert all(len(layer.name) <= 28 for layer in layers)  # "tile disparity · channel 0"
    assert viewer.layers.index(viewer.layers["img"]) == 0
    assert viewer.layers[-1].name == "tiles"
    identities = [id(layer) for layer in viewer.layers]
    for channel in (3, 0):
        widget.channel_combo.setCurrentIndex(channel)
        qtbot.waitUntil(lambda: widget.settled, timeout=10_000)
        assert [id(layer) for layer in viewer.layers] == identities  # the same layers
        # Shown as 0..1 (uint8 stored probabilities divided by 255).
        divisor = 255.0 if root["pred_eval/0"].dtype == np.uint8 else 1.0
        for short, group in (("eval", "pred_eval"), ("disparity", "disparity")):
            np.testing.assert_allclose(
                level0(viewer.layers[f"{short} · channel {channel}"]),
                root[f"{group}/0"][channel] / divisor,
                atol=1e-6,
            )
        np.testing.assert_allclose(
            level0(viewer.layers[f"seams (eval) · channel {channel}"]),
            root["seams_eval/0"][channel] / divisor,
            atol=1e-6,
        )
        grid = level0(viewer.layers[f"tile disparity · channel {channel}"])
        stored = root["tile_disparity_soft/0"][channel]
        for tile in widget.plan.tiles():
            np.testing.assert_array_equal(grid[tile.write_start], stored[tile.grid])
        # The outlines show that channel's per-tile hard disparity where judged (the verdict's
        # rule; NaN where not), the table and plots its per-tile disparity.
        tiles = viewer.layers["tiles"]
        records = {r["index"]: r for r in widget.finished_event.summary["tiles"]}
        expected = [
            tile_hard_value(records[t], "disparity_hard", channel) for t in tiles.features["tile"]
        ]
        expected = [np.nan if v is None else v for v in expected]
        np.testing.assert_allclose(tiles.features["disparity"], expected, rtol=1e-6)
        judged = [records[t]["judged"][channel] for t in tiles.features["tile"]]
        np.testing.assert_array_equal(tiles.features["judged"], judged)
        table_values = [float(widget.tile_table.item(r, 2).text()) for r in range(3)]
        assert table_values == sorted(table_values, reverse=True)
        assert widget.histogram.global_value == pytest.approx(soft[channel])
    # The reader follows the same rule: one layer per output, the channel a slider axis.
    read = layers_from_store(tmp_path / "out.zarr")
    images = [kwargs for _data, kwargs, kind in read if kind == "image"]
    assert len({kwargs["name"] for kwargs in images}) == len(images)
    assert all(np.shape(data)[0] == 5 for data, kw, kind in read if kw["name"] == "eval")


def test_a_click_on_a_plot_point_moves_the_view_and_selects_the_row(
    make_napari_viewer, qtbot, tiny_model_file, tmp_path, errors
):
    from qtpy.QtCore import QPoint, Qt

    image = np.random.default_rng(2).normal(size=(32, 48, 48)).astype(np.float32)
    viewer, widget = make_widget(make_napari_viewer, image, tiny_model_file, tmp_path, overlap=0.0)
    qtbot.addWidget(widget)
    widget.resize(520, 900)
    widget.show()
    widget.run()
    wait_done(qtbot, widget)
    assert errors == []
    assert widget.tabs.currentWidget() is widget.results_tab
    widget.plot_tabs.setCurrentWidget(widget.scatter)
    scatter = widget.scatter
    assert scatter.tiles.size == widget.plan.n_tiles
    # A tile in the upper z half, away from where the view starts.
    index = next(int(t) for t in scatter.tiles if widget.plan.get_tile(int(t)).grid[0] == 1)
    position = scatter.point_position(index)
    assert position is not None
    x, y = position
    qtbot.mouseClick(
        scatter.view.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(round(x), round(y))
    )
    tile = widget.plan.get_tile(index)
    centre = to_world(tile_center(tile), SCALE, TRANSLATE)
    np.testing.assert_allclose(camera_of(viewer).center[-2:], centre[1:])
    assert viewer.dims.point[0] == pytest.approx(centre[0], abs=SCALE[0])
    assert widget.tile_table.selected_tile() == index
    assert scatter.selected == index
    # The table does the same to the plot.
    other = widget.tile_table.tile_at_row(widget.tile_table.rowCount() - 1)
    widget.tile_table.cellClicked.emit(widget.tile_table.rowCount() - 1, 0)
    assert scatter.selected == other
    # Hovering a point names its tile (the point under the pointer, and its tooltip).
    from qtpy.QtCore import QPointF

    scene = scatter.view.mapToScene(QPoint(round(x), round(y)))
    under = scatter._points.pointsAt(scatter._points.mapFromScene(QPointF(scene)))
    assert [int(p.data()) for p in under] == [index]
    assert scatter.hover_text(1.0, 0.5, index).startswith(f"tile {index}")
    # Each plot saves as a picture that is not blank.
    png = widget.feature_plot.save(tmp_path / "feature.png")
    from PIL import Image

    picture = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    assert picture.std(axis=0).max() > 20 and len(np.unique(picture, axis=0)) > 20


def add_half_level(root_path, group):
    """Add level ``1`` to an output group: y and x 2x mean-downsampled, in the OME metadata."""
    root = zarr.open_group(str(root_path), mode="r+")
    stored = root[f"{group}/0"]
    level0 = np.asarray(stored[...], dtype=np.float32)
    c, z, y, x = level0.shape
    half = level0[:, :, : y // 2 * 2, : x // 2 * 2]
    half = half.reshape(c, z, y // 2, 2, x // 2, 2).mean(axis=(3, 5))
    if stored.dtype.kind == "u":  # a level is stored as its level 0 (uint8 probabilities)
        half = np.round(half)
    half = half.astype(stored.dtype)
    root[group].create_array("1", shape=half.shape, dtype=half.dtype)[...] = half
    ome = dict(root[group].attrs["ome"])
    datasets = ome["multiscales"][0]["datasets"]
    scale = list(datasets[0]["coordinateTransformations"][0]["scale"])
    translation = list(datasets[0]["coordinateTransformations"][1]["translation"])
    scale1 = scale[:2] + [scale[2] * 2, scale[3] * 2]
    translation1 = translation[:2] + [
        translation[2] + scale[2] / 2,
        translation[3] + scale[3] / 2,
    ]
    datasets.append(
        {
            "path": "1",
            "coordinateTransformations": [
                {"type": "scale", "scale": scale1},
                {"type": "translation", "translation": translation1},
            ],
        }
    )
    ome["multiscales"][0]["datasets"] = datasets[:2]
    root[group].attrs["ome"] = ome
    return half


def test_pyramid_outputs_open_as_multiscale_layers(make_napari_viewer, tmp_path, tiny_model_file):
    import dataclasses

    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.models.models import load_model
    from napari_normcheck.core.run.engine import run_check

    loaded = load_model(tiny_model_file, arch=ARCH, arch_kwargs=ARCH_KWARGS)
    image = np.random.default_rng(4).normal(size=(16, 64, 64)).astype(np.float32)
    volume = dataclasses.replace(open_volume(image), scale=SCALE, translation=TRANSLATE)
    out = tmp_path / "pyramid.zarr"
    config = RunConfig(tile=(16, 32, 32), activation="sigmoid", device="cpu")
    list(run_check(volume, loaded.module, config, out, divisor=loaded.info.divisor))
    root = zarr.open_group(str(out), mode="r")
    if len(_layers.output_levels(root["disparity"])) == 1:  # a store of one level: add one
        add_half_level(out, "disparity")
    levels = _layers.output_levels(zarr.open_group(str(out), mode="r")["disparity"])
    assert len(levels) >= 2 and levels[1].scale[1] == 2 * levels[0].scale[1]
    # The reader: a multiscale layer (channel first) over the same place.
    read = {kwargs["name"]: (data, kwargs) for data, kwargs, _ in layers_from_store(out)}
    data, kwargs = read["disparity"]
    assert kwargs["multiscale"] and len(data) == len(levels)
    assert data[1].shape[-2:] == (32, 32)
    viewer = make_napari_viewer()
    viewer.open(str(out), plugin="napari-normcheck")
    layer = viewer.layers["disparity"]
    assert layer.multiscale and len(layer.data) == len(levels)
    np.testing.assert_allclose(layer.scale, (1.0, *SCALE))
    # The widget's result layers: multiscale too, one channel, the outlines on level 0's scale.
    viewer2 = make_napari_viewer()
    results = ResultLayers(viewer2)
    plan = _layers.plan_from_attrs(_layers.run_attrs(root))
    results.start(plan, out, "img", SCALE, TRANSLATE)
    results.channel = 1
    results.show(out, final=True)
    shown = viewer2.layers["disparity · channel 1"]
    assert shown.multiscale and len(shown.data) == len(levels)
    np.testing.assert_allclose(shown.scale, SCALE)
    # Every level on the 0..1 scale (stored uint8 divided by 255).
    divisor = 255.0 if root["disparity/1"].dtype == np.uint8 else 1.0
    np.testing.assert_allclose(
        np.asarray(shown.data[1]), root["disparity/1"][1] / divisor, atol=1e-6
    )
    np.testing.assert_allclose(viewer2.layers["tiles"].scale, SCALE)
    # A coarse level's voxel lies over the fine voxels it averages (world coordinates).
    fine = np.asarray(shown.data[0])
    np.testing.assert_allclose(
        np.asarray(shown.data[1])[3, 5, 7], fine[3, 10:12, 14:16].mean(), rtol=1e-5, atol=0.004
    )
