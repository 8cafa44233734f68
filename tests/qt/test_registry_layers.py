"""An output added to the registry reaches the reader, the widget's layers and the tile table.

``registry.TILE_METRICS`` and ``registry.VOXEL_OUTPUTS`` get one extra entry each (monkeypatched,
no other edit): a per-tile "fraction of voxels that change" grid and an "uncertainty" voxel map.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import zarr

from napari_normcheck import _layers
from napari_normcheck._qt.tile_table import TileTable, column_headers, header_name, sort_keys
from napari_normcheck._reader import get_reader
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.models.models import load_model
from napari_normcheck.core.run import registry
from napari_normcheck.core.run.engine import run_check

from .conftest import ARCH, ARCH_KWARGS

CHANGED = registry.TileMetric(
    "changed_fraction",
    "per-tile fraction of voxels whose probability changes by more than 0.1",
    grid="tile_changed",
    display=registry.Display(
        "tile changed", "plasma", blending="translucent", opacity=0.4, visible=False, widget=True
    ),
    sort="changed",
)
UNCERTAINTY = registry.VoxelOutput(
    "uncertainty",
    ("eval", "train"),
    "mean of P_train and P_eval distance from 0.5",
    registry.Display("uncertainty", "twilight", widget=True),
    compute=lambda p: 1 - np.abs(p["train"] + p["eval"] - 1),
)


@pytest.fixture
def extended(monkeypatch):
    """The registry with one more tile metric and one more voxel output."""
    monkeypatch.setattr(registry, "TILE_METRICS", (*registry.TILE_METRICS, CHANGED))
    monkeypatch.setattr(registry, "VOXEL_OUTPUTS", (*registry.VOXEL_OUTPUTS, UNCERTAINTY))


@pytest.fixture
def store(tmp_path, tiny_model_file, small_image):
    """A finished run's OUT.zarr, with a ``tile_changed`` grid copied from its soft disparity grid.

    Made with the registry of today (ask for it before ``extended``): only the napari side reads
    the extra entries.
    """
    loaded = load_model(tiny_model_file, arch=ARCH, arch_kwargs=ARCH_KWARGS)
    volume = dataclasses.replace(open_volume(small_image), scale=(2.0, 0.5, 0.5))
    out = tmp_path / "run.zarr"
    config = RunConfig(tile=(16, 32, 32), activation="sigmoid", device="cpu")
    list(run_check(volume, loaded.module, config, out, divisor=loaded.info.divisor))
    shutil.copytree(out / "tile_disparity_soft", out / "tile_changed")
    return out


def test_todays_outputs_keep_their_layer_names_styles_order_and_table():
    grid = {"blending": "translucent", "opacity": 0.4, "visible": False}
    assert _layers.IMAGE_OUTPUTS["pred_eval"] == (
        "eval",
        {"colormap": "green", "blending": "additive", "opacity": 0.6, "visible": False},
    )
    assert _layers.IMAGE_OUTPUTS["disparity"][0] == "disparity"
    assert _layers.IMAGE_OUTPUTS["disparity"][1]["colormap"] == "magma"
    assert _layers.IMAGE_OUTPUTS["tile_disparity"] == (
        "tile disparity (hard)",
        {**grid, "colormap": "inferno"},
    )
    assert _layers.IMAGE_OUTPUTS["tile_mismatch_eval"] == (
        "tile mismatch",
        {**grid, "colormap": "viridis"},
    )
    assert _layers.layer_order() == (
        "tiles",
        "disparity",
        "seams_eval",
        "seams_train",
        "shift_diff_eval",
        "shift_diff_train",
        "pred_eval",
        "pred_train",
        "pred_recalibrated",
        "pred_batchstats",
        "tile_disparity_soft",
        "tile_disparity",
        "tile_flips",
        "tile_grid_shift_eval",
        "tile_grid_shift_train",
        "tile_mismatch_eval",
        "tile_mismatch_train",
        "feature_z",
    )
    assert _layers.widget_outputs() == (
        "pred_eval",
        "pred_train",
        "disparity",
        "seams_eval",
        "shift_diff_eval",
        "shift_diff_train",
        "tile_disparity_soft",
        "tile_mismatch_eval",
    )
    assert _layers.widget_voxel_outputs({"seams": False}) == (
        "pred_eval",
        "pred_train",
        "disparity",
    )
    assert _layers.REMEDY_OUTPUTS == ("pred_recalibrated", "pred_batchstats")
    assert column_headers() == (
        "tile",
        "grid z,y,x",
        "soft disparity",
        "hard disparity",
        "flips",
        "mismatch (eval)",
        "feature |z|",
    )
    assert list(sort_keys()) == ["disparity", "flips", "mismatch (eval)", "feature z"]


def test_a_registered_output_gets_a_layer_style_place_and_widget_slot(extended):
    assert _layers.IMAGE_OUTPUTS["tile_changed"] == (
        "tile changed",
        {"colormap": "plasma", "blending": "translucent", "opacity": 0.4, "visible": False},
    )
    assert _layers.IMAGE_OUTPUTS["uncertainty"][0] == "uncertainty"
    order = _layers.layer_order()
    # A disparity-group voxel map goes with the disparity maps, above the predictions; the grid
    # goes among the grids (by layer name), above feature z.
    assert order.index("seams_train") < order.index("uncertainty") < order.index("pred_eval")
    assert order.index("pred_batchstats") < order.index("tile_changed") < order.index("feature_z")
    assert order[-1] == "feature_z"
    assert "uncertainty" in _layers.widget_voxel_outputs({"seams": False})
    assert _layers.widget_grid_outputs() == (
        "tile_disparity_soft",
        "tile_mismatch_eval",
        "tile_changed",
    )
    assert {"uncertainty", "tile_changed"} <= set(_layers.widget_outputs())
    assert _layers.contrast_for("tile_changed", {"activation": "none"}) == (0.0, 1.0)


def test_a_registered_metric_is_a_tile_table_column_and_sort_choice(qtbot, extended):
    table = TileTable()
    qtbot.addWidget(table)
    headers = [
        header_name(table.horizontalHeaderItem(j).text()) for j in range(table.columnCount())
    ]
    assert headers == ["tile", "grid z,y,x", *column_headers()[2:]]
    assert headers[-2:] == ["changed", "feature |z|"]
    assert list(sort_keys()) == ["disparity", "flips", "mismatch (eval)", "changed", "feature z"]
    table.set_records(
        [
            {"index": 0, "disparity_soft": [0.9], "changed_fraction": [0.1]},
            {"index": 1, "disparity_soft": [0.2], "changed_fraction": [0.7]},
            {"index": 2, "disparity_soft": [0.5]},
        ]
    )
    assert [table.tile_at_row(r) for r in range(3)] == [0, 2, 1]
    table.set_sort_key("changed")
    assert [table.tile_at_row(r) for r in range(3)] == [1, 0, 2]  # no value: last
    assert [table.item(r, headers.index("changed")).text() for r in range(3)] == [
        "0.700",
        "0.100",
        "-",
    ]


def test_the_reader_and_the_widget_show_a_registered_grid(make_napari_viewer, store, extended):
    from napari_normcheck._qt.results import ResultLayers

    layers = get_reader(str(store))(str(store))
    by_output = {kwargs["metadata"].get("normcheck_output"): kwargs for _, kwargs, _ in layers}
    assert by_output["tile_changed"]["name"] == "tile changed"
    assert by_output["tile_changed"]["colormap"] == "plasma"
    assert "uncertainty" not in by_output  # not in this store: nothing to show

    viewer = make_napari_viewer()
    results = ResultLayers(viewer)
    results.show(store, final=True)
    assert "tile_changed" in results.layers
    changed = results.layers["tile_changed"]
    assert changed.name == "tile changed · channel 0"
    # Drawn over the region: each tile's cell from its tile's start.
    grid = zarr.open_group(str(store))["tile_changed/0"][0]
    drawn = np.asarray(changed.data[0])
    assert drawn.shape == results.plan.roi_shape if results.plan else drawn.ndim == 3
    plan = _layers.plan_from_attrs(_layers.run_attrs(_layers.open_root(store)))
    for tile in plan.tiles():
        start = tuple(a - r for a, r in zip(tile.write_start, plan.roi_start))
        np.testing.assert_array_equal(drawn[start], grid[tile.grid])
    results.order_layers()
    ranked = {name: rank for rank, name in enumerate(_layers.layer_order())}
    shown = [layer.metadata["normcheck_output"] for layer in reversed(viewer.layers)]
    assert shown == sorted(shown, key=ranked.__getitem__)
