"""The napari reader contribution: open a napari-normcheck OUT.zarr as layers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

LayerDataTuple = tuple[Any, dict, str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerDataTuple]] | None:
    """Return a reader when ``path`` is a napari-normcheck output folder, else ``None``.

    Parameters
    ----------
    path : str or list of str
        What napari asks about; a list is accepted when every element is an output folder.

    Returns
    -------
    callable or None
        ``reader(path) -> list of layer data tuples``; ``None`` for other zarr folders, so napari
        tries other readers.
    """
    from napari_normcheck.core.store import is_normcheck_store

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(is_normcheck_store(p) for p in paths):
        return None
    return read_outputs


def read_outputs(path: str | list[str]) -> list[LayerDataTuple]:
    """Read every output of one or more stores as lazily loaded layers.

    Parameters
    ----------
    path : str or list of str
        OUT.zarr folder(s).

    Returns
    -------
    list of tuple
        Layer data tuples from :func:`napari_normcheck._layers.layers_from_store`.
    """
    from napari_normcheck._layers import layers_from_store

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerDataTuple] = []
    for p in paths:
        layers.extend(layers_from_store(p))
    return layers
