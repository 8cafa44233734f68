"""Open any supported source as a lazy ``(C, Z, Y, X)`` dask array with its voxel size and position.

Supported sources: zarr v2/v3 arrays, zarr groups with a dataset path, OME-Zarr multiscale images
(NGFF 0.4 and 0.5), local or by URL (``http(s)://``, ``s3://``: :mod:`~napari_normcheck.core.io.remote`),
TIFF stacks, ``.npy`` files, and NumPy / dask / zarr arrays handed in by code
(napari layer data, a multiscale list included). Nothing here reads voxel data: every source is
wrapped lazily, so volumes far larger than memory open instantly.

Axis roles and voxel size from metadata are read by :mod:`napari_normcheck.core.io.volume_axes`, the
lazy dask arrays are built by :mod:`napari_normcheck.core.io.lazy_array`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import tifffile
import zarr

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.lazy_array import (
    _from_contiguous,
    _zarr_dask_chunks,
)
from napari_normcheck.core.io.remote import is_url, open_remote
from napari_normcheck.core.io.volume_axes import (
    Role,
    _compose_transforms,
    _imagej_voxel_size,
    _multiscale_metadata,
    _ndim_error,
    _ome_roles,
    _resolve_roles,
    _tiff_roles,
)

SUPPORTED_FORMATS = (
    "a zarr v2/v3 array or group folder (OME-Zarr 0.4/0.5 included), "
    "a TIFF stack (.tif/.tiff) or a NumPy .npy file"
)
_TIFF_SUFFIXES = (".tif", ".tiff")
# Arrays named in an error message; a plate or a deep hierarchy can hold thousands.
_MAX_LISTED = 12


@dataclass(frozen=True)
class Volume:
    """A lazily read image volume in ``(C, Z, Y, X)`` order with its physical placement.

    Attributes
    ----------
    data : dask.array.Array
        Always 4D ``(C, Z, Y, X)``; never computed here.
    scale : tuple of float
        Voxel size ``(z, y, x)`` in physical units; 1.0 where unknown.
    translation : tuple of float
        Physical position ``(z, y, x)`` of voxel ``(0, 0, 0)``.
    source : str
        Human description: path plus dataset or level.
    input_ndim : int
        Number of dimensions of the array as found.
    has_channel_axis : bool
        Whether the array as found had a channel axis.
    spatial_ndim : int
        2 or 3: spatial dimensions of the array as found.
    """

    data: da.Array
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]
    source: str
    input_ndim: int
    has_channel_axis: bool
    spatial_ndim: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape ``(C, Z, Y, X)``."""
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        """Number of input channels ``C``."""
        return int(self.data.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(Z, Y, X)``."""
        return self.shape[1:]  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        """Data type of the voxels as stored."""
        return self.data.dtype


def open_volume(
    source: Any,
    *,
    dataset: str | None = None,
    level: int = 0,
    channel_axis: int | None | Literal["auto"] = "auto",
    storage_options: dict[str, Any] | None = None,
) -> Volume:
    """Open ``source`` lazily as a ``(C, Z, Y, X)`` volume.

    Parameters
    ----------
    source : str, os.PathLike, array-like or sequence of array-likes
        A path to a zarr array or group, an OME-Zarr image, a ``.tif``/``.tiff`` stack or a ``.npy``
        file; or a NumPy, dask or zarr array; or a list of arrays, finest first (napari multiscale
        layer data).
    dataset : str, optional
        Path of an array (or OME-Zarr image group) inside a zarr group.
    level : int
        Resolution level of an OME-Zarr image, a pyramidal TIFF or a multiscale list.
    channel_axis : int, None or "auto"
        Axis of the array as found that holds channels. "auto" takes it from the axes metadata
        (OME-Zarr ``axes``, TIFF C/S axes) and otherwise means: none for 2D and 3D, axis 0 for 4D.
        An int that contradicts the metadata is an error.
    storage_options : dict, optional
        fsspec options of a URL source (endpoint, credentials, ``anon``), as fsspec takes them.

    Returns
    -------
    Volume
        The lazy 4D volume with voxel size and translation (identity when unknown).

    Raises
    ------
    NormcheckError
        For a missing path, an unknown format, a group without a dataset, a missing dataset, a
        level out of range or an unsupported number of dimensions.
    """
    if is_url(source):
        # Only zarr / OME-Zarr by URL: read lazily, chunk by chunk, with retries and a cache.
        node = open_remote(source, storage_options)
        return _open_zarr_node(node, source, dataset, level, channel_axis)
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), dataset, level, channel_axis)
    if isinstance(source, zarr.Group):
        return _open_zarr_node(source, str(source.store_path), dataset, level, channel_axis)
    if dataset is not None:
        raise NormcheckError(
            "--dataset applies to zarr groups only; drop it for an in-memory array"
        )
    if _is_multiscale_list(source):
        _check_level(level, len(source), "the multiscale layer data")
        source, description = source[level], f"multiscale array data, level {level}"
        level = 0
    else:
        description = "array data"
    if not hasattr(source, "shape") or not hasattr(source, "dtype"):
        raise NormcheckError(
            f"cannot open a {type(source).__name__}: pass a path to {SUPPORTED_FORMATS}, "
            "or a NumPy/dask/zarr array"
        )
    _check_level(level, 1, description)
    if isinstance(source, da.Array):
        data = source
    elif isinstance(source, zarr.Array):
        data = da.from_zarr(source, chunks=_zarr_dask_chunks(source))
    else:
        data = _from_contiguous(source)
    return _assemble(data, None, channel_axis, None, None, description)


def list_arrays(group_path: str | os.PathLike | zarr.Group) -> list[str]:
    """List the arrays inside a zarr group, at any depth.

    Parameters
    ----------
    group_path : str, os.PathLike or zarr.Group
        A zarr group, or the path of one.

    Returns
    -------
    list of str
        Array paths relative to the group, sorted.

    Raises
    ------
    NormcheckError
        If the path does not exist or is not a zarr group.
    """
    if isinstance(group_path, zarr.Group):
        group = group_path
    else:
        path = Path(group_path)
        if not path.exists():
            raise NormcheckError(f"no such file or folder: {path}")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as error:
            raise NormcheckError(
                f"{path} is not a zarr group ({error}); pass the folder of a zarr group"
            ) from error
    return sorted(
        name for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)
    )


def _open_path(path: Path, dataset: str | None, level: int, channel_axis: Any) -> Volume:
    if not path.exists():
        raise NormcheckError(f"no such file or folder: {path}")
    if path.is_dir():
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as error:
            raise NormcheckError(
                f"{path} is a folder but not a readable zarr array or group "
                f"({type(error).__name__}); supported: {SUPPORTED_FORMATS}"
            ) from error
        return _open_zarr_node(node, str(path), dataset, level, channel_axis)
    suffix = path.suffix.lower()
    if suffix not in (*_TIFF_SUFFIXES, ".npy"):
        raise NormcheckError(f"unknown format for {path}; supported: {SUPPORTED_FORMATS}")
    if dataset is not None:
        raise NormcheckError(f"--dataset applies to zarr groups, not to {path.name}; drop it")
    if suffix == ".npy":
        _check_level(level, 1, str(path))
        try:
            # mmap: the array stays on disk and dask reads only the chunks that are sliced.
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise NormcheckError(f"cannot read {path} as a .npy array ({error})") from error
        return _assemble(_from_contiguous(mapped), None, channel_axis, None, None, str(path))
    return _open_tiff(path, level, channel_axis)


def _open_zarr_node(
    node: zarr.Array | zarr.Group,
    description: str,
    dataset: str | None,
    level: int,
    channel_axis: Any,
) -> Volume:
    if dataset is not None:
        if isinstance(node, zarr.Array):
            raise NormcheckError(f"{description} is a zarr array, not a group; drop --dataset")
        key = dataset.strip("/")
        multiscale = _multiscale_metadata(node)
        level_paths = [
            str(d.get("path", "")).strip("/") for d in (multiscale or {}).get("datasets", [])
        ]
        if key in level_paths:
            # One level of an OME-Zarr image named by path keeps that level's voxel size.
            index = level_paths.index(key)
            if level not in (0, index):
                raise NormcheckError(
                    f"--dataset {dataset} is level {index} of {description} but --level {level} "
                    "was also given; pass only one of them"
                )
            return _open_ome(node, multiscale, description, index, channel_axis)  # type: ignore[arg-type]
        try:
            node = node[key]
        except KeyError:
            raise NormcheckError(
                f"{description} has no dataset {dataset!r}; it holds {_describe_arrays(node)}"
            ) from None
        description = f"{description} [dataset {key}]"
    if isinstance(node, zarr.Group):
        multiscale = _multiscale_metadata(node)
        if multiscale is None:
            raise NormcheckError(
                f"{description} is a zarr group holding {_describe_arrays(node)}; "
                "pass --dataset PATH to choose one"
            )
        return _open_ome(node, multiscale, description, level, channel_axis)
    _check_level(level, 1, description)
    data = da.from_zarr(node, chunks=_zarr_dask_chunks(node))
    return _assemble(data, None, channel_axis, None, None, description)


def _open_ome(
    group: zarr.Group, multiscale: dict, description: str, level: int, channel_axis: Any
) -> Volume:
    datasets = multiscale.get("datasets") or []
    _check_level(level, len(datasets), description)
    entry = datasets[level]
    path = str(entry.get("path", "")).strip("/")
    try:
        array = group[path]
    except KeyError:
        raise NormcheckError(
            f"{description}: the OME-Zarr metadata names level {level} at {path!r} but no array is "
            "there; repair the file or pick another --level"
        ) from None
    description = f"{description} [level {level}: {path}]"
    roles = _ome_roles(multiscale.get("axes"), array.ndim, description)
    # Dataset-level transforms map voxels into the multiscale frame; the multiscale-level ones
    # then apply on top (NGFF 0.4 and 0.5 both specify this order).
    scale, translation = _compose_transforms(
        [
            entry.get("coordinateTransformations") or [],
            multiscale.get("coordinateTransformations") or [],
        ],
        array.ndim,
        description,
    )
    spatial = [i for i, role in enumerate(roles) if role == "s"]
    spatial_scale = [scale[i] for i in spatial]
    spatial_translation = [translation[i] for i in spatial]
    data = da.from_zarr(array, chunks=_zarr_dask_chunks(array))
    return _assemble(data, roles, channel_axis, spatial_scale, spatial_translation, description)


def _open_tiff(path: Path, level: int, channel_axis: Any) -> Volume:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, n_levels, base_shape = series.axes, len(series.levels), series.shape
            _check_level(level, n_levels, str(path))
            level_shape = series.levels[level].shape
            voxel_size = _imagej_voxel_size(tif) if tif.is_imagej else (1.0, 1.0, 1.0)
        # aszarr exposes the pages as zarr chunks, so only the pages that are sliced get decoded.
        store = tifffile.imread(path, aszarr=True, series=0, level=level)
        array = zarr.open(store, mode="r")
    except NormcheckError:
        raise
    except Exception as error:
        raise NormcheckError(
            f"cannot read {path} as TIFF ({type(error).__name__}: {error})"
        ) from error
    description = str(path) if n_levels == 1 else f"{path} [level {level}]"
    data = da.from_zarr(array, chunks=_zarr_dask_chunks(array))
    volume = _assemble(
        data, _tiff_roles(axes, array.ndim, description), channel_axis, None, None, description
    )
    # A coarser pyramid level has larger pixels: scale y/x by the downsampling factor.
    y_axis = axes.index("Y") if "Y" in axes else len(base_shape) - 2
    x_axis = axes.index("X") if "X" in axes else len(base_shape) - 1
    y_factor = base_shape[y_axis] / level_shape[y_axis]
    x_factor = base_shape[x_axis] / level_shape[x_axis]
    z_size = voxel_size[0] if volume.spatial_ndim == 3 else 1.0
    scale = (z_size, voxel_size[1] * y_factor, voxel_size[2] * x_factor)
    return dataclasses.replace(volume, scale=scale)


def _assemble(
    data: da.Array,
    roles: list[Role] | None,
    channel_axis: Any,
    spatial_scale: list[float] | None,
    spatial_translation: list[float] | None,
    description: str,
) -> Volume:
    """Reorder ``data`` to ``(C, Z, Y, X)``; pad spatial scale and translation to ``(z, y, x)``."""
    shape = tuple(int(n) for n in data.shape)
    roles = _resolve_roles(shape, roles, channel_axis, description)
    for axis in reversed(range(len(roles))):
        if roles[axis] != "t":
            continue
        if shape[axis] != 1:
            raise NormcheckError(
                f"{description} has {shape[axis]} time points (shape {shape}); normcheck reads "
                "one: write the time point you want to its own array"
            )
        data = data[(slice(None),) * axis + (0,)]
    kept = [role for role in roles if role != "t"]
    n_spatial = kept.count("s")
    if n_spatial not in (2, 3) or kept.count("c") > 1:
        raise _ndim_error(shape, description)
    data = da.moveaxis(data, kept.index("c"), 0) if "c" in kept else data[None]
    if n_spatial == 2:
        data = data[:, None]
    scale = [1.0] * (3 - n_spatial) + [float(s) for s in (spatial_scale or [1.0] * n_spatial)]
    translation = [0.0] * (3 - n_spatial) + [
        float(t) for t in (spatial_translation or [0.0] * n_spatial)
    ]
    return Volume(
        data=data,
        scale=tuple(scale),  # type: ignore[arg-type]
        translation=tuple(translation),  # type: ignore[arg-type]
        source=description,
        input_ndim=len(shape),
        has_channel_axis="c" in kept,
        spatial_ndim=n_spatial,
    )


def _check_level(level: int, n_levels: int, description: str) -> None:
    if not 0 <= level < n_levels:
        if n_levels == 1:
            raise NormcheckError(
                f"level {level} requested but {description} has a single resolution level; "
                "drop --level"
            )
        raise NormcheckError(
            f"level {level} requested but {description} has {n_levels} levels (0-{n_levels - 1}); "
            f"pass --level between 0 and {n_levels - 1}"
        )


def _describe_arrays(group: zarr.Group) -> str:
    names = list_arrays(group)
    if not names:
        return "no arrays"
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"the arrays {shown}{more}"


def _is_multiscale_list(source: Any) -> bool:
    return (
        isinstance(source, Sequence)
        and not isinstance(source, (str, bytes))
        and len(source) > 0
        and all(hasattr(level, "shape") for level in source)
    )
