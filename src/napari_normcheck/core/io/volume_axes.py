"""Axis roles and physical placement read from metadata: OME-Zarr, TIFF/ImageJ and ``channel_axis``.

Each axis of an array as found gets a role (channel, time or spatial) from its OME-Zarr ``axes``,
its TIFF series axes or the per-ndim defaults; voxel size and translation come from NGFF
coordinate transformations or ImageJ tags. Nothing here reads voxel data.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import tifffile
import zarr

from napari_normcheck.core.base.errors import NormcheckError

Role = Literal["c", "t", "s"]  # channel, time, spatial


def _imagej_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float]:
    """Voxel size ``(z, y, x)`` from ImageJ metadata: z spacing and 1 / XY resolution."""
    metadata = tif.imagej_metadata or {}
    tags = tif.series[0].keyframe.tags

    def pixel_size(tag_name: str) -> float:
        tag = tags.get(tag_name)
        if tag is None:
            return 1.0
        numerator, denominator = tag.value
        # ImageJ stores pixels per unit, the inverse of the pixel size.
        return float(denominator) / float(numerator) if numerator else 1.0

    return (
        float(metadata.get("spacing", 1.0)),
        pixel_size("YResolution"),
        pixel_size("XResolution"),
    )


def _multiscale_metadata(group: zarr.Group) -> dict | None:
    """First OME-Zarr multiscale entry of ``group`` (NGFF 0.5 under "ome", 0.4 at top level)."""
    attrs = group.attrs.asdict()
    ome = attrs.get("ome")
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else attrs.get("multiscales")
    if isinstance(multiscales, list) and multiscales and isinstance(multiscales[0], dict):
        return multiscales[0]
    return None


def _ome_roles(axes: list | None, ndim: int, description: str) -> list[Role]:
    if axes is None:
        # NGFF before 0.3 had no axes: the dimensions are the trailing ones of (t, c, z, y, x).
        if ndim > 5:
            raise _ndim_error((0,) * ndim, description)
        names = list("tczyx"[5 - ndim :])
        kinds = [None] * ndim
    else:
        names = [str(a.get("name", "")) if isinstance(a, dict) else str(a) for a in axes]
        kinds = [a.get("type") if isinstance(a, dict) else None for a in axes]
    if len(names) != ndim:
        raise NormcheckError(
            f"{description}: the axes metadata names {len(names)} axes ({','.join(names)}) but the "
            f"array has {ndim} dimensions; repair the OME-Zarr metadata"
        )
    roles: list[Role] = []
    for name, kind in zip(names, kinds, strict=True):
        if kind == "channel" or (kind is None and name.lower() == "c"):
            roles.append("c")
        elif kind == "time" or (kind is None and name.lower() == "t"):
            roles.append("t")
        elif kind == "space" or (kind is None and name.lower() in ("z", "y", "x")):
            roles.append("s")
        else:
            raise NormcheckError(
                f"{description}: axis {name!r} of type {kind!r} is not supported; "
                "normcheck reads OME-Zarr axes t, c, z, y, x"
            )
    return roles


def _tiff_roles(axes: str, ndim: int, description: str) -> list[Role] | None:
    """Roles from tifffile's series axes; None when they name no channel, so defaults apply."""
    if len(axes) != ndim:
        return None
    if "T" in axes:
        # tifffile squeezes length-1 axes, so a T axis here holds several time points.
        raise NormcheckError(
            f"{description} is a time series (axes {axes}); normcheck reads one time point: "
            "save the frame you want as its own TIFF"
        )
    if "C" not in axes and "S" not in axes:
        return None
    return ["c" if letter in "CS" else "s" for letter in axes]


def _compose_transforms(
    transform_lists: list[list[dict]], ndim: int, description: str
) -> tuple[list[float], list[float]]:
    """Compose NGFF coordinate transformations, in list order, into one scale and translation."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for transforms in transform_lists:
        for transform in transforms:
            kind = transform.get("type")
            if kind == "identity":
                continue
            vector = transform.get(kind) if kind in ("scale", "translation") else None
            if vector is None or len(vector) != ndim:
                raise NormcheckError(
                    f"{description}: unsupported coordinate transformation {transform}; normcheck "
                    f"reads inline 'scale' and 'translation' with one value per axis ({ndim})"
                )
            if kind == "scale":
                scale = [s * float(v) for s, v in zip(scale, vector, strict=True)]
                translation = [t * float(v) for t, v in zip(translation, vector, strict=True)]
            else:
                translation = [t + float(v) for t, v in zip(translation, vector, strict=True)]
    return scale, translation


def _resolve_roles(
    shape: tuple[int, ...], named: list[Role] | None, channel_axis: Any, description: str
) -> list[Role]:
    """Combine roles named by metadata, the ``channel_axis`` argument and the per-ndim defaults."""
    ndim = len(shape)
    if channel_axis is not None and channel_axis != "auto":
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
            raise NormcheckError(
                f"channel_axis must be an int, None or 'auto', not {channel_axis!r}"
            )
        if not -ndim <= channel_axis < ndim:
            raise NormcheckError(
                f"channel axis {channel_axis} is out of range for {description} of shape {shape}; "
                f"pass an axis between 0 and {ndim - 1}"
            )
        channel_axis = int(channel_axis) % ndim
    if named is not None:
        metadata_axis = named.index("c") if "c" in named else None
        if isinstance(channel_axis, int) and channel_axis != metadata_axis:
            where = (
                "names no channel axis" if metadata_axis is None else f"has it at {metadata_axis}"
            )
            raise NormcheckError(
                f"channel axis {channel_axis} contradicts the axes metadata of {description}, "
                f"which {where}; drop --channel-axis"
            )
        return named
    if ndim == 2:
        if isinstance(channel_axis, int):
            raise NormcheckError(
                f"{description} is 2D (shape {shape}) and cannot have a channel axis; "
                "drop --channel-axis"
            )
        return ["s", "s"]
    if ndim == 3:
        roles: list[Role] = ["s", "s", "s"]
        if isinstance(channel_axis, int):
            roles[channel_axis] = "c"
        return roles
    if ndim == 4:
        if channel_axis is None:
            raise NormcheckError(
                f"{description} is 4D (shape {shape}) and needs a channel axis; "
                "pass --channel-axis N"
            )
        roles = ["s", "s", "s", "s"]
        roles[0 if channel_axis == "auto" else channel_axis] = "c"
        return roles
    raise _ndim_error(shape, description)


def _ndim_error(shape: tuple[int, ...], description: str) -> NormcheckError:
    return NormcheckError(
        f"{description} has shape {shape} ({len(shape)}D); supported: 2D (Y,X), 3D (Z,Y,X) or "
        "(C,Y,X) with --channel-axis, 4D with a channel axis, and 5D OME-Zarr (t,c,z,y,x) with t=1"
    )
