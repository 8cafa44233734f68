"""Input intensity normalization: one affine map, fixed before the run, identical for every tile.

Normalizing per tile would give every tile its own intensity scale and show up as a seam in the
disparity maps; so statistics (percentiles) are estimated once from a subsample of the whole volume.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from napari_normcheck.core.base.errors import InputReadError, NormcheckError, first_line
from napari_normcheck.core.io.lazy_array import THREADS, describe_box, failing_box

IntensityKind = Literal["none", "minmax", "meanstd", "percentile", "zscore"]

ACCEPTED_FORMS = "none, minmax:LO,HI, meanstd:MEAN,STD, percentile:P_LO,P_HI or zscore"


@dataclass(frozen=True)
class IntensitySpec:
    """How input intensities are normalized, as the user wrote it.

    Attributes
    ----------
    kind : {"none", "minmax", "meanstd", "percentile"}
        The normalization.
    low : float, optional
        minmax: LO, meanstd: MEAN, percentile: P_LO. None for "none".
    high : float, optional
        minmax: HI, meanstd: STD, percentile: P_HI. None for "none".
    """

    kind: IntensityKind
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.kind in ("none", "zscore"):
            if self.low is not None or self.high is not None:
                raise NormcheckError(
                    f"normalization {self.kind!r} takes no values; use {ACCEPTED_FORMS}"
                )
            return
        if self.kind not in ("minmax", "meanstd", "percentile"):
            raise NormcheckError(f"unknown normalization {self.kind!r}; use {ACCEPTED_FORMS}")
        if self.low is None or self.high is None:
            raise NormcheckError(
                f"normalization {self.kind!r} needs two values; use {ACCEPTED_FORMS}"
            )
        low, high = float(self.low), float(self.high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NormcheckError(f"normalization {self.to_string()} has a non-finite value")
        if self.kind == "minmax" and not high > low:
            raise NormcheckError(f"minmax:{low:g},{high:g} needs HI > LO; swap or fix the values")
        if self.kind == "meanstd" and not high > 0:
            raise NormcheckError(f"meanstd:{low:g},{high:g} needs STD > 0")
        if self.kind == "percentile" and not 0 <= low < high <= 100:
            raise NormcheckError(
                f"percentile:{low:g},{high:g} needs 0 <= P_LO < P_HI <= 100, e.g. percentile:1,99.8"
            )
        # Stored as plain floats so equality and to_string do not depend on the caller's types.
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def parse(cls, text: str) -> IntensitySpec:
        """Parse ``none``, ``minmax:LO,HI``, ``meanstd:MEAN,STD`` or ``percentile:P_LO,P_HI``.

        Parameters
        ----------
        text : str
            The spec as typed on the command line or in the widget (case and spaces ignored).

        Returns
        -------
        IntensitySpec
            The validated spec.

        Raises
        ------
        NormcheckError
            For text of another form or values that are out of range.
        """
        cleaned = str(text).strip().lower().replace(" ", "")
        kind, _, values = cleaned.partition(":")
        if kind in ("none", "zscore") and not values:
            return cls(kind)  # type: ignore[arg-type]
        parts = values.split(",")
        if kind not in ("minmax", "meanstd", "percentile") or len(parts) != 2:
            raise NormcheckError(f"cannot read normalization {text!r}; use {ACCEPTED_FORMS}")
        try:
            low, high = (float(part) for part in parts)
        except ValueError:
            raise NormcheckError(
                f"cannot read the numbers in normalization {text!r}; use {ACCEPTED_FORMS}"
            ) from None
        return cls(kind, low, high)  # type: ignore[arg-type]

    def to_string(self) -> str:
        """Return the spec in the form :meth:`parse` reads, e.g. ``percentile:1,99.8``."""
        if self.kind in ("none", "zscore"):
            return self.kind
        return f"{self.kind}:{_format_number(self.low)},{_format_number(self.high)}"


@dataclass(frozen=True)
class IntensityTransform:
    """The resolved affine map ``(x - offset) * scale``, applied identically to every tile.

    Attributes
    ----------
    offset : float
        Subtracted first.
    scale : float
        Multiplied second.
    spec : IntensitySpec
        The spec it was resolved from (for reports).
    """

    offset: float
    scale: float
    spec: IntensitySpec

    def apply(self, block: np.ndarray) -> np.ndarray:
        """Normalize ``block`` in float32.

        Parameters
        ----------
        block : numpy.ndarray
            Raw voxels of any numeric dtype.

        Returns
        -------
        numpy.ndarray
            ``(block.astype(float32) - offset) * scale`` with every step in float32, so results are
            bit-identical to the same expression written elsewhere (MONAI parity tests rely on it).
        """
        values = np.asarray(block).astype(np.float32)  # a copy: the steps below may write into it
        np.subtract(values, np.float32(self.offset), out=values)
        return np.multiply(values, np.float32(self.scale), out=values)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description: the spec text, offset and scale."""
        return {"spec": self.spec.to_string(), "offset": self.offset, "scale": self.scale}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IntensityTransform:
        """Rebuild a transform saved by :meth:`to_dict` (a resumed run must reuse it exactly).

        Parameters
        ----------
        values : dict
            Keys ``spec``, ``offset`` and ``scale``.

        Returns
        -------
        IntensityTransform
            The same transform, without re-estimating percentiles.
        """
        spec = IntensitySpec.parse(values["spec"])
        return cls(offset=float(values["offset"]), scale=float(values["scale"]), spec=spec)


#: The normalization of integer input when none is asked for (the widget's and the command line's
#: default): 8- and 16-bit microscopy intensities are not what networks were trained on.
INTEGER_NORMALIZE = "percentile:1,99.8"


def default_normalize(dtype: Any) -> str:
    """The normalization used when neither the user nor the model names one.

    :data:`INTEGER_NORMALIZE` for integer input (uint8 EM, uint16 light sheet), ``"none"`` for
    float input (taken to be prepared already).
    """
    return INTEGER_NORMALIZE if np.issubdtype(np.dtype(dtype), np.integer) else "none"


def resolve_intensity(
    spec: IntensitySpec | str, data: Any, *, max_samples: int = 2_000_000
) -> IntensityTransform:
    """Turn a spec into a fixed transform, estimating percentiles once from a subsample.

    Parameters
    ----------
    spec : IntensitySpec or str
        The normalization, or its text form.
    data : dask.array.Array or numpy.ndarray
        The volume ``(C, Z, Y, X)``. Only percentile reads voxels: a strided subsample spread over
        the whole volume, every channel included (one offset and scale for all channels).
    max_samples : int
        About this many voxels are read for percentiles. With chunked storage the stride skips
        whole chunks only where it exceeds the chunk length along an axis (always true across
        TIFF pages), so more bytes may be decoded than sampled; memory stays bounded.

    Returns
    -------
    IntensityTransform
        Offset and scale with ``(x - offset) * scale``.

    Raises
    ------
    NormcheckError
        For a bad spec, or percentiles that coincide (a constant or all-NaN volume).

    Warns
    -----
    UserWarning
        For "none" on integer data, which then reaches the network unscaled.
    """
    if isinstance(spec, str):
        spec = IntensitySpec.parse(spec)
    if spec.kind == "none":
        if np.issubdtype(np.dtype(data.dtype), np.integer):
            warnings.warn(
                f"normalization 'none': {np.dtype(data.dtype)} intensities go into the network "
                "unscaled; most networks were trained on normalized input, so consider "
                "--normalize percentile:1,99.8 or --normalize minmax:LO,HI",
                UserWarning,
                stacklevel=2,
            )
        return IntensityTransform(offset=0.0, scale=1.0, spec=spec)
    if spec.kind == "zscore":
        mean, std = _estimate_mean_std(data, max_samples, spec)
        return IntensityTransform(offset=mean, scale=1.0 / std, spec=spec)
    low, high = float(spec.low), float(spec.high)  # type: ignore[arg-type]
    if spec.kind == "meanstd":
        return IntensityTransform(offset=low, scale=1.0 / high, spec=spec)
    if spec.kind == "percentile":
        low, high = _estimate_percentiles(data, low, high, max_samples, spec)
    return IntensityTransform(offset=low, scale=1.0 / (high - low), spec=spec)


def subsample_strides(shape: tuple[int, ...], max_samples: int) -> tuple[int, ...]:
    """Strides per axis so that ``data[::s0, ::s1, ...]`` holds about ``max_samples`` voxels.

    The leading (channel) axis of a 4D shape is never strided, so every channel is sampled. The
    reduction is shared evenly between the other axes; an axis too short for its share takes what
    it can and passes the rest on.

    Parameters
    ----------
    shape : tuple of int
        Array shape, ``(C, Z, Y, X)`` for a volume.
    max_samples : int
        Target number of sampled voxels (at least 1).

    Returns
    -------
    tuple of int
        One stride (>= 1) per axis.
    """
    strides = [1] * len(shape)
    ratio = math.prod(shape) / max(1, max_samples)
    if ratio <= 1:
        return tuple(strides)
    strided_axes = list(range(1, len(shape)) if len(shape) == 4 else range(len(shape)))
    # Short axes first: they saturate early and hand their unused share to the long ones.
    strided_axes.sort(key=lambda axis: shape[axis])
    for position, axis in enumerate(strided_axes):
        share = ratio ** (1.0 / (len(strided_axes) - position))
        stride = max(1, min(shape[axis], round(share)))
        strides[axis] = stride
        ratio /= shape[axis] / math.ceil(shape[axis] / stride)
    return tuple(strides)


def _strided_sample(data: Any, max_samples: int) -> np.ndarray:
    strides = subsample_strides(tuple(int(n) for n in data.shape), max_samples)
    sample = data[tuple(slice(None, None, stride) for stride in strides)]
    if hasattr(sample, "compute"):
        try:
            sample = sample.compute(scheduler=THREADS)
        except NormcheckError:
            raise
        except Exception as error:
            box = failing_box(sample, strides)
            where = f" in the box {describe_box(box)}" if box else ""
            raise InputReadError(
                f"cannot read the input{where} while sampling its "
                f"intensities for the normalization ({first_line(error)}); a chunk there is "
                "damaged or out of reach: repair or copy it again, then run again"
            ) from error
    return np.asarray(sample)


def _estimate_mean_std(data: Any, max_samples: int, spec: IntensitySpec) -> tuple[float, float]:
    # Once for the whole volume (bioimage.io's per-dataset zero_mean_unit_variance), never per tile.
    sample = _strided_sample(data, max_samples).astype(np.float64)
    mean, std = float(np.nanmean(sample)), float(np.nanstd(sample))
    if not (math.isfinite(mean) and std > 0):
        raise NormcheckError(
            f"{spec.to_string()} found a constant or empty volume (std {std:g}); use meanstd:MEAN,STD"
        )
    return mean, std


def _estimate_percentiles(
    data: Any, p_low: float, p_high: float, max_samples: int, spec: IntensitySpec
) -> tuple[float, float]:
    sample = _strided_sample(data, max_samples)
    if np.issubdtype(sample.dtype, np.floating):
        # NaN is reported with its location by the tile reader; here it only must not spoil the
        # estimate.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(sample, [p_low, p_high])
    else:
        low, high = np.percentile(sample, [p_low, p_high])
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise NormcheckError(
            f"{spec.to_string()} found no finite voxels in the sampled volume; "
            "check the input or use minmax:LO,HI"
        )
    if high <= low:
        raise NormcheckError(
            f"{spec.to_string()} gives LO == HI == {low:g} (the volume looks constant); "
            "use minmax:LO,HI or widen the percentiles"
        )
    return low, high


def _format_number(value: float | None) -> str:
    """Shortest text that parses back to exactly ``value`` (``1`` rather than ``1.0``)."""
    value = float(value)  # type: ignore[arg-type]
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
