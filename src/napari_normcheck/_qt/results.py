"""The result layers of a run in the viewer: added at the start, re-read while tiles finish.

No Qt widgets here: :class:`ResultLayers` only talks to the viewer, so the dock widget stays a form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_normcheck import _layers
from napari_normcheck._qt.region import camera_of


class ResultLayers:
    """The image and tile-outline layers of the current run.

    Parameters
    ----------
    viewer : napari.Viewer
        Where the layers live.

    Attributes
    ----------
    plan : TilePlan or None
        The tiles of the current run.
    store_path : Path or None
        The store the layers read (``OUT.zarr.inprogress`` while a run overwrites an output).
    run_out : Path or None
        Where the run's output ends up.
    layers : dict
        Image layers by name (kept, and re-pointed, across runs).
    tiles_layer : napari.layers.Shapes or None
        The outlines of the tiles' write boxes.
    """

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.plan: Any = None
        self.input_scale: tuple[float, ...] = (1.0, 1.0, 1.0)
        self.input_translate: tuple[float, ...] = (0.0, 0.0, 0.0)
        self.prefix = ""
        self.layers: dict[str, Any] = {}
        self.tiles_layer: Any = None
        self.feature_layer: Any = None
        self.store_path: Path | None = None
        self.run_out: Path | None = None

    def start(
        self,
        plan: Any,
        out: Path,
        prefix: str,
        scale: tuple[float, ...],
        translate: tuple[float, ...],
    ) -> None:
        """A run started writing ``out``: show its (still empty) outputs and its tiles."""
        self.plan, self.prefix = plan, prefix
        self.input_scale, self.input_translate = scale, translate
        self.run_out = Path(out)
        in_progress = self.run_out.with_name(self.run_out.name + ".inprogress")
        self.store_path = in_progress if in_progress.exists() else self.run_out
        self.show(self.store_path)

    def show(
        self, path: Path, final: bool = False, tile_values: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Add (or re-point) the result layers at the store ``path``.

        Parameters
        ----------
        path : Path
            The store (a run's ``.inprogress`` folder while it overwrites an earlier output).
        final : bool
            The run is over: outputs without fixed contrast limits (logits) get limits from the data.
        tile_values : numpy.ndarray, optional
            Per-tile disparity to use when the store holds no tile grid (yet).

        Returns
        -------
        numpy.ndarray or None
            The per-tile disparity shown in the tiles layer.
        """
        read = self._read(Path(path))
        if read is None:
            return None
        tuples, values = read
        for data, kwargs, _kind in tuples:
            name = kwargs["name"]
            layer = self.layers.get(name)
            if layer is not None and layer in self.viewer.layers:
                layer.data = data
                layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
                if "contrast_limits" in kwargs:
                    layer.contrast_limits = kwargs["contrast_limits"]
                elif final:
                    layer.reset_contrast_limits()
                layer.metadata["normcheck_store"] = str(self.store_path)
            elif final or kwargs.get("visible", True):
                # Hidden outputs (train, seams, grids) are added when the run ends: creating every
                # layer at once would freeze the viewer when the run starts.
                kwargs["metadata"] = {**kwargs["metadata"], "normcheck_store": str(self.store_path)}
                self.layers[name] = self.viewer.add_image(data, **kwargs)
        if self.plan is None:
            return None
        if values is None:
            values = tile_values
        self._show_tiles(values)
        return values

    def _read(self, path: Path) -> tuple[list, np.ndarray | None] | None:
        """Layer data and per-tile disparity from ``path``, or from the run's final output.

        A run that overwrites an earlier output renames its ``.inprogress`` folder when it completes,
        which may happen before the GUI thread reads it.
        """
        candidates = [path] + ([self.run_out] if self.run_out not in (None, path) else [])
        for candidate in candidates:
            fallback = self.run_out if self.run_out != candidate else None
            try:
                tuples = _layers.image_layers(candidate, self.prefix, fallback=fallback)
                values = _layers.tile_disparity_values(candidate, self.plan) if self.plan else None
            except (FileNotFoundError, KeyError):
                continue
            self.store_path = candidate
            return tuples, values
        return None

    def _show_tiles(self, values: np.ndarray | None) -> None:
        data, kwargs, _ = _layers.tile_shapes_layer(
            self.plan,
            self.input_scale,
            self.input_translate,
            name=f"{self.prefix} tiles",
            disparity=values,
        )
        layer = self.tiles_layer
        if layer is not None and layer in self.viewer.layers:
            same_place = (tuple(layer.scale), tuple(layer.translate)) == (
                tuple(kwargs["scale"]),
                tuple(kwargs["translate"]),
            )
            if same_place and layer.metadata.get("plan") == self.plan.to_dict():
                layer.features = kwargs["features"]
                return
            self.viewer.layers.remove(layer)
        kwargs["metadata"] = {**kwargs["metadata"], "plan": self.plan.to_dict()}
        self.tiles_layer = self.viewer.add_shapes(data, **kwargs)

    def refresh(self, tile_values: np.ndarray | None = None) -> None:
        """Re-read the growing store: fresh lazy arrays, so no stale cached chunk is shown."""
        if self.store_path is None:
            return
        if not self.store_path.exists() and self.run_out is not None:
            self.store_path = self.run_out  # the run completed and its store was swapped in
        if not self.store_path.exists():
            return
        groups = _layers.output_groups(_layers.open_root(self.store_path))
        fallback = self.run_out if self.run_out != self.store_path else None
        for layer in self.layers.values():
            group = layer.metadata.get("normcheck_output")
            # Re-slicing reads the shown plane on the GUI thread: only visible layers pay for it
            # while the run goes on; hidden ones are re-pointed when the run ends (show()).
            if layer not in self.viewer.layers or group not in groups or not layer.visible:
                continue
            try:
                data = _layers.lazy_array(self.store_path, group, fallback)
            except (KeyError, FileNotFoundError, ValueError):
                continue  # being rewritten right now: the next refresh shows it
            layer.data = data[layer.metadata["channel"]]
        tiles = self.tiles_layer
        if tiles is not None and tiles in self.viewer.layers and tile_values is not None:
            tiles.features = _layers.tile_features(self.plan, tile_values)

    def show_feature_z(self, layer: int = 0, channel: int | None = None) -> Any:
        """Add (or update) the ``feature z`` layer from the current store; ``None`` when it has none.

        Parameters
        ----------
        layer : int
            Index of the normalization layer in the store's ``feature_z`` attributes.
        channel : int, optional
            The channel; the one with the largest ``|z|`` by default.
        """
        if self.store_path is None:
            return None
        path = self.store_path
        if not path.exists() and self.run_out is not None:
            path = self.run_out
        read = _layers.feature_z_layer(path, self.prefix, layer, channel)
        if read is None:
            return None
        data, kwargs, _ = read
        existing = self.feature_layer
        if existing is not None and existing in self.viewer.layers:
            existing.data = data
            existing.scale, existing.translate = kwargs["scale"], kwargs["translate"]
            existing.contrast_limits = kwargs["contrast_limits"]
            existing.metadata.update(kwargs["metadata"])
        else:
            self.feature_layer = self.viewer.add_image(data, **kwargs)
        return self.feature_layer

    def go_to_tile(self, index: int) -> None:
        """Centre the view on tile ``index`` (z plane and camera) and select its outline."""
        if self.plan is None:
            return
        tile = self.plan.get_tile(index)
        center = _layers.to_world(_layers.tile_center(tile), self.input_scale, self.input_translate)
        z_axis = self.viewer.dims.ndim - 3
        if z_axis >= 0:
            self.viewer.dims.set_point(z_axis, center[0])
        camera_of(self.viewer).center = center
        if self.tiles_layer is not None and self.tiles_layer in self.viewer.layers:
            self.tiles_layer.selected_data = {index}
