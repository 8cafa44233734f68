"""The report's per-tile keys and CSV columns come from the registry's tile metrics."""

from __future__ import annotations

import csv

import pytest

from napari_normcheck.core.run import registry, report
from napari_normcheck.core.run.report import build_report, tile_columns, write_report

TODAY = (
    "index",
    "start",
    "stop",
    "disparity_hard",
    "disparity_soft",
    "flip_fraction",
    "mismatch_eval",
    "mismatch_train",
    "feature_z",
)


def summary(*extra: dict) -> dict:
    """A run summary of two tiles; the first carries ``extra``'s keys, the second an argmax."""
    box = {"start": [0, 0, 0], "stop": [4, 8, 8]}
    tiles = [
        {"index": 0, **box, "disparity_hard": [0.1], "disparity_soft": [0.2], "grid": [0, 0, 0]},
        {
            "index": 1,
            **box,
            "disparity_hard": [0.3],
            "disparity_soft": [0.4],
            "mismatch_eval": [0.5],
        },
    ]
    for keys in extra:
        tiles[0] |= keys
    tiles[1]["disparity_argmax"] = [0.6]
    figures = {"hard": [0.2], "soft": [0.3]}
    return {
        "disparity": figures,
        "mismatch_eval": figures,
        "mismatch_train": figures,
        "tiles": tiles,
    }


@pytest.fixture(autouse=True)
def no_versions(monkeypatch):
    monkeypatch.setattr(report, "software_versions", dict)


def test_todays_tile_keys_stay_and_argmax_only_where_a_tile_has_it(tmp_path):
    tiles = build_report(summary(), {})["tiles"]
    for tile in tiles:
        assert set(TODAY) <= set(tile)
    assert tiles[0]["mismatch_eval"] is None and tiles[0]["grid"] == [0, 0, 0]
    assert "disparity_argmax" not in tiles[0] and tiles[1]["disparity_argmax"] == [0.6]
    assert tile_columns([tiles[0]]) == TODAY
    path = write_report(tmp_path / "r.csv", build_report(summary(), {}))
    header, *rows = list(csv.reader(path.open()))
    # Registry order: the argmax next to the other disparities.
    assert header == [*TODAY[:5], "disparity_argmax", *TODAY[5:]]
    assert [row[header.index("disparity_argmax")] for row in rows] == ["", "0.6"]


def test_a_registered_metric_is_a_report_key_and_a_csv_column(monkeypatch, tmp_path):
    changed = registry.TileMetric(
        "changed_fraction", "fraction of voxels that change", grid="tile_changed"
    )
    monkeypatch.setattr(registry, "TILE_METRICS", (*registry.TILE_METRICS, changed))
    built = build_report(summary({"changed_fraction": [0.25]}), {})
    assert [tile["changed_fraction"] for tile in built["tiles"]] == [[0.25], None]
    path = write_report(tmp_path / "r.csv", built)
    header, *rows = list(csv.reader(path.open()))
    assert header[-2:] == ["changed_fraction", "feature_z"]
    assert [row[header.index("changed_fraction")] for row in rows] == ["0.25", ""]
