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


def _pyramid_factors(shape: tuple[int, ...], axes: tuple[str, ...], smallest: int = 64) -> list:
    """Per-level downsampling factors: halve y and x (and z while it is the largest side)."""
    levels = [tuple(1 for _ in axes)]
    current = dict(zip(axes, shape))
    while min(current.get("y", 0), current.get("x", 0)) // 2 >= smallest:
        step = {a: 2 if a in ("y", "x") else 1 for a in axes}
        if "z" in current and current["z"] // 2 >= smallest and current["z"] >= current["y"]:
            step["z"] = 2
        current = {a: current[a] // step[a] for a in axes}
        levels.append(tuple(prev * step[a] for prev, a in zip(levels[-1], axes)))
    return levels


def write_ome_zarr(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one image layer as an OME-Zarr 0.5 multiscale image (a pyramid of 2x mean levels).

    The image is written into a temporary folder beside ``path`` and renamed when complete, so a
    failed export leaves nothing that looks like a result. The layer's scale, translation and
    JSON-serializable metadata (for normcheck outputs: run parameters and the model's sha256) are kept.

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
    import os
    import shutil

    import dask.array as da
    import zarr

    from napari_normcheck.core.io.store import ome_image_attrs

    if meta.get("multiscale") or isinstance(data, list):
        data = data[0]
    array = da.asarray(data)
    axes = _axes(array.ndim)
    n_space = sum(a != "c" for a in axes)
    scale = tuple(meta.get("scale") or (1.0,) * array.ndim)[-n_space:]
    translate = tuple(meta.get("translate") or (0.0,) * array.ndim)[-n_space:]
    target_path = Path(path)
    if target_path.exists():
        raise FileExistsError(f"{path} exists; choose another name")
    staging = target_path.with_name(f".{target_path.name}.writing-{os.getpid()}")
    try:
        root = zarr.open_group(str(staging), mode="w", zarr_format=3)
        attrs = ome_image_attrs(meta.get("name") or "image", scale, translate, axes)
        datasets = []
        factors = _pyramid_factors(array.shape, axes)
        for level, factor in enumerate(factors):
            level_data = array
            if level:
                level_data = da.coarsen(
                    np.mean, array, {i: f for i, f in enumerate(factor) if f > 1}, trim_excess=True
                ).astype(array.dtype)
            space = [f for f, a in zip(factor, axes) if a != "c"]
            datasets.append(
                {
                    "path": str(level),
                    "coordinateTransformations": [
                        {
                            "type": "scale",
                            "scale": [1.0] * (len(axes) - n_space)
                            + [s * f for s, f in zip(scale, space)],
                        },
                        # Mean pooling: a level-k voxel is centred on the voxels it averages.
                        {
                            "type": "translation",
                            "translation": [0.0] * (len(axes) - n_space)
                            + [t + (f - 1) / 2 * s for t, f, s in zip(translate, space, scale)],
                        },
                    ],
                }
            )
            preferred = (
                (1,) * (level_data.ndim - 3) + (64, 256, 256)
                if level_data.ndim >= 3
                else (512, 512)
            )
            chunks = tuple(min(n, c) for n, c in zip(level_data.shape, preferred))
            target = root.create_array(
                str(level),
                shape=level_data.shape,
                chunks=chunks,
                dtype=level_data.dtype,
                dimension_names=axes,
            )
            da.store(level_data.rechunk(chunks), target, lock=False)
        attrs["multiscales"][0]["datasets"] = datasets
        root.attrs["ome"] = attrs
        root.attrs["napari"] = {
            "name": meta.get("name"),
            "metadata": _jsonable(meta.get("metadata")),
        }
        os.replace(staging, target_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    if axes == "CZYX":  # ImageJ orders its axes TZCYXS
        image, axes = np.moveaxis(image, 0, 1), "ZCYX"
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
