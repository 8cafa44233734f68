"""bioimage.io pre/postprocessing: mapped to an intensity spec, or applied to a whole array.

:func:`map_preprocessing` maps the package's preprocessing to one intensity spec of
:mod:`napari_normcheck.core.io.intensity` (statistics computed once over the whole volume, never per
tile); ``notes`` say where the mapping is not exact. ``apply_*`` reproduce bioimage.io's formulas
for ``--verify``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_normcheck.core.base.errors import NormcheckError

_DEFAULT_EPS = 1e-6


def _scalar(value: Any) -> float | None:
    """A float from a number or a list of equal numbers; None for per-channel values."""
    values = np.ravel(np.asarray(value, dtype=float))
    if values.size and np.all(values == values[0]):
        return float(values[0])
    return None


def map_preprocessing(steps: list[dict[str, Any]]) -> tuple[str | None, list[str]]:
    """Map declared preprocessing to an intensity spec string, with notes where it is not exact.

    Parameters
    ----------
    steps : list of dict
        ``{"name": ..., "kwargs": ...}`` in the package's order.

    Returns
    -------
    spec : str or None
        ``percentile:LO,HI``, ``meanstd:MEAN,STD`` or ``none``; None when no spec reproduces it.
    notes : list of str
        What could not be mapped exactly.
    """
    notes: list[str] = []
    steps = [s for s in steps if s["name"] != "ensure_dtype"]
    if not steps:
        return "none", notes
    if len(steps) > 1:
        names = ", ".join(s["name"] for s in steps)
        notes.append(
            f"the package preprocesses with several steps ({names}); only the first is mapped "
            "to --normalize, so check the input intensities"
        )
    name, kwargs = steps[0]["name"], steps[0]["kwargs"]
    mode = kwargs.get("mode")
    if name == "scale_range":
        low = float(kwargs.get("min_percentile", 0.0))
        high = float(kwargs.get("max_percentile", 100.0))
        if mode == "per_sample":
            notes.append("scale_range per_sample is treated as per_dataset (whole volume)")
        if kwargs.get("reference_tensor"):
            notes.append("scale_range's reference_tensor is ignored (the input itself is used)")
        notes.append(
            "scale_range percentiles are taken over all channels together; its eps is ignored"
        )
        return f"percentile:{low:g},{high:g}", notes
    if name == "scale_linear":
        gain = _scalar(kwargs.get("gain", 1.0))
        offset = _scalar(kwargs.get("offset", 0.0))
        if gain is None or offset is None or gain <= 0:
            notes.append("scale_linear with per-channel or non-positive gain cannot be mapped")
            return None, notes
        # x * gain + offset == (x - MEAN) / STD with MEAN = -offset / gain, STD = 1 / gain.
        return f"meanstd:{-offset / gain!r},{1.0 / gain!r}", notes
    if name in ("zero_mean_unit_variance", "fixed_zero_mean_unit_variance"):
        if name == "fixed_zero_mean_unit_variance" or mode == "fixed":
            mean, std = _scalar(kwargs.get("mean")), _scalar(kwargs.get("std"))
            if mean is None or std is None or std <= 0:
                notes.append(f"{name} with per-channel mean/std cannot be mapped")
                return None, notes
            return f"meanstd:{mean!r},{std!r}", notes
        notes.append(
            f"{name} ({mode or 'per_sample'}) uses the mean and std of the whole volume, estimated "
            "once (never per tile): --normalize zscore"
        )
        return "zscore", notes
    notes.append(f"preprocessing {name!r} has no --normalize equivalent and is not applied")
    return None, notes


def map_postprocessing(steps: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The activation (``"sigmoid"`` or ``"none"``) and notes for what is ignored."""
    activation, notes = "none", []
    for step in steps:
        if step["name"] == "sigmoid":
            activation = "sigmoid"
        elif step["name"] == "binarize":
            notes.append("binarize postprocessing ignored: probabilities are compared")
        elif step["name"] != "ensure_dtype":
            notes.append(f"postprocessing {step['name']!r} is not applied")
    return activation, notes


def apply_preprocessing(steps: list[dict[str, Any]], data: np.ndarray) -> np.ndarray:
    """Apply the declared steps to a whole array, statistics over all of it (per dataset).

    Formulas follow bioimage.io, eps included, so that a package's test output is reproduced.
    """
    values = np.asarray(data, dtype=np.float32)
    for step in steps:
        name, kwargs = step["name"], step["kwargs"]
        eps = float(kwargs.get("eps", _DEFAULT_EPS))
        if name == "scale_range":
            low, high = np.percentile(
                values,
                [float(kwargs.get("min_percentile", 0)), float(kwargs.get("max_percentile", 100))],
            )
            values = (values - np.float32(low)) / np.float32(high - low + eps)
        elif name == "scale_linear":
            gain = np.float32(_scalar(kwargs.get("gain", 1.0)) or 0.0)
            values = values * gain + np.float32(_scalar(kwargs.get("offset", 0.0)) or 0.0)
        elif name == "fixed_zero_mean_unit_variance" or (
            name == "zero_mean_unit_variance" and kwargs.get("mode") == "fixed"
        ):
            mean, std = _scalar(kwargs.get("mean")), _scalar(kwargs.get("std"))
            values = (values - np.float32(mean)) / np.float32(std + eps)
        elif name == "zero_mean_unit_variance":
            values = (values - values.mean()) / np.float32(values.std() + eps)
        elif name == "clip":
            values = np.clip(values, kwargs.get("min"), kwargs.get("max"))
        elif name != "ensure_dtype":
            raise NormcheckError(f"preprocessing {name!r} is not supported by --verify")
        values = values.astype(np.float32)
    return values


def apply_postprocessing(steps: list[dict[str, Any]], data: np.ndarray) -> np.ndarray:
    """Apply sigmoid and binarize (the steps a test output may include) to an array."""
    values = np.asarray(data, dtype=np.float32)
    for step in steps:
        if step["name"] == "sigmoid":
            values = 1.0 / (1.0 + np.exp(-values))
        elif step["name"] == "binarize":
            values = (values > float(step["kwargs"].get("threshold", 0.5))).astype(np.float32)
    return values
