"""The napari sample-data contribution: the synthetic EM-like volume as an image layer."""

from __future__ import annotations

from typing import Any

SAMPLE_SHAPE = (48, 128, 128)
SAMPLE_LAYER_NAME = "normcheck sample"


def make_sample(shape: tuple[int, int, int] = SAMPLE_SHAPE) -> list[tuple[Any, dict, str]]:
    """Return the synthetic volume of :mod:`napari_normcheck.data` as one layer data tuple.

    Parameters
    ----------
    shape : tuple of int
        ``(z, y, x)`` size; the default is small enough to generate in about a second and fits the
        packaged sample models' tile.

    Returns
    -------
    list of tuple
        ``[(data, kwargs, "image")]``; the layer's metadata marks it as the sample, so the widget
        offers the packaged sample models for it.
    """
    from napari_normcheck.data import sample_volume

    raw = sample_volume(shape=shape, seed=0)
    kwargs = {
        "name": SAMPLE_LAYER_NAME,
        "contrast_limits": (0, 255),
        "metadata": {"normcheck_sample": True},
    }
    return [(raw, kwargs, "image")]
