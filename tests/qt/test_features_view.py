"""The feature statistics view: the ``feature z`` layer, its layer/channel choice and the scatter."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_normcheck import _layers
from napari_normcheck._qt.widget import NormcheckWidget
from napari_normcheck._reader import layers_from_store

from .conftest import fill_model

SCALE = (2.0, 0.5, 0.5)
TRANSLATE = (10.0, 5.0, 5.0)


def test_feature_z_layer_and_scatter_after_a_run(
    make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, errors
):
    viewer = make_napari_viewer()
    viewer.add_image(small_image, name="img", scale=SCALE, translate=TRANSLATE)
    widget = NormcheckWidget(viewer)
    fill_model(widget, tiny_model_file)
    widget.tile.setText("16,32,32")
    widget.activation.setCurrentText("sigmoid")
    widget.overlap.setValue(0.25)
    widget.device.setCurrentText("cpu")
    out = tmp_path / "out.zarr"
    widget.out_path.setText(str(out))
    widget.run()
    qtbot.waitUntil(lambda: widget.settled, timeout=60_000)
    assert errors == []

    root = zarr.open_group(str(out), mode="r")
    grid = np.asarray(root["feature_z/0"][...])
    attrs = dict(root["feature_z"].attrs["normcheck"])["layers"]
    layer = viewer.layers["feature z"]
    # The first layer with running statistics, at its channel of largest |z|.
    assert widget.feature_layer_combo.currentIndex() == 0
    assert widget.feature_layer_combo.currentData() == attrs[0]["name"]  # (shown readable)
    n_channels = attrs[0]["channels"]
    strongest = int(
        np.nanmax(np.abs(grid[0, :n_channels]).reshape(n_channels, -1), axis=1).argmax()
    )
    assert widget.feature_channel_combo.currentIndex() == strongest
    plan = widget.plan

    def cells(data):
        """The value drawn at each tile's first voxel (its cell's corner), in the grid's shape."""
        drawn = np.asarray(data[0] if isinstance(data, list) else data)
        assert drawn.shape == plan.roi_shape  # region-sized: to the right and bottom edges
        values = np.full(plan.grid_shape, np.nan, dtype=np.float32)
        for tile in plan.tiles():
            values[tile.grid] = drawn[
                tuple(a - r for a, r in zip(tile.write_start, plan.roi_start))
            ]
        return values

    np.testing.assert_allclose(cells(layer.data), grid[0, strongest])
    zmax = float(np.nanmax(np.abs(grid[0, strongest])))
    np.testing.assert_allclose(layer.contrast_limits, (-zmax, zmax), rtol=1e-5)
    # Its cells lie over the tiles: placed as the tile disparity map, each tile's cell from its
    # first voxel.
    grid_layer = next(
        lay
        for lay in viewer.layers
        if lay.metadata.get("normcheck_output") == "tile_disparity_soft"
    )
    np.testing.assert_allclose(layer.scale, grid_layer.scale)
    np.testing.assert_allclose(layer.translate, grid_layer.translate)
    first = plan.get_tile(0)
    corner = _layers.to_world(first.write_start, SCALE, TRANSLATE)
    np.testing.assert_allclose(layer.world_to_data(corner), first.write_start, atol=1e-6)

    # The feature mean plot: one point per tile, the running mean and std of that channel.
    summary = widget.finished_event.summary
    name = attrs[0]["name"]
    plot = widget.feature_plot
    means = [summary["tiles"][i]["features"][name]["mean"][strongest] for i in range(plan.n_tiles)]
    np.testing.assert_allclose(np.sort(plot.tile_means), np.sort(means))
    assert plot.running_mean == pytest.approx(attrs[0]["running_mean"][strongest])
    assert plot.running_std == pytest.approx(np.sqrt(attrs[0]["running_var"][strongest]))
    # The scatter: |z| of that layer and channel against the shown channel's disparity.
    scatter = widget.scatter
    z = [abs(summary["tiles"][i]["features"][name]["z"][strongest]) for i in scatter.tiles]
    np.testing.assert_allclose(scatter.z, z)
    channel = widget.results.channel
    expected = [summary["tiles"][i]["disparity_soft"][channel] for i in scatter.tiles]
    np.testing.assert_allclose(scatter.disparity, expected)

    # Another channel: the layer's data follow.
    other = (strongest + 1) % n_channels
    widget.feature_channel_combo.setCurrentIndex(other)
    np.testing.assert_allclose(cells(layer.data), grid[0, other])
    # Another normalization layer: its strongest channel.
    assert widget.feature_layer_combo.count() > 1
    widget.feature_layer_combo.setCurrentIndex(1)
    np.testing.assert_allclose(
        cells(layer.data), grid[1, widget.feature_channel_combo.currentIndex()]
    )
    assert widget.norm_layer_text(attrs[1]["name"]) in widget.feature_plot.title()
    widget.feature_layer_combo.setCurrentIndex(0)

    # The reader shows the layer too.
    read = {kwargs["name"]: (data, kwargs) for data, kwargs, _ in layers_from_store(out)}
    data, kwargs = read["feature z"]
    np.testing.assert_allclose(cells(data), grid[0, strongest])
    np.testing.assert_allclose(kwargs["scale"], layer.scale)


def test_no_feature_z_without_a_store(tmp_path):
    assert _layers.feature_z_layer(tmp_path / "missing.zarr") is None
