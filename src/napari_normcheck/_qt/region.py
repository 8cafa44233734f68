"""The region a run covers, from the viewer: whole volume, field of view, or a Shapes box."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_normcheck.core.base.errors import NormcheckError

WHOLE = "whole volume"
FIELD_OF_VIEW = "current field of view"
SHAPES_BOX = "box from a Shapes layer"
REGIONS = (WHOLE, FIELD_OF_VIEW, SHAPES_BOX)

Roi = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def camera_of(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def canvas_size(viewer: Any) -> tuple[int, int]:
    """Canvas ``(height, width)`` in screen pixels (``viewer.canvas.size`` since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    size = getattr(canvas, "size", None) if canvas is not None else None
    return tuple(size) if size is not None else tuple(viewer._canvas_size)  # type: ignore[return-value]


def spatial_transform(layer: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image layer's voxel size and origin over ``(z, y, x)`` (``z``: 1 and 0 for 2D layers)."""
    n = 2 if layer.ndim == 2 or (layer.rgb and layer.ndim == 3) else 3
    scale = tuple(float(s) for s in layer.scale[-n:])
    translate = tuple(float(t) for t in layer.translate[-n:])
    if n == 2:
        scale, translate = (1.0, *scale), (0.0, *translate)
    return scale, translate


def _clip_box(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, int, int], what: str) -> Roi:
    """Voxel box ``[lo, hi]`` (inclusive float bounds) clipped to the volume, as start/stop pairs."""
    start = np.clip(np.floor(lo + 0.5), 0, shape).astype(int)
    stop = np.clip(np.floor(hi + 0.5) + 1, 0, shape).astype(int)
    if np.any(stop <= start):
        raise NormcheckError(f"the {what} does not overlap the image; move it over the image")
    return tuple((int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]


def field_of_view_roi(
    viewer: Any,
    scale: tuple[float, ...],
    translate: tuple[float, ...],
    shape: tuple[int, int, int],
) -> Roi | None:
    """The voxel box of the image seen in the canvas (all z planes); ``None`` in 3D display.

    Parameters
    ----------
    viewer : napari.Viewer
        Its camera centre and zoom and the canvas size give the visible world rectangle.
    scale, translate : tuple of float
        The image's voxel size and origin ``(z, y, x)``.
    shape : tuple of int
        The image's spatial shape ``(Z, Y, X)``.
    """
    if viewer.dims.ndisplay == 3:
        return None
    height, width = canvas_size(viewer)
    camera = camera_of(viewer)
    zoom = camera.zoom
    center = np.asarray(camera.center[-2:], dtype=float)
    half = np.array([height, width], dtype=float) / zoom / 2
    lo_world, hi_world = center - half, center + half
    s, t = np.asarray(scale[1:]), np.asarray(translate[1:])
    lo, hi = (lo_world - t) / s, (hi_world - t) / s
    lo = np.concatenate([[0.0], lo])
    hi = np.concatenate([[shape[0] - 1.0], hi])
    return _clip_box(lo, hi, shape, "field of view")


def shapes_roi(
    shapes_layer: Any,
    scale: tuple[float, ...],
    translate: tuple[float, ...],
    shape: tuple[int, int, int],
) -> Roi:
    """The voxel bounding box of a Shapes layer's selected shapes (all shapes when none is selected).

    Shapes drawn on one z plane (or 2D shapes) give the whole z range.
    """
    if len(shapes_layer.data) == 0:
        raise NormcheckError(f"the Shapes layer {shapes_layer.name!r} holds no shape; draw a box")
    chosen = sorted(shapes_layer.selected_data) or range(len(shapes_layer.data))
    layer_scale = np.asarray(shapes_layer.scale, dtype=float)
    layer_translate = np.asarray(shapes_layer.translate, dtype=float)
    world = np.concatenate(
        [np.asarray(shapes_layer.data[i]) * layer_scale + layer_translate for i in chosen]
    )
    world = world[:, -3:] if world.shape[1] >= 3 else world
    lo_world, hi_world = world.min(axis=0), world.max(axis=0)
    n = lo_world.shape[0]
    s, t = np.asarray(scale[-n:]), np.asarray(translate[-n:])
    lo, hi = (lo_world - t) / s, (hi_world - t) / s
    if n == 2 or hi[0] - lo[0] < 1:
        lo = np.concatenate([[0.0], lo[-2:]])
        hi = np.concatenate([[shape[0] - 1.0], hi[-2:]])
    return _clip_box(lo, hi, shape, f"box of {shapes_layer.name!r}")
