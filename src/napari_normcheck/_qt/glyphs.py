"""Warm napari's glyph cache for the colour bar's tick labels, a few characters per GUI step.

The first draw of a layer's colour bar renders each tick-label character to a signed distance
field on the CPU (about 6 ms a character here) on top of building its shaders: 230 ms of frozen
GUI at the end of a first run. The glyphs are cached per canvas, so rendering them beforehand, a few
per event-loop turn while tiles run, takes that part out of the freeze.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari_normcheck._qt.steps import step

#: What vispy's axis writes on a 0..1 scale (``0.25``, ``1e-3``, ``-0``), after the characters
#: vispy measures every text's line height with (``vispy.visuals.text.text._text_to_vbo``).
TICK_CHARACTERS = "ÅÉÑŐjgpqy 0123456789.-e+"


def _font(viewer: Any) -> Any | None:
    """The canvas's glyph cache for its text face, or ``None`` where napari keeps it elsewhere."""
    canvas = getattr(getattr(getattr(viewer, "window", None), "_qt_viewer", None), "canvas", None)
    font_info = getattr(canvas, "font_info", None)
    if font_info is None:
        return None
    try:
        info = font_info() if callable(font_info) else font_info
        return info.font_manager.get_font(info.face)
    except (AttributeError, TypeError):  # a napari without this private API: nothing to warm
        return None


def glyph_warmup_steps(viewer: Any, per_step: int = 3) -> list[Callable[[], Any]]:
    """GUI steps that each render up to ``per_step`` tick-label glyphs not yet cached.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer whose canvas will draw a colour bar.
    per_step : int
        Glyphs per step (about 6 ms each): few steps, none of them a freeze.

    Returns
    -------
    list of callable
        Steps for :class:`~napari_normcheck._qt.steps.StepQueue`; none when all are cached.
    """
    font = _font(viewer)
    cached = getattr(font, "_glyphs", None)
    if font is None or cached is None:
        return []
    missing = [character for character in TICK_CHARACTERS if character not in cached]
    batches = [missing[i : i + per_step] for i in range(0, len(missing), per_step)]
    return [step(f"glyphs {''.join(batch)}", _render, font, batch) for batch in batches]


def _render(font: Any, characters: list[str]) -> None:
    for character in characters:
        font[character]
