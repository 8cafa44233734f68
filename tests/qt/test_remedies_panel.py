"""The Remedies panel in a real viewer: a worker over the core remedies, the table, layers, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck._qt import remedies_panel as panel_module
from napari_normcheck._qt.remedies_panel import RemediesPanel, RemedyContext, cell_text
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.remedies.table import ROWS
from napari_normcheck.core.run.engine import run_check
from tests.conftest import calibrate, tiny_unet


@pytest.fixture
def shown(monkeypatch):
    messages = []
    monkeypatch.setattr(panel_module, "_show_error", messages.append)
    return messages


@pytest.fixture
def finished_check(tmp_path, small_image):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    volume = open_volume(small_image)
    config = RunConfig(tile=(16, 32, 32), activation="sigmoid", device="cpu")
    list(run_check(volume, model, config, tmp_path / "out.zarr"))
    model_file = tmp_path / "model.pt"
    torch.save(model.state_dict(), model_file)
    return RemedyContext(volume, model, tmp_path / "out.zarr", "img", str(model_file))


def test_panel_runs_remedies_and_exports(
    make_napari_viewer, qtbot, small_image, finished_check, tmp_path, shown
):
    viewer = make_napari_viewer()
    viewer.add_image(small_image, name="img")
    labels = (small_image > 0.3).astype(np.uint8)
    viewer.add_labels(labels, name="truth")
    panel = RemediesPanel(viewer, lambda: finished_check)
    assert panel.labels_combo.findText("truth") >= 0
    panel.labels_combo.setCurrentText("truth")
    panel.label_map.setText('{"1": 0}')
    panel.tiles.setValue(4)
    assert panel.run() is not None
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120_000)
    assert shown == []
    remedies = panel.remedies
    root = zarr.open_group(str(finished_check.out), mode="r")
    assert root.attrs["normcheck"]["remedies"] == remedies
    assert panel.table.rowCount() == len(ROWS)
    headers = [panel.table.horizontalHeaderItem(j).text() for j in range(panel.table.columnCount())]
    assert headers == [
        "disparity\nchannel 0",
        "disparity\nchannel 1",
        "mismatch\nchannel 0",
        "mismatch\nchannel 1",
        "Dice\nchannel 0",
    ]
    for i, row in enumerate(ROWS):
        assert (
            panel.table.item(i, 0).text() == f"{remedies[row]['disparity_vs_train']['hard'][0]:.4f}"
        )
        assert panel.table.item(i, 4).text() == cell_text(remedies[row], "dice_vs_labels", 0)
        assert panel.table.item(i, 4).text() != "-"
    for group, short in (("pred_recalibrated", "recalibrated"), ("pred_batchstats", "batch-stats")):
        layer = viewer.layers[f"{short} · channel 0"]  # one per remedy, channel 0 without a widget
        stored = root[f"{group}/0"][0]
        shown_values = np.asarray(layer.data[0])
        # Probabilities stored as unsigned integers are shown on their 0..1 scale.
        assert stored.dtype == np.uint8
        np.testing.assert_allclose(shown_values, stored.astype(np.float32) / 255, atol=1e-6)
        assert 0.0 <= shown_values.min() and shown_values.max() <= 1.0 and shown_values.max() > 0

    target = tmp_path / "exported.pt"
    paths = panel.export(target)
    assert paths is not None and target.exists()
    reloaded = tiny_unet("batch")
    reloaded.load_state_dict(torch.load(target, weights_only=True))
    for key, value in panel.recalibration.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    before = target.read_bytes()
    assert panel.export(target) is None
    assert shown and "never overwritten" in shown[-1]
    assert target.read_bytes() == before
    assert panel.export(finished_check.model_path) is None
    assert "input model" in shown[-1]


def test_panel_without_a_finished_check_says_so(make_napari_viewer, shown):
    viewer = make_napari_viewer()
    panel = RemediesPanel(viewer, lambda: None)
    assert panel.run() is None
    assert "run the check" in shown[-1]
    assert panel.export() is None
    panel.mask_above.setText("bright")
    with pytest.raises(NormcheckError, match="not a number"):
        panel.options()
    panel.mask_above.setText("2.5")
    panel.mask_below.setText("-1")
    assert panel.options()["recalibration"] == {
        "n_tiles": 32,
        "variance": "mean",
        "mask_below": -1.0,
        "mask_above": 2.5,
    }


def test_cancel_stops_the_remedies(make_napari_viewer, qtbot, finished_check, shown):
    viewer = make_napari_viewer()
    panel = RemediesPanel(viewer, lambda: finished_check)
    panel.tiles.setValue(64)
    assert panel.run() is not None
    panel.cancel()  # checked between recalibration batches: long before the first tile
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120_000)
    assert panel.remedies is None and "stopped" in panel.status.text()
    assert not panel.export_button.isEnabled()
    root = zarr.open_group(str(finished_check.out), mode="r")
    assert "remedies" not in root.attrs["normcheck"] and "pred_recalibrated" not in root
