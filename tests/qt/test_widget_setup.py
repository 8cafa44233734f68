"""The dock widget's setup, layout, remedies tab and norm-layer words, on the packaged sample.

The sample volume (``napari_normcheck.data``, uint8) and its packaged BatchNorm / GroupNorm models in a
real viewer (issue 18, items 4, 6, 7, 8 and 9).
"""

from __future__ import annotations

import gc
import json

import numpy as np

from napari_normcheck._qt import demo_gui
from napari_normcheck._qt.model_box import MODEL_FILE, SAMPLE_PREFIX
from napari_normcheck._qt.remedies_panel import NO_CHECK
from napari_normcheck._qt.settings import INTEGER_NORMALIZE
from napari_normcheck._sample_data import SAMPLE_LAYER_NAME
from napari_normcheck.data import SAMPLE_MODELS

SHAPE = (16, 64, 64)
TILE = (16, 32, 32)


def sample_widget(viewer, tmp_path, model="batchnorm", name="out.zarr"):
    """The dock widget on a small sample volume with a packaged sample model chosen."""
    return demo_gui.setup_demo(
        viewer, shape=SHAPE, model=model, device="cpu", out=tmp_path / name, tile=TILE
    )


def run_to_end(qtbot, widget):
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.settled, timeout=120_000)
    assert widget.finished_event is not None, widget.status_label.text()


def test_remedies_tab_knows_the_finished_check_and_has_one_run(
    make_napari_viewer, qtbot, tmp_path, errors
):
    viewer = make_napari_viewer()
    widget = sample_widget(viewer, tmp_path)
    panel = widget.remedies_panel
    widget.tabs.setCurrentWidget(widget.remedies_tab)
    # No check yet: the panel says so and offers no run; the check's buttons are not shown here.
    assert panel.status.text() == NO_CHECK
    assert not panel.run_button.isEnabled()
    assert widget.run_buttons.isHidden()
    widget.tabs.setCurrentWidget(widget.check_tab)
    assert not widget.run_buttons.isHidden()

    run_to_end(qtbot, widget)
    assert errors == []
    # Settled while the Results tab shows: the panel already knows the check finished.
    assert panel.status.text().startswith("ready: the check of " + SAMPLE_LAYER_NAME)
    assert panel.run_button.isEnabled()
    widget.tabs.setCurrentWidget(widget.remedies_tab)
    assert widget.run_buttons.isHidden()  # one Run (the panel's) and one Cancel on this tab
    assert not panel.isHidden() and not panel.run_button.isHidden()
    assert "run a check" not in panel.status.text()


def test_norm_layers_read_as_type_and_place(make_napari_viewer, qtbot, tmp_path, errors):
    viewer = make_napari_viewer()
    widget = sample_widget(viewer, tmp_path)
    frozen = gc.get_freeze_count()
    worker = widget.load_model()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    assert errors == []
    # Loading a model outside a run sets nothing aside from the garbage collector.
    assert gc.get_freeze_count() == frozen and not widget._heap_frozen
    table = widget.inventory_table
    assert table.rowCount() == 18
    first = table.item(0, 0)
    assert first.text() == "BatchNorm3d, encoder 0, conv 0"
    assert "conv_0.conv_0.adn.N" in first.toolTip()
    texts = [table.item(row, 0).text() for row in range(table.rowCount())]
    assert "BatchNorm3d, encoder 1, conv 0" in texts and "BatchNorm3d, decoder 4, conv 1" in texts
    assert not any(".adn.N" in text for text in texts)

    run_to_end(qtbot, widget)
    combo = widget.feature_layer_combo
    assert combo.count() == 18
    paths = [combo.itemData(i) for i in range(combo.count())]
    assert paths[0] == "conv_0.conv_0.adn.N"
    assert combo.itemText(0) == "BatchNorm3d, encoder 0, conv 0"
    assert combo.itemData(0, 3) == "conv_0.conv_0.adn.N"  # (3: Qt's tooltip role)
    # The scatter's x label stays short; the readable layer name is in its title.
    assert widget.scatter.labels()[0] == "|feature z| per tile"
    assert widget.scatter.title().startswith("BatchNorm3d, encoder")


def test_second_run_with_another_model_drops_the_first_models_layers(
    make_napari_viewer, qtbot, tmp_path, errors
):
    viewer = make_napari_viewer()
    widget = sample_widget(viewer, tmp_path)
    run_to_end(qtbot, widget)
    assert widget.feature_layer_combo.count() == 18
    # The GroupNorm model keeps no running statistics: no layer of its to choose.
    widget.model_source.setCurrentText(SAMPLE_PREFIX + "groupnorm")
    widget.out_path.setText(str(tmp_path / "second.zarr"))
    run_to_end(qtbot, widget)
    assert errors == []
    assert widget.feature_layer_combo.count() == 0
    assert widget.feature_entries == []


def test_dock_leaves_the_canvas_most_of_the_window(make_napari_viewer, qtbot, tmp_path, errors):
    viewer = make_napari_viewer(show=True)
    widget = sample_widget(viewer, tmp_path)
    worker = widget.load_model()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    window = viewer.window._qt_window
    canvas = viewer.window._qt_viewer.canvas.native
    for size in ((1600, 1000), (1280, 800)):
        window.resize(*size)
        qtbot.waitUntil(lambda s=size: window.width() == s[0], timeout=5_000)
        qtbot.wait(50)
        for page in (widget.check_tab, widget.results_tab, widget.remedies_tab):
            widget.tabs.setCurrentWidget(page)
            assert widget.width() <= 0.4 * window.width(), (size, widget.width())
            assert canvas.width() > widget.width(), (size, canvas.width(), widget.width())
        # A long summary (the verdict, channels not judged, seams) never squeezes the plots:
        # the Results tab scrolls instead, the plot keeps its height and its axis labels.
        widget.tabs.setCurrentWidget(widget.results_tab)
        widget.summary_label.setText("\n".join(["a line of the verdict that wraps once " * 3] * 8))
        qtbot.wait(50)
        for part in (widget.plot_tabs.parentWidget(), widget.scatter, widget.tile_table):
            assert part.height() >= part.minimumSizeHint().height(), (size, part)
        widget.tabs.setCurrentWidget(widget.check_tab)
        qtbot.wait(50)
        table = widget.inventory_table
        # Every inventory column fits: no horizontal scrolling, no column cut.
        assert table.horizontalHeader().length() <= table.viewport().width()
        for column in range(1, table.columnCount()):
            assert table.columnWidth(column) >= table.sizeHintForColumn(column)
    assert widget.minimumSizeHint().width() <= 400


def test_setup_takes_an_architecture_spec_and_normalizes_integer_input(
    make_napari_viewer, qtbot, tmp_path, errors
):
    viewer = make_napari_viewer()
    widget = sample_widget(viewer, tmp_path)
    widget.model_source.setCurrentText(MODEL_FILE)
    # The uint8 sample is normalized by default, with a word saying so.
    widget.settings.normalize_source = "default"
    widget.settings.follow_image(widget.selected_image())
    assert widget.normalize.text() == INTEGER_NORMALIZE
    assert "uint8 image: normalized with" in widget.settings.normalize_note.text()
    widget.normalize.selectAll()
    qtbot.keyClicks(widget.normalize, "none")
    note = widget.settings.normalize_note.text()
    assert "uint8 intensities (0-255) reach the network unscaled" in note
    assert not widget.settings.normalize_note.isHidden()
    # A float image gets no normalization by default and no note; the user's choice stays.
    viewer.add_image(np.zeros((8, 32, 32), np.float32), name="float")
    widget.image_combo.setCurrentText("float")
    assert widget.normalize.text() == "none" and widget.settings.normalize_note.isHidden()
    widget.settings.normalize_source = "default"
    widget.image_combo.setCurrentText(SAMPLE_LAYER_NAME)
    assert widget.normalize.text() == INTEGER_NORMALIZE
    widget.image_combo.setCurrentText("float")
    assert widget.normalize.text() == "none"
    # The widget stores the seams maps unless told not to.
    assert widget.seams.isChecked() and widget.settings.config().seams

    # The same architecture spec the command line takes (--arch-spec), with a model file.
    sample = SAMPLE_MODELS["batchnorm"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"arch": sample.arch, "kwargs": sample.arch_kwargs}))
    widget.model_path.setText(str(sample.path))
    widget.arch.clear()
    widget.arch_kwargs.clear()
    assert widget.load_arch_spec(spec)
    assert widget.arch.text() == sample.arch
    assert json.loads(widget.arch_kwargs.text()) == json.loads(json.dumps(sample.arch_kwargs))
    worker = widget.load_model()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    assert errors == []
    assert widget.inventory_table.rowCount() == 18
    bad = tmp_path / "bad.json"
    bad.write_text('{"kwargs": {}}')
    assert not widget.load_arch_spec(bad)
    assert errors and '"arch"' in errors[-1]
    assert widget.arch.text() == sample.arch  # the fields are kept
