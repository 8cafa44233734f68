"""The synthetic EM volume and the packaged sample models."""

import numpy as np
import pytest
import torch

from napari_normcheck.core.base.modes import running_stats_layers
from napari_normcheck.data import (
    SAMPLE_MODELS,
    SampleModel,
    make_synthetic_em,
    sample_model,
    sample_volume,
)

SMALL = (16, 64, 96)


@pytest.fixture(scope="module")
def small_volume():
    return make_synthetic_em(SMALL, seed=3)


def test_shapes_and_dtypes(small_volume):
    raw, labels = small_volume
    assert raw.shape == SMALL and raw.dtype == np.uint8
    assert labels.shape == (2, *SMALL) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    assert labels[0].any() and labels[1].any()


def test_same_seed_same_volume_other_seed_differs(small_volume):
    raw, labels = small_volume
    raw_again, labels_again = make_synthetic_em(SMALL, seed=3)
    np.testing.assert_array_equal(raw, raw_again)
    np.testing.assert_array_equal(labels, labels_again)
    raw_other, _ = make_synthetic_em(SMALL, seed=4)
    assert not np.array_equal(raw, raw_other)


def test_sample_volume_is_the_raw_channel():
    np.testing.assert_array_equal(sample_volume(SMALL, seed=5), make_synthetic_em(SMALL, seed=5)[0])


def test_labels_match_the_image(small_volume):
    raw, labels = small_volume
    membrane, organelle = labels.astype(bool)
    # Bright resin is excluded so that "interior" means cytoplasm, the contrast a model must learn.
    cytoplasm = ~membrane & ~organelle & (raw < 190)
    assert raw[membrane].mean() < raw[cytoplasm].mean() - 40
    assert raw[organelle].mean() < raw[cytoplasm].mean() - 30
    assert not (membrane & organelle).any()


def _local_std(raw: np.ndarray, radius: int = 2) -> np.ndarray:
    """In-plane standard deviation over (2r+1)^2 windows, by shifted copies (no scipy)."""
    image = raw.astype(np.float64)
    shifts = [
        np.roll(image, (dy, dx), axis=(1, 2))
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
    ]
    return np.std(shifts, axis=0)[:, radius:-radius, radius:-radius]


def test_large_featureless_resin_region(small_volume):
    raw, labels = small_volume
    flat = _local_std(raw) < 6
    # Tissue is textured and crossed by membranes everywhere; only resin is this flat.
    assert flat.mean() > 0.2
    inner = (slice(None), slice(2, -2), slice(2, -2))
    assert raw[inner][flat].mean() > raw[inner][~flat].mean() + 30
    assert not labels[0][inner][flat].any()


def test_generation_scales_to_the_default_sample_size_quickly():
    import time

    started = time.perf_counter()
    raw, labels = make_synthetic_em()
    assert time.perf_counter() - started < 5
    assert raw.shape == (48, 192, 192)
    assert 0.05 < labels[0].mean() < 0.3


def test_invalid_shape_is_refused():
    with pytest.raises(ValueError, match="three positive sizes"):
        make_synthetic_em((10, 10))


def test_sample_model_lookup():
    assert set(SAMPLE_MODELS) == {"batchnorm", "groupnorm"}
    assert sample_model("groupnorm") is SAMPLE_MODELS["groupnorm"]
    with pytest.raises(KeyError, match="batchnorm, groupnorm"):
        sample_model("layernorm")


@pytest.mark.parametrize("name", sorted(SAMPLE_MODELS))
def test_packaged_weights_load_into_the_architecture(name):
    sample: SampleModel = SAMPLE_MODELS[name]
    assert sample.path.is_file()
    assert all(side % 16 == 0 for side in sample.tile)
    network = sample.build()
    state = torch.load(sample.path, map_location="cpu", weights_only=True)
    network.load_state_dict(state)  # strict: every key and shape must match
    with torch.inference_mode():
        output = sample.load()(torch.rand(1, 1, 16, 32, 32))
    assert output.shape == (1, 2, 16, 32, 32)
    has_running = bool(running_stats_layers(network))
    assert has_running == (name == "batchnorm")


def test_packaged_models_are_small():
    total = sum(sample.path.stat().st_size for sample in SAMPLE_MODELS.values())
    assert total < 2 * 1024 * 1024
