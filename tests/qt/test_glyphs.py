"""The colour bar's glyphs are rendered ahead, one per step, into the canvas's own cache."""

from __future__ import annotations

import numpy as np

from napari_normcheck._qt.glyphs import TICK_CHARACTERS, _font, glyph_warmup_steps


def test_warmup_fills_the_cache_the_colour_bar_reads(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    steps = glyph_warmup_steps(viewer)
    font = _font(viewer)
    assert font is not None
    assert len(steps) == len(set(TICK_CHARACTERS) - set(font._glyphs))
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
