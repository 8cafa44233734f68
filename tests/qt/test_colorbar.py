"""The colour bar: glyphs rendered ahead, one per step; its first draw a step after it is built."""

from __future__ import annotations

import numpy as np

from napari_normcheck._qt.glyphs import TICK_CHARACTERS, _font, glyph_warmup_steps


def test_warmup_fills_the_cache_the_colour_bar_reads(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    steps = glyph_warmup_steps(viewer)
    font = _font(viewer)
    assert font is not None
    missing = len(set(TICK_CHARACTERS) - set(font._glyphs))
    assert len(steps) == -(-missing // 3)
    for run in steps:
        run()
    assert set(TICK_CHARACTERS) <= set(font._glyphs)
    assert glyph_warmup_steps(viewer) == []  # nothing left to warm
    # The colour bar's first draw renders no glyph of its own any more.
    cached = len(font._glyphs)
    layer = viewer.add_image(np.linspace(0, 1, 64 * 64, dtype="float32").reshape(64, 64))
    layer.colorbar.visible = True
    viewer.window._qt_viewer.canvas._scene_canvas.render()
    assert len(font._glyphs) == cached


def test_the_colour_bar_is_drawn_a_step_after_it_is_built(make_napari_viewer, qtbot):
    from napari_normcheck._qt.results import ResultLayers, _canvas_widget

    viewer = make_napari_viewer()
    results = ResultLayers(viewer)
    layer = viewer.add_image(np.zeros((8, 8), dtype="float32"), name="disparity")
    other = viewer.add_image(np.zeros((8, 8), dtype="float32"), name="seams")
    other.colorbar.visible = True
    results.layers.update({"disparity": layer, "seams": other})
    native = _canvas_widget(viewer)
    results._show_colorbar(layer)
    assert layer.colorbar.visible and not other.colorbar.visible
    assert not native.updatesEnabled()  # built now, drawn at the next turn
    qtbot.waitUntil(native.updatesEnabled, timeout=2000)
    results._show_colorbar(layer)  # nothing changes: the canvas is not held
    assert native.updatesEnabled()
