"""What an OUT.zarr says about itself: its groups, run attributes and image levels (no Qt)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Level:
    """One pyramid level of an output image group.

    Attributes
    ----------
    path : str
        The level's array inside the group (``"0"``, ``"1"``, ...).
    scale, translation : tuple of float
        Its spatial voxel size and the world position of its first voxel.
    """

    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


def open_root(path: str | Path) -> Any:
    """Open the store's root zarr group read-only."""
    import zarr

    return zarr.open_group(str(path), mode="r")


def output_groups(root: Any) -> set[str]:
    """Names of the groups in the store (the completion marker is not one: its warning is muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return set(root.group_keys())


def run_attrs(root: Any) -> dict[str, Any]:
    """The root's ``normcheck`` attributes (run parameters, plan, ...)."""
    return dict(root.attrs.get("normcheck", {}))


def output_levels(group: Any) -> list[Level]:
    """Every level of an OME-Zarr image group, finest first, from its ``multiscales`` metadata.

    Parameters
    ----------
    group : zarr.Group
        An image group written by :class:`~napari_normcheck.core.io.store.OutputStore` (OME-Zarr 0.5
        ``ome`` attribute, or 0.4's top-level ``multiscales``).

    Returns
    -------
    list of Level
        One per ``datasets`` entry; scale and translation over the space axes only.
    """
    attrs = dict(group.attrs)
    ome = dict(attrs.get("ome", attrs))
    multiscale = ome["multiscales"][0]
    axes = multiscale["axes"]
    space = [i for i, axis in enumerate(axes) if axis.get("type") == "space"]
    levels = []
    for dataset in multiscale["datasets"]:
        scale = [1.0] * len(axes)
        translation = [0.0] * len(axes)
        for transform in dataset.get("coordinateTransformations", []):
            if transform["type"] == "scale":
                scale = transform["scale"]
            elif transform["type"] == "translation":
                translation = transform["translation"]
        levels.append(
            Level(
                str(dataset["path"]),
                tuple(float(scale[i]) for i in space),
                tuple(float(translation[i]) for i in space),
            )
        )
    return levels


def spatial_transform(group: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Spatial ``(scale, translation)`` of an OME-Zarr image group's finest level."""
    level = output_levels(group)[0]
    return level.scale, level.translation
