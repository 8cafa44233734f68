"""Dice of predictions against ground-truth labels, from sums accumulated chunk by chunk.

Disparity says how much eval and train mode differ, not which one is right. With labels (a volume
on the input's voxel grid, in any format :func:`~napari_normcheck.core.io.volume.open_volume` reads, or a
napari Labels layer's array) and a mapping from label values to output channels, each prediction gets
a hard Dice per channel on the labelled region: the voxels whose label is not an ignore value.
Foreground of channel ``c`` is "label in the values mapped to ``c``"; the prediction's is
``p > threshold`` (or ``argmax == c`` for softmax outputs).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.lazy_array import SYNCHRONOUS
from napari_normcheck.core.io.volume import Volume, open_volume
from napari_normcheck.core.measure.metrics import dice_from_sums


def parse_label_map(text: str | Mapping[Any, Any]) -> dict[int, tuple[int, ...]]:
    """Read ``{"255": 0, "1,2": 1}``: label value(s) -> output channel; returns channel -> values.

    Parameters
    ----------
    text : str or mapping
        JSON object (or a dict) whose keys are a label value or comma-separated values and whose
        values are output channel indices.

    Returns
    -------
    dict
        ``{channel: (label values, ...)}``, sorted.

    Raises
    ------
    NormcheckError
        For text that is not such a JSON object.
    """
    example = "write it as JSON label value(s) -> channel, e.g. '{\"255\": 0}' or '{\"1,2\": 1}'"
    if isinstance(text, str):
        try:
            mapping = json.loads(text)
        except ValueError:
            raise NormcheckError(f"cannot read the label map {text!r}; {example}") from None
    else:
        mapping = dict(text)
    if not isinstance(mapping, dict) or not mapping:
        raise NormcheckError(f"the label map {text!r} is empty or not an object; {example}")
    channels: dict[int, set[int]] = {}
    try:
        for key, channel in mapping.items():
            values = [int(v) for v in str(key).split(",")]
            if isinstance(channel, bool) or int(channel) != channel or int(channel) < 0:
                raise ValueError
            channels.setdefault(int(channel), set()).update(values)
    except (TypeError, ValueError):
        raise NormcheckError(f"cannot read the label map {text!r}; {example}") from None
    return {c: tuple(sorted(v)) for c, v in sorted(channels.items())}


def open_labels(source: Any, *, dataset: str | None = None) -> Volume:
    """Open a labels volume lazily (path in any supported format, or an array) as ``(1, Z, Y, X)``."""
    volume = open_volume(source, dataset=dataset, channel_axis=None)
    if volume.n_channels != 1:
        raise NormcheckError(
            f"the labels {volume.source} have {volume.n_channels} channels; give a single label image"
        )
    if volume.dtype.kind not in "iub":
        raise NormcheckError(
            f"the labels {volume.source} hold {volume.dtype} values; give integer labels"
        )
    return volume


@dataclass
class LabelDice:
    """Hard Dice of predictions against labels per output channel, summed chunk by chunk.

    Parameters
    ----------
    mapping : dict
        ``{channel: label values}`` from :func:`parse_label_map`.
    n_channels : int
        Output channels of the predictions.
    threshold : float
        Foreground probability threshold.
    argmax : bool
        Softmax outputs: a voxel belongs to the channel of highest probability.
    ignore : iterable of int
        Label values outside the labelled region (e.g. unannotated voxels).
    """

    mapping: dict[int, tuple[int, ...]]
    n_channels: int
    threshold: float = 0.5
    argmax: bool = False
    ignore: tuple[int, ...] = ()
    sums: np.ndarray = field(init=False)
    n_labelled: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        bad = [c for c in self.mapping if c >= self.n_channels]
        if bad:
            raise NormcheckError(
                f"the label map names channel {bad[0]} but the model has {self.n_channels} "
                f"output channel(s) (0-{self.n_channels - 1}); fix --label-map"
            )
        self.ignore = tuple(int(v) for v in self.ignore)
        self.sums = np.zeros((2, len(self.mapping)), dtype=np.float64)

    @property
    def channels(self) -> list[int]:
        """The output channels with a mapping, in order."""
        return list(self.mapping)

    def add(self, probabilities: np.ndarray, labels: np.ndarray) -> None:
        """Add one chunk: ``probabilities`` ``(C, z, y, x)`` in [0, 1], ``labels`` ``(z, y, x)``."""
        region = ~np.isin(labels, self.ignore) if self.ignore else np.ones(labels.shape, bool)
        self.n_labelled += int(np.count_nonzero(region))
        winner = np.argmax(probabilities, axis=0) if self.argmax else None
        for k, (channel, values) in enumerate(self.mapping.items()):
            truth = np.isin(labels, values) & region
            if winner is not None:
                predicted = (winner == channel) & region
            else:
                predicted = (probabilities[channel] > self.threshold) & region
            self.sums[0, k] += np.count_nonzero(truth & predicted)
            self.sums[1, k] += np.count_nonzero(truth) + np.count_nonzero(predicted)

    def result(self) -> dict[str, Any]:
        """``{"channels": [...], "hard": [Dice per mapped channel], "n_voxels": labelled voxels}``."""
        return {
            "channels": self.channels,
            "hard": [float(v) for v in dice_from_sums(self.sums)],
            "n_voxels": self.n_labelled,
        }


def label_box(
    labels: Volume,
    volume_shape: tuple[int, ...],
    roi_start: tuple[int, ...],
    roi_stop: tuple[int, ...],
) -> tuple[int, ...]:
    """Offset to add to ROI-relative coordinates to index ``labels``.

    Labels on the whole input grid are indexed at the ROI position; labels of exactly the ROI's shape
    are taken to cover the ROI.
    """
    shape = labels.spatial_shape
    if tuple(shape) == tuple(volume_shape):
        return tuple(roi_start)
    if tuple(shape) == tuple(b - a for a, b in zip(roi_start, roi_stop)):
        return (0, 0, 0)
    raise NormcheckError(
        f"the labels have shape {tuple(shape)} but the input volume is {tuple(volume_shape)} "
        f"(region {tuple(b - a for a, b in zip(roi_start, roi_stop))}); give labels on the input's "
        "voxel grid"
    )


def read_labels(labels: Volume, offset: tuple[int, ...], box: tuple[slice, ...]) -> np.ndarray:
    """The labels of the ROI-relative ``box`` ``(z, y, x)`` as a numpy array."""
    shifted = tuple(slice(s.start + o, s.stop + o) for s, o in zip(box, offset))
    block = labels.data[(0, *shifted)]
    return np.asarray(block.compute(scheduler=SYNCHRONOUS) if hasattr(block, "compute") else block)


def chunk_boxes(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterable[tuple[slice, ...]]:
    """Boxes of a chunk grid over ``shape`` (spatial), in C order."""
    ranges = [range(0, n, c) for n, c in zip(shape, chunks)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(a, min(a + c, n)) for a, c, n in zip(starts, chunks, shape))


def stored_probabilities(values: np.ndarray) -> np.ndarray:
    """Probabilities from a stored prediction chunk (uint8 stores probability x 255)."""
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    return values.astype(np.float32, copy=False)


def dice_of_stored(
    prediction: Any,
    labels: Volume,
    mapping: dict[int, tuple[int, ...]],
    *,
    offset: tuple[int, ...],
    threshold: float = 0.5,
    argmax: bool = False,
    ignore: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Dice of a stored ``(C, Z, Y, X)`` prediction (zarr array) against ``labels``, chunk by chunk.

    Parameters
    ----------
    prediction : zarr.Array
        Probabilities (float or uint8 x 255) over the ROI.
    labels : Volume
        From :func:`open_labels`.
    mapping : dict
        ``{channel: label values}``.
    offset : tuple of int
        From :func:`label_box`.
    threshold, argmax, ignore
        As in :class:`LabelDice`.

    Returns
    -------
    dict
        :meth:`LabelDice.result`.
    """
    return dice_of_stored_many(
        {"prediction": prediction},
        labels,
        mapping,
        offset=offset,
        threshold=threshold,
        argmax=argmax,
        ignore=ignore,
    )["prediction"]


def dice_of_stored_many(
    predictions: dict[str, Any],
    labels: Volume,
    mapping: dict[int, tuple[int, ...]],
    *,
    offset: tuple[int, ...],
    threshold: float = 0.5,
    argmax: bool = False,
    ignore: tuple[int, ...] = (),
) -> dict[str, dict[str, Any]]:
    """:func:`dice_of_stored` of several stored predictions of one layout, by name.

    The labels are read once per chunk, whatever the number of predictions.
    """
    first = next(iter(predictions.values()))
    accumulators = {
        name: LabelDice(mapping, int(array.shape[0]), threshold, argmax, tuple(ignore))
        for name, array in predictions.items()
    }
    for box in chunk_boxes(tuple(first.shape[1:]), tuple(first.chunks[1:])):
        truth = read_labels(labels, offset, box)
        for name, array in predictions.items():
            values = stored_probabilities(np.asarray(array[(slice(None), *box)]))
            accumulators[name].add(values, truth)
    return {name: accumulator.result() for name, accumulator in accumulators.items()}
