"""Dice against ground-truth labels, accumulated chunk by chunk, against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.measure.labels import (
    LabelDice,
    dice_of_stored,
    label_box,
    open_labels,
    parse_label_map,
)


def numpy_dice(probabilities, labels, mapping, threshold=0.5, ignore=(), argmax=False):
    region = ~np.isin(labels, ignore)
    values = []
    for channel, label_values in mapping.items():
        truth = np.isin(labels, label_values)[region]
        if argmax:
            predicted = (np.argmax(probabilities, axis=0) == channel)[region]
        else:
            predicted = (probabilities[channel] > threshold)[region]
        total = truth.sum() + predicted.sum()
        values.append(1.0 if total == 0 else 2 * (truth & predicted).sum() / total)
    return values


def test_parse_label_map():
    assert parse_label_map('{"255": 0}') == {0: (255,)}
    assert parse_label_map('{"1,2": 1, "3": 1, "0": 0}') == {0: (0,), 1: (1, 2, 3)}
    assert parse_label_map({5: 2}) == {2: (5,)}
    for bad in ("{", "[1]", "{}", '{"a": 0}', '{"1": -1}', '{"1": 0.5}'):
        with pytest.raises(NormcheckError, match="label map"):
            parse_label_map(bad)


def test_chunked_dice_of_a_stored_prediction_equals_numpy(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = rng.random((2, 9, 20, 22)).astype(np.float32)
    labels = rng.integers(0, 4, size=(9, 20, 22)).astype(np.uint16)
    stored = zarr.create_array(
        str(tmp_path / "p.zarr"), shape=probabilities.shape, chunks=(1, 4, 8, 7), dtype="uint8"
    )
    quantized = np.round(probabilities * 255).astype(np.uint8)
    stored[...] = quantized
    tiff_like = tmp_path / "labels.npy"
    np.save(tiff_like, labels)
    volume = open_labels(tiff_like)
    mapping = parse_label_map('{"1": 0, "2,3": 1}')
    got = dice_of_stored(stored, volume, mapping, offset=(0, 0, 0), ignore=(0,))
    expected = numpy_dice(quantized / 255.0, labels, mapping, ignore=(0,))
    np.testing.assert_allclose(got["hard"], expected, rtol=0, atol=1e-12)
    assert got["n_voxels"] == int(np.count_nonzero(labels))
    argmax = dice_of_stored(stored, volume, mapping, offset=(0, 0, 0), argmax=True)
    np.testing.assert_allclose(
        argmax["hard"], numpy_dice(quantized / 255.0, labels, mapping, argmax=True), atol=1e-12
    )


def test_labels_of_the_whole_volume_are_read_at_the_roi(tmp_path):
    labels = np.zeros((10, 30, 30), dtype=np.uint8)
    labels[2:5, 10:20, 10:20] = 1
    volume = open_labels(labels)
    assert label_box(volume, (10, 30, 30), (2, 10, 10), (6, 20, 20)) == (2, 10, 10)
    assert label_box(volume, (20, 60, 60), (0, 0, 0), (10, 30, 30)) == (0, 0, 0)
    with pytest.raises(NormcheckError, match="voxel grid"):
        label_box(volume, (20, 60, 60), (0, 0, 0), (12, 30, 30))
    accumulator = LabelDice({0: (1,)}, 1)
    accumulator.add(np.ones((1, 3, 10, 10), np.float32), labels[2:5, 10:20, 10:20])
    assert accumulator.result()["hard"] == [1.0]
    with pytest.raises(NormcheckError, match="channel 3"):
        LabelDice({3: (1,)}, 2)
    with pytest.raises(NormcheckError, match="integer"):
        open_labels(np.zeros((4, 4, 4), np.float32))
