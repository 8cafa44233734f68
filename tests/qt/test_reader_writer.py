from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_normcheck._layers import IMAGE_OUTPUTS
from napari_normcheck._reader import get_reader
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.store import read_marker
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.models.models import load_model
from napari_normcheck.core.run.engine import run_check

from .conftest import ARCH, ARCH_KWARGS


@pytest.fixture
def store(tmp_path, tiny_model_file, small_image):
    import dataclasses

    loaded = load_model(tiny_model_file, arch=ARCH, arch_kwargs=ARCH_KWARGS)
    volume = dataclasses.replace(
        open_volume(small_image), scale=(2.0, 0.5, 0.5), translation=(10.0, 5.0, 5.0)
    )
    out = tmp_path / "run.zarr"
    config = RunConfig(
        tile=(16, 32, 32), activation="sigmoid", device="cpu", roi=((0, 16), (8, 48), (0, 48))
    )
    model = {"path": str(tiny_model_file), "sha256": loaded.sha256, "format": loaded.format}
    events = list(
        run_check(
            volume,
            loaded.module,
            config,
            out,
            divisor=loaded.info.divisor,
            extra_attrs={"model": model},
        )
    )
    return out, events[-1]


def test_manifest_is_valid():
    import npe2

    manifest = npe2.PluginManifest.from_file(
        Path(__file__).parents[2] / "src" / "napari_normcheck" / "napari.yaml"
    )
    assert manifest.display_name == "Normalization check"
    assert {w.display_name for w in manifest.contributions.widgets} == {"Normalization check"}
    assert len(manifest.contributions.writers) == 2


def test_reader_rejects_other_zarr(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array(
        "a", shape=(2,), dtype="u1"
    )
    assert get_reader(str(tmp_path / "other.zarr")) is None
    assert get_reader(str(tmp_path / "missing.zarr")) is None


def test_reader_opens_all_outputs(store):
    out, finished = store
    reader = get_reader(str(out))
    assert reader is not None
    layers = reader(str(out))
    by_name = {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in layers}
    root = zarr.open_group(str(out), mode="r")
    # One layer per output, the channel as its first (slider) axis.
    assert (
        len([kind for _, _, kind in layers if kind == "image"])
        == len([g for g in root.group_keys() if g in IMAGE_OUTPUTS]) + 1
    )  # + feature z
    for short, group in (
        ("eval", "pred_eval"),
        ("train", "pred_train"),
        ("disparity", "disparity"),
    ):
        data, kwargs, kind = by_name[short]
        assert kind == "image" and data.shape[0] == 2
        stored = root[f"{group}/0"]
        divisor = 255.0 if stored.dtype == np.uint8 else 1.0  # read as 0..1
        np.testing.assert_allclose(np.asarray(data), stored[...] / divisor, atol=1e-6)
        assert kwargs["scale"] == (1.0, 2.0, 0.5, 0.5)
        # The ROI starts at voxel y 8: world y 5 + 8 * 0.5.
        assert kwargs["translate"] == (0.0, 10.0, 9.0, 5.0)
    assert {"tile disparity", "tile disparity (hard)", "tile mismatch"} <= set(by_name)
    # A tile grid: region-sized with the channel first, placed as the voxel maps, each tile's
    # cell from its first voxel to the region's edge.
    data, kwargs, _kind = by_name["tile disparity"]
    grid = root["tile_disparity_soft/0"][...]
    assert data.shape == (2, *root["pred_eval/0"].shape[1:])
    assert kwargs["scale"] == by_name["eval"][1]["scale"]
    np.testing.assert_allclose(kwargs["translate"], by_name["eval"][1]["translate"])
    roi_start = dict(root.attrs["normcheck"])["plan"]["roi_start"]
    for record in finished.summary["tiles"]:
        start = tuple(a - r for a, r in zip(record["start"], roi_start))
        np.testing.assert_allclose(
            data[(slice(None), *start)], grid[(slice(None), *record["grid"])]
        )
    np.testing.assert_allclose(data[:, -1, -1, -1], grid[:, -1, -1, -1])
    shapes, kwargs, kind = by_name["tiles"]
    assert kind == "shapes" and set(kwargs["features"]["tile"]) == set(
        range(finished.summary["n_tiles"])
    )
    assert kwargs["translate"] == (10.0, 5.0, 5.0)
    # The outlines: each tile's largest judged hard disparity over the channels (the verdict's
    # rule), judged where any channel is; NaN and not judged where none is.
    from napari_normcheck.core.run.report import tile_hard_value

    expected, judged = [], []
    for record in finished.summary["tiles"]:
        values = [
            v
            for c in range(len(record["disparity_hard"]))
            if (v := tile_hard_value(record, "disparity_hard", c)) is not None
        ]
        expected.append(max(values) if values else np.nan)
        judged.append(bool(values))
    tiles = kwargs["features"]["tile"]
    np.testing.assert_allclose(
        kwargs["features"]["disparity"], np.asarray(expected)[tiles], rtol=1e-5
    )
    np.testing.assert_array_equal(kwargs["features"]["judged"], np.asarray(judged)[tiles])
    # Every outline lies on a plane its tile spans, and every plane of a tile has one.
    plan_tiles = {t["index"]: t for t in finished.summary["tiles"]}
    for (tile, z), rectangle in zip(zip(tiles, kwargs["features"]["z"]), shapes):
        start, stop = plan_tiles[tile]["start"][0], plan_tiles[tile]["stop"][0]
        assert start <= z < stop and (rectangle[:, 0] == z).all()
    for index, record in plan_tiles.items():
        planes = set(kwargs["features"]["z"][tiles == index])
        assert planes == set(range(record["start"][0], record["stop"][0]))


def test_viewer_opens_store_through_the_plugin(make_napari_viewer, store):
    out, _ = store
    viewer = make_napari_viewer()
    viewer.open(str(out), plugin="napari-normcheck")
    names = [layer.name for layer in viewer.layers]
    assert "eval" in names and "tiles" in names
    assert "disparity" in names and len(names) == len(set(names))
    np.testing.assert_allclose(viewer.layers["eval"].translate, (0.0, 10.0, 9.0, 5.0))
    # The tile outlines show on a plane inside the tiles (not only at their centre plane).
    tiles = viewer.layers["tiles"]
    viewer.dims.set_point(viewer.dims.ndim - 3, 10.0 + 2.0 * 3)  # voxel plane z = 3
    assert tiles._data_view._displayed.sum() > 0
    viewer.dims.set_point(viewer.dims.ndim - 3, 10.0 + 2.0 * 12)
    assert tiles._data_view._displayed.sum() > 0


@pytest.mark.parametrize("suffix", [".ome.zarr", ".tif"])
def test_writer_round_trip(make_napari_viewer, tmp_path, suffix):
    viewer = make_napari_viewer()
    data = np.random.default_rng(0).random((6, 20, 24)).astype(np.float32)
    layer = viewer.add_image(data, name="x", scale=(2.0, 0.5, 0.25), translate=(1.0, 2.0, 3.0))
    path = tmp_path / f"x{suffix}"
    written = layer.save(str(path), plugin="napari-normcheck")
    assert written == [str(path)]
    volume = open_volume(str(path))
    np.testing.assert_array_equal(np.asarray(volume.data[0]), data)
    np.testing.assert_allclose(volume.scale, (2.0, 0.5, 0.25))
    if suffix == ".ome.zarr":  # TIFF keeps no origin
        np.testing.assert_allclose(volume.translation, (1.0, 2.0, 3.0))


def test_results_follow_a_store_swapped_in_before_they_are_read(make_napari_viewer, store):
    from napari_normcheck._layers import plan_from_attrs, run_attrs
    from napari_normcheck._qt.results import ResultLayers

    out, finished = store
    viewer = make_napari_viewer()
    results = ResultLayers(viewer)
    plan = plan_from_attrs(run_attrs(zarr.open_group(str(out), mode="r")))
    results.start(plan, out, "run", (2.0, 0.5, 0.5), (10.0, 5.0, 5.0))
    results.channel = 1
    # The run's .inprogress folder is gone (renamed to OUT): the layers read OUT.
    values = results.show(out.with_name(out.name + ".inprogress"), final=True)
    assert results.store_path == out
    assert len(values) == finished.summary["n_tiles"]
    stored = zarr.open_group(str(out))["pred_train/0"]
    divisor = 255.0 if stored.dtype == np.uint8 else 1.0  # shown as 0..1
    np.testing.assert_allclose(
        np.asarray(viewer.layers["train · channel 1"].data[0]), stored[1] / divisor, atol=1e-6
    )
    results.go_to_tile(1)
    tiles = viewer.layers["tiles"]
    (selected,) = tiles.selected_data
    assert tiles.features["tile"][selected] == 1


def test_ome_zarr_export_of_a_result_keeps_pyramid_and_run_metadata(
    make_napari_viewer, tmp_path, store
):
    out, _ = store
    viewer = make_napari_viewer()
    viewer.open(str(out), plugin="napari-normcheck")
    layer = viewer.layers["disparity"]
    big = np.random.default_rng(0).random((4, 256, 256)).astype(np.float32)
    pyramid = viewer.add_image(big, name="big", scale=(2.0, 0.5, 0.5), metadata=layer.metadata)
    path = tmp_path / "disparity.ome.zarr"
    assert pyramid.save(str(path), plugin="napari-normcheck") == [str(path)]
    root = zarr.open_group(str(path), mode="r")
    datasets = root.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    assert root["1"].shape == (4, 128, 128)
    np.testing.assert_allclose(root["1"][0, 0, 0], big[0, :2, :2].mean(), rtol=1e-6)
    assert datasets[1]["coordinateTransformations"][0]["scale"] == [2.0, 1.0, 1.0]
    run = root.attrs["napari"]["metadata"]["run"]
    assert run["params"]["tile"] and len(run["model"]["sha256"]) == 64
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left
    level1 = open_volume(str(path), level=1)
    np.testing.assert_allclose(level1.scale, (2.0, 1.0, 1.0))


@pytest.mark.parametrize("suffix", [".ome.zarr", ".tif"])
def test_a_result_layer_round_trips_through_the_writers(
    make_napari_viewer, tmp_path, store, suffix
):
    out, _ = store
    viewer = make_napari_viewer()
    viewer.open(str(out), plugin="napari-normcheck")
    layer = viewer.layers["disparity"]  # backed by the store, read lazily, channel first
    path = tmp_path / f"disparity{suffix}"
    assert layer.save(str(path), plugin="napari-normcheck") == [str(path)]
    volume = open_volume(str(path))
    stored = zarr.open_group(str(out), mode="r")["disparity/0"]
    # The layer holds the values as shown, on the 0..1 scale (stored uint8 divided by 255).
    divisor = 255.0 if stored.dtype == np.uint8 else 1.0
    np.testing.assert_allclose(np.asarray(volume.data), stored[...] / divisor, atol=1e-6)
    np.testing.assert_allclose(volume.scale, (2.0, 0.5, 0.5))
    if suffix == ".ome.zarr":
        np.testing.assert_allclose(volume.translation, (10.0, 9.0, 5.0))
        run = zarr.open_group(str(path), mode="r").attrs["napari"]["metadata"]["run"]
        assert len(run["model"]["sha256"]) == 64 and run["params"]["tile"] == [16, 32, 32]


def test_reader_opens_a_command_line_output(make_napari_viewer, tmp_path, tiny_model_file):
    import contextlib
    import io
    import json

    from napari_normcheck import cli

    volume = np.random.default_rng(5).normal(size=(16, 40, 40)).astype(np.float32)
    np.save(tmp_path / "volume.npy", volume)
    out = tmp_path / "cli.zarr"
    argv = [
        "run",
        str(tmp_path / "volume.npy"),
        "--model",
        str(tiny_model_file),
        "--arch",
        ARCH,
        "--arch-kwargs",
        json.dumps(ARCH_KWARGS),
        "--out",
        str(out),
        "--tile",
        "16,32,32",
        "--activation",
        "sigmoid",
        "--device",
        "cpu",
    ]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    viewer = make_napari_viewer()
    viewer.open(str(out), plugin="napari-normcheck")
    root = zarr.open_group(str(out), mode="r")
    for name, group in (("eval", "pred_eval"), ("train", "pred_train")):
        stored = root[f"{group}/0"]
        divisor = 255.0 if stored.dtype == np.uint8 else 1.0
        shown = np.asarray(viewer.layers[name].data)
        np.testing.assert_allclose(shown, stored[...] / divisor, atol=1e-6)  # read as 0..1
        assert tuple(viewer.layers[name].contrast_limits) == (0.0, 1.0)
    tiles = viewer.layers["tiles"]
    n_tiles = len(read_marker(out)["tiles"])
    assert set(tiles.features["tile"]) == set(range(n_tiles))
    assert "feature z" in viewer.layers
