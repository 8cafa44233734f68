"""Per-tile metrics: the functions on hand-made tiles, and a registered metric through a whole run."""

from __future__ import annotations

import csv

import numpy as np
import zarr

from napari_normcheck import _layers
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.measure.tile_metrics import TileView, flip_fraction
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.report import build_report, write_report
from tests.conftest import synthetic_volume


def test_flip_fraction_counts_voxels_whose_hard_label_changes():
    eval_ = np.array([[0.9, 0.2, 0.6, 0.1]], dtype=np.float32)
    train = np.array([[0.8, 0.7, 0.4, 0.3]], dtype=np.float32)
    view = TileView({"eval": eval_, "train": train}, threshold=0.5, argmax=False)
    assert flip_fraction(view) == [0.5]
    # Softmax classes: voxel 1 moves from class 0 to class 1, which both channels count.
    classes = TileView(
        {
            "eval": np.array([[0.9, 0.6], [0.1, 0.4]], dtype=np.float32),
            "train": np.array([[0.8, 0.3], [0.2, 0.7]], dtype=np.float32),
        },
        threshold=0.5,
        argmax=True,
    )
    assert flip_fraction(classes) == [0.5, 0.5]


def test_a_registered_metric_reaches_records_grid_report_and_layers(tmp_path, batchnorm_unet):
    # One tile covering the volume, constant blending: the stored predictions are the tile's own.
    shape = (16, 32, 32)
    volume = open_volume(synthetic_volume(shape))
    config = RunConfig(
        tile=shape, overlap=0.0, blend="constant", activation="sigmoid", output_dtype="float32"
    )
    out = tmp_path / "o.zarr"
    summary = list(run_check(volume, batchnorm_unet, config, out))[-1].summary
    root = zarr.open_group(str(out), mode="r")
    p_eval, p_train = root["pred_eval/0"][...], root["pred_train/0"][...]
    expected = ((p_eval > 0.5) != (p_train > 0.5)).reshape(2, -1).mean(axis=1)
    (record,) = summary["tiles"]
    np.testing.assert_allclose(record["flip_fraction"], expected, rtol=1e-12)
    assert max(expected) > 0  # the calibrated model does flip voxels here
    np.testing.assert_allclose(root["tile_flips/0"][...].reshape(2), expected, rtol=1e-6)

    report = build_report(summary, dict(root.attrs["normcheck"]))
    write_report(tmp_path / "tiles.csv", report)
    with open(tmp_path / "tiles.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert "flip_fraction" in header
    names = [kwargs["name"] for _, kwargs, _ in _layers.image_layers(out, channel=0)]
    assert any(name.startswith("tile flips") for name in names)
