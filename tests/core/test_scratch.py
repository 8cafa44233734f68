"""Per-tile host memory reused from tile to tile gives the same bits as new memory."""

import numpy as np
import torch

from napari_normcheck.core.base.scratch import ScratchBuffer
from napari_normcheck.core.io.intensity import IntensitySpec, IntensityTransform
from napari_normcheck.core.measure.features import per_sample_moments
from napari_normcheck.core.run.forward import activate_tensor, to_output_dtype
from napari_normcheck.core.run.registry import VOXEL_OUTPUTS


def test_a_scratch_buffer_lends_the_same_memory_until_a_larger_shape_needs_more():
    scratch = ScratchBuffer()
    cpu = torch.device("cpu")
    first = scratch.empty((2, 3, 4), cpu)
    assert first.shape == (2, 3, 4) and first.is_contiguous() and first.dtype == torch.float32
    smaller = scratch.empty((5, 4), cpu)
    assert smaller.data_ptr() == first.data_ptr() and smaller.is_contiguous()
    larger = scratch.empty((4, 3, 4), cpu)
    assert larger.numel() == 48
    again = scratch.empty((2, 3, 4), cpu)
    assert again.data_ptr() == larger.data_ptr()
    scratch.release()
    assert scratch.empty((1,), cpu).numel() == 1


def test_conversions_into_reused_memory_equal_those_into_new_memory():
    rng = np.random.default_rng(0)
    scratch = ScratchBuffer()
    # Values outside [0, 1] too (clamped), and a tile after a larger one (leftovers in the buffer).
    for shape in [(2, 3, 17, 33), (2, 2, 9, 5)]:
        values = torch.from_numpy(rng.normal(0.5, 0.6, size=shape).astype(np.float32))
        expected = to_output_dtype(values, "uint8")
        assert torch.equal(to_output_dtype(values, "uint8", scratch), expected)
        as_array = to_output_dtype(values.numpy(), "uint8")
        np.testing.assert_array_equal(as_array, expected.numpy())

    logits = torch.from_numpy(rng.normal(0, 4, size=(2, 3, 5, 7, 9)).astype(np.float32))
    new = activate_tensor(logits, "sigmoid")
    overwritten = logits.clone()
    in_place = activate_tensor(overwritten, "sigmoid", in_place=True)
    assert in_place.data_ptr() == overwritten.data_ptr()
    assert torch.equal(in_place, new)
    # A softmax is never computed in place: the values handed in stay as they were.
    kept = logits.clone()
    assert torch.equal(activate_tensor(kept, "softmax", in_place=True), torch.softmax(logits, 1))
    assert torch.equal(kept, logits)


def test_disparity_and_normalization_computed_in_their_own_memory_keep_their_bits():
    rng = np.random.default_rng(1)
    train = rng.random((2, 4, 6, 6), dtype=np.float32)
    evals = rng.random((2, 4, 6, 6), dtype=np.float32)
    disparity = next(o for o in VOXEL_OUTPUTS if o.name == "disparity")
    kept = train.copy(), evals.copy()
    for a, b in [(train, evals), (torch.from_numpy(train), torch.from_numpy(evals))]:
        result = np.asarray(disparity.compute({"train": a, "eval": b}))
        np.testing.assert_array_equal(result, np.abs(kept[0] - kept[1]))
    np.testing.assert_array_equal(train, kept[0])  # the predictions are not touched
    np.testing.assert_array_equal(evals, kept[1])

    raw = rng.integers(0, 4000, size=(3, 8, 8)).astype(np.uint16)
    transform = IntensityTransform(offset=123.25, scale=1 / 3000.5, spec=IntensitySpec("none"))
    expected = (raw.astype(np.float32) - np.float32(123.25)) * np.float32(1 / 3000.5)
    np.testing.assert_array_equal(transform.apply(raw), expected)
    floats = raw.astype(np.float32)
    transform.apply(floats)
    np.testing.assert_array_equal(floats, raw.astype(np.float32))  # the input is not touched


def test_feature_moments_with_the_kernels_output_in_reused_memory_are_the_same():
    scratch = ScratchBuffer()
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 8, 6, 20, 20), (1, 4, 5, 9, 9), (2, 3, 40, 40)]:
        x = torch.randn(shape, generator=generator) * 3 + 1
        assert torch.equal(per_sample_moments(x, scratch), per_sample_moments(x))
