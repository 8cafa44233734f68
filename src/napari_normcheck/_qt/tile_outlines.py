"""The tile outlines of a run in the viewer: a Shapes layer built off the GUI thread.

napari's Shapes layer takes seconds to build for thousands of tiles, so it is built in the reader
thread and only put in the viewer on the GUI thread (one step); while the run goes on, only its
features and edge colours change. Going to a tile centres the view on it and selects its outline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_normcheck import _tile_layers
from napari_normcheck._qt.region import camera_of
from napari_normcheck._qt.steps import StepQueue, step

#: Name of the tile outlines layer.
TILES_NAME = "tiles"


def has_text(layer: Any) -> bool:
    """The Shapes layer shows text (napari's test: visible and not the constant blank string)."""
    return bool(layer.text.visible) and getattr(layer.text.string, "constant", None) != ""


def skip_blank_text(viewer: Any, layer: Any) -> None:
    """Keep a Shapes layer's text visual out of the canvas while the layer shows no text.

    napari draws a Shapes layer's text visual even when the layer has no text (one blank string):
    its first draw builds the text shader (about 90 ms under software OpenGL) and, the first time
    in the process, loads the font (about 150 ms): two thirds of the first draw of the tiles layer,
    in one GUI-thread freeze, for nothing shown. The visual follows the layer's text from then on
    (napari keeps the visual's data up to date either way).
    """
    qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
    visuals = getattr(getattr(qt_viewer, "canvas", None), "layer_to_visual", None) or {}
    text_node = getattr(getattr(visuals.get(layer), "node", None), "text", None)
    if text_node is None or not hasattr(layer, "text"):
        return  # another napari: drawn as napari does

    def follow_text(_event: Any = None) -> None:
        text_node.visible = has_text(layer)

    follow_text()
    layer.text.events.connect(follow_text)


class TileOutlines:
    """The tiles Shapes layer of :class:`~napari_normcheck._qt.results.ResultLayers` (a mixin).

    A mixin rather than an object of its own: outlining the tiles needs most of the result layers'
    state (the viewer, the run's plan and placement, the step queue, the reader thread, the layers
    added before the store existed).

    Attributes
    ----------
    tiles_layer : napari.layers.Shapes or None
        The outlines of the tiles' write boxes.

    Notes
    -----
    The class it is mixed into provides ``viewer``, ``plan``, ``input_scale``, ``input_translate``,
    ``prefix``, ``steps``, ``store_path``, ``_placeholders``, ``_synchronous`` and ``_off_thread``.
    """

    viewer: Any
    plan: Any
    input_scale: tuple[float, ...]
    input_translate: tuple[float, ...]
    prefix: str
    tiles_layer: Any
    steps: StepQueue
    store_path: Path | None
    _placeholders: list[Any]
    _synchronous: bool
    #: The tiles layer just added hidden, shown by the next step.
    _hidden_tiles: Any = None
    #: Per tile, whether the shown channel's hard values are judged (``None``: all are).
    tile_judged: np.ndarray | None = None

    def _tiles_show(self, plan: Any) -> bool:
        """The tiles layer exists and outlines ``plan``."""
        layer = self.tiles_layer
        return (
            layer is not None
            and layer in self.viewer.layers
            and layer.metadata.get("plan") == plan.to_dict()
        )

    def _build_tiles(
        self, values: np.ndarray | None, then: Callable[[], None] | None = None
    ) -> None:
        """Build the tiles Shapes layer in a worker thread, then put it in the viewer (one step).

        napari's Shapes layer takes seconds to build for thousands of tiles (one Python object and
        a triangulation per shape); only putting it in the viewer has to happen on the GUI thread.
        """
        from napari.layers import Shapes

        plan, scale, translate = self.plan, self.input_scale, self.input_translate
        name = TILES_NAME
        judged = self.tile_judged

        def build() -> Any:
            data, kwargs, _ = _tile_layers.tile_shapes_layer(
                plan, scale, translate, name=name, disparity=values, judged=judged
            )
            kwargs["metadata"] = {**kwargs["metadata"], "plan": plan.to_dict()}
            return Shapes(data, **kwargs)

        def finished() -> None:
            if then is not None:
                self.steps.add(step("layers ready", then))

        self._off_thread(
            build,
            lambda layer: self.steps.add(step("tiles", self._put_tiles, layer)),
            finished=finished,
        )

    def _put_tiles(self, layer: Any) -> None:
        old = self.tiles_layer
        if old is not None and old in self.viewer.layers:
            self.viewer.layers.remove(old)
        # Shown at the next step: adding the layer and its first draw (the canvas builds its
        # shaders) are then two freezes of about 150 and 100 ms instead of one of 250-450 ms.
        deferred = bool(layer.visible) and not self._synchronous
        if deferred:
            layer.visible = False
        # The outlines do not take the selection: their editing tools would show after a run.
        activate = getattr(self.viewer.layers, "_activate_on_insert", None)
        if activate is not None:
            self.viewer.layers._activate_on_insert = False
        try:
            self.tiles_layer = self.viewer.add_layer(layer)
        finally:
            if activate is not None:
                self.viewer.layers._activate_on_insert = activate
        skip_blank_text(self.viewer, self.tiles_layer)
        if deferred:
            self._hidden_tiles = layer
            self.steps.add_first(step("show tiles", self.reveal_tiles))
        if self.store_path is None:
            self._placeholders.append(self.tiles_layer)

    def reveal_tiles(self) -> None:
        """Show the tiles layer added hidden, if its "show tiles" step has not run yet."""
        layer, self._hidden_tiles = self._hidden_tiles, None
        if layer is not None and layer in self.viewer.layers:
            layer.visible = True

    def _show_tiles(self, values: np.ndarray | None) -> None:
        """Outline the plan's tiles (the layer is rebuilt off-thread when the plan changed)."""
        if self._tiles_show(self.plan):
            self._update_tiles(values)
        elif self._synchronous:
            data, kwargs, _ = _tile_layers.tile_shapes_layer(
                self.plan,
                self.input_scale,
                self.input_translate,
                name=TILES_NAME,
                disparity=values,
                judged=self.tile_judged,
            )
            kwargs["metadata"] = {**kwargs["metadata"], "plan": self.plan.to_dict()}
            from napari.layers import Shapes

            self._put_tiles(Shapes(data, **kwargs))
        else:
            self._build_tiles(values)

    def _update_tiles(self, values: np.ndarray | None) -> None:
        """New per-tile hard disparity: the outlines' features and edge colours."""
        tiles = self.tiles_layer
        if tiles is None or tiles not in self.viewer.layers or values is None:
            return
        tiles.features = _tile_layers.tile_features(self.plan, values, self.tile_judged)
        tiles.edge_color = _tile_layers.outline_edge_colors(self.plan, values, self.tile_judged)

    def go_to_tile(self, index: int) -> None:
        """Centre the view on tile ``index`` (z plane and camera) and select its outline there."""
        if self.plan is None:
            return
        tile = self.plan.get_tile(index)
        voxel = _tile_layers.tile_center(tile)
        center = _tile_layers.to_world(voxel, self.input_scale, self.input_translate)
        z_axis = self.viewer.dims.ndim - 3
        if z_axis >= 0:
            self.viewer.dims.set_point(z_axis, center[0])
        camera_of(self.viewer).center = center
        if self.tiles_layer is not None and self.tiles_layer in self.viewer.layers:
            outline = _tile_layers.outline_at(self.tiles_layer.features, index, int(voxel[0]))
            self.tiles_layer.selected_data = set() if outline is None else {outline}
