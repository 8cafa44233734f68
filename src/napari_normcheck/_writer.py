"""The napari writer contributions: an image layer to OME-Zarr 0.5 or to TIFF, with its voxel size.

OME-Zarr keeps the layer's scale and translation (as OME ``coordinateTransformations``) and its
JSON-serializable metadata; TIFF keeps the voxel size (ImageJ hyperstack tags), not the translation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _axes(ndim: int, rgb: bool = False) -> tuple[str, ...]:
    if ndim == 2:
        return ("y", "x")
    if ndim == 3:
        return ("z", "y", "x")
    if ndim == 4:
        return ("c", "z", "y", "x")
    raise ValueError(f"cannot save a {ndim}D image layer; 2D, 3D or 4D (channel, z, y, x) only")


def _jsonable(metadata: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``metadata`` that survive a JSON round trip."""
    kept = {}
    for key, value in (metadata or {}).items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[str(key)] = value
    return kept


def write_ome_zarr(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one image layer as an OME-Zarr 0.5 image (a single level named ``0``).

    Parameters
    ----------
    path : str
        Destination folder (``.zarr`` / ``.ome.zarr``); must not exist yet.
    data : array-like
        The layer data (NumPy or dask); for a multiscale layer, its full-resolution level.
    meta : dict
        The layer attributes napari passes (``scale``, ``translate``, ``name``, ``metadata``).

    Returns
    -------
    list of str
        The written path.
    """
    import dask.array as da
    import zarr

    from napari_normcheck.core.store import ome_image_attrs

    if meta.get("multiscale") or isinstance(data, list):
        data = data[0]
    array = da.asarray(data)
    axes = _axes(array.ndim)
    n_space = sum(a != "c" for a in axes)
    scale = tuple(meta.get("scale") or (1.0,) * array.ndim)[-n_space:]
    translate = tuple(meta.get("translate") or (0.0,) * array.ndim)[-n_space:]
    if Path(path).exists():
        raise FileExistsError(f"{path} exists; choose another name")
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ome"] = ome_image_attrs(meta.get("name") or "image", scale, translate, axes)
    root.attrs["napari"] = {"name": meta.get("name"), "metadata": _jsonable(meta.get("metadata"))}
    preferred = (1,) * (array.ndim - 3) + (64, 256, 256) if array.ndim >= 3 else (512, 512)
    chunks = tuple(min(n, c) for n, c in zip(array.shape, preferred))
    target = root.create_array(
        "0", shape=array.shape, chunks=chunks, dtype=array.dtype, dimension_names=axes
    )
    da.store(array.rechunk(chunks), target, lock=False)
    return [str(path)]


def write_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one image layer as an ImageJ-compatible TIFF stack with its voxel size.

    Parameters
    ----------
    path : str
        Destination ``.tif`` / ``.tiff`` file.
    data : array-like
        The layer data, read into memory (TIFF is not written lazily).
    meta : dict
        The layer attributes napari passes (``scale``).

    Returns
    -------
    list of str
        The written path.
    """
    import tifffile

    if meta.get("multiscale") or isinstance(data, list):
        data = data[0]
    image = np.asarray(data)
    if image.dtype not in (np.uint8, np.uint16, np.float32):
        image = image.astype(np.float32)
    axes = "".join(a.upper() for a in _axes(image.ndim))
    scale = tuple(meta.get("scale") or (1.0,) * image.ndim)
    spacing_y, spacing_x = float(scale[-2]), float(scale[-1])
    imagej_meta: dict[str, Any] = {"axes": axes}
    if image.ndim >= 3:
        imagej_meta["spacing"] = float(scale[-3])
    tifffile.imwrite(
        path,
        image,
        imagej=True,
        resolution=(1.0 / spacing_x, 1.0 / spacing_y),
        metadata=imagej_meta,
    )
    return [str(path)]
