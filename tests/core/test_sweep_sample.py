"""``sweep --sample``: regions spread over the content, read lazily; pooling equals summed sums."""

from __future__ import annotations

import dask.array as da
import numpy as np

from napari_normcheck.core.measure.metrics import disparity_from_sums
from napari_normcheck.core.run.sweep_sample import (
    PROBE_VOXELS,
    combine_reports,
    pooled,
    probe_strides,
    region_size,
    sample_regions,
)


def textured_with_background(shape=(16, 64, 224), background_from=128):
    """Texture everywhere but a flat, empty band at ``x >= background_from``."""
    rng = np.random.default_rng(3)
    volume = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
    volume[..., background_from:] = 0.0
    return volume[None]


def test_regions_are_content_spread_deterministic_and_the_same_size():
    data = da.from_array(textured_with_background(), chunks=(1, 16, 32, 32))
    tiles = [(16, 32, 32), (8, 16, 16)]
    regions = sample_regions(data, tiles, 2)
    assert regions == sample_regions(data, tiles, 2)  # deterministic
    assert len(regions) == 2
    for box in regions:
        # Twice the largest tile (z clipped to the volume), inside the content.
        assert [b - a for a, b in box] == [16, 64, 64]
        assert box[2][1] <= 128, box
    (_, _, (a0, a1)), (_, _, (b0, b1)) = regions
    assert a1 <= b0 or b1 <= a0  # spread: the two do not overlap


def test_more_regions_than_the_volume_holds_and_a_small_volume():
    data = textured_with_background(shape=(8, 40, 40), background_from=40)
    assert region_size([(16, 32, 32)], (8, 40, 40)) == (8, 40, 40)
    # One region fills the volume: there is no other to take.
    assert sample_regions(data, [(16, 32, 32)], 3) == [((0, 8), (0, 40), (0, 40))]


def test_the_probe_reads_a_strided_view_only():
    shape = (300, 2000, 2000)
    strides = probe_strides(shape)
    assert np.prod([-(-n // s) for n, s in zip(shape, strides)]) <= PROBE_VOXELS
    # A 1.2-billion-voxel lazy volume (1.2 GB loaded): scoring computes only the strided view.
    data = da.zeros((1, *shape), dtype=np.uint8, chunks=(1, 300, 250, 250))
    regions = sample_regions(data, [(32, 256, 256)], 4)
    # Flat everywhere: no box has content over another, so the N boxes are just spread out.
    assert len(regions) == 4
    assert regions[0] == ((0, 64), (0, 512), (0, 512))
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            assert not all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(a, b))


def test_pooled_equals_the_dice_of_summed_sums():
    rng = np.random.default_rng(0)
    sums = []
    for _ in range(3):
        union = rng.uniform(0, 1000, size=2)
        union[1] = 0.0 if not sums else union[1]  # a channel empty in one region
        sums.append(np.stack([rng.uniform(0, 0.5, size=2) * union, union]))
    values = [disparity_from_sums(s) for s in sums]
    expected = disparity_from_sums(np.sum(sums, axis=0))
    np.testing.assert_allclose(pooled(values, [s[1] for s in sums]), expected, atol=1e-12)
    assert pooled([[0.3], [0.5]], [[0.0], [0.0]]) == [0.0]  # empty everywhere: agreement


def _region_report(probabilities: bool) -> dict:
    support = {
        "min_foreground": {"voxels": 10, "fraction": 0.0},
        "n_voxels": 1000,
        "union_voxels": [400, 600],
        "soft_foreground": [300.0, 500.0],
        "probabilities": probabilities,
        "mismatch_judged": {"eval": [True, True], "train": [True, True]},
        "mismatch_n_voxels": {"eval": 200, "train": 200},
        "mismatch_foreground_voxels": {"eval": [100, 120], "train": [100, 120]},
        "mismatch_soft_foreground": {"eval": [90.0, 110.0], "train": [90.0, 110.0]},
    }
    pair = {"hard": [0.1, 0.2], "soft": [0.1, 0.2]}
    return {
        "support": support,
        "disparity": {"hard": [0.3, 0.4], "soft": [0.2, 0.3]},
        "mismatch_eval": pair,
        "mismatch_train": pair,
    }


def test_pooled_regions_judge_no_soft_value_where_one_region_had_logits():
    pooled_probabilities = combine_reports([_region_report(True), _region_report(True)])
    assert pooled_probabilities["support"]["soft_judged"] == [True, True]
    assert pooled_probabilities["support"]["probabilities"] is True
    logits = combine_reports([_region_report(True), _region_report(False)])["support"]
    assert logits["probabilities"] is False
    assert logits["soft_judged"] == [False, False]
    assert logits["mismatch_soft_judged"]["eval"] == [False, False]
    assert logits["judged"] == [True, True]  # the hard values stand
