"""Intensity specs, the exact float32 transform, and percentiles estimated once from a subsample."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.intensity import (
    IntensitySpec,
    IntensityTransform,
    resolve_intensity,
    subsample_strides,
)
from napari_normcheck.core.io.volume import open_volume


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", IntensitySpec("none")),
        ("minmax:0,255", IntensitySpec("minmax", 0.0, 255.0)),
        ("MinMax: -1.5, 2e3", IntensitySpec("minmax", -1.5, 2000.0)),
        ("meanstd:120.25,33.5", IntensitySpec("meanstd", 120.25, 33.5)),
        ("percentile:1,99.8", IntensitySpec("percentile", 1.0, 99.8)),
        ("percentile:0,100", IntensitySpec("percentile", 0.0, 100.0)),
    ],
)
def test_parse_and_round_trip(text, expected):
    spec = IntensitySpec.parse(text)

    assert spec == expected
    assert IntensitySpec.parse(spec.to_string()) == spec


def test_to_string_is_short_and_exact():
    assert IntensitySpec.parse("percentile:1,99.8").to_string() == "percentile:1,99.8"
    spec = IntensitySpec("meanstd", 0.1 + 0.2, 1 / 3)
    assert IntensitySpec.parse(spec.to_string()) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cannot read normalization"),
        ("robust", "cannot read normalization"),
        ("minmax", "cannot read normalization"),
        ("minmax:1", "cannot read normalization"),
        ("minmax:1,2,3", "cannot read normalization"),
        ("none:1,2", "cannot read normalization"),
        ("minmax:a,b", "cannot read the numbers"),
        ("minmax:5,5", "HI > LO"),
        ("minmax:9,1", "HI > LO"),
        ("minmax:0,inf", "non-finite"),
        ("meanstd:10,0", "STD > 0"),
        ("meanstd:10,-2", "STD > 0"),
        ("percentile:-1,99", "0 <= P_LO < P_HI <= 100"),
        ("percentile:50,50", "0 <= P_LO < P_HI <= 100"),
        ("percentile:1,101", "0 <= P_LO < P_HI <= 100"),
    ],
)
def test_bad_specs_name_the_accepted_forms(text, message):
    with pytest.raises(NormcheckError, match=message):
        IntensitySpec.parse(text)


def test_bad_form_lists_every_accepted_form():
    with pytest.raises(NormcheckError) as caught:
        IntensitySpec.parse("robust")
    for form in ("none", "minmax:LO,HI", "meanstd:MEAN,STD", "percentile:P_LO,P_HI", "zscore"):
        assert form in str(caught.value)


def test_apply_is_exact_float32_arithmetic():
    rng = np.random.default_rng(0)
    block = rng.integers(0, 65535, size=(2, 3, 5, 7), dtype=np.uint16)
    transform = resolve_intensity("minmax:100.3,40000.7", da.from_array(block))

    out = transform.apply(block)

    expected = (block.astype(np.float32) - np.float32(100.3)) * np.float32(1 / (40000.7 - 100.3))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)  # bit for bit, not approximately
    assert transform.offset == 100.3 and transform.scale == 1 / (40000.7 - 100.3)


def test_minmax_maps_range_to_unit_and_meanstd_to_z_scores():
    data = da.zeros((1, 1, 2, 2), dtype=np.float32)
    minmax = resolve_intensity("minmax:10,20", data)
    np.testing.assert_allclose(minmax.apply(np.array([10.0, 15.0, 20.0])), [0.0, 0.5, 1.0])

    meanstd = resolve_intensity(IntensitySpec("meanstd", 5.0, 2.0), data)
    assert (meanstd.offset, meanstd.scale) == (5.0, 0.5)
    np.testing.assert_allclose(meanstd.apply(np.array([1.0, 5.0, 9.0])), [-2.0, 0.0, 2.0])


def test_transform_dict_round_trip():
    transform = IntensityTransform(
        offset=3.5, scale=0.125, spec=IntensitySpec.parse("percentile:1,99")
    )

    assert transform.to_dict() == {"spec": "percentile:1,99", "offset": 3.5, "scale": 0.125}
    assert IntensityTransform.from_dict(transform.to_dict()) == transform


def test_none_warns_for_integer_data_only():
    with pytest.warns(UserWarning, match=r"unscaled.*percentile:1,99\.8.*minmax"):
        transform = resolve_intensity("none", da.zeros((1, 2, 4, 4), dtype=np.uint8))
    assert (transform.offset, transform.scale) == (0.0, 1.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_intensity("none", da.zeros((1, 2, 4, 4), dtype=np.float32))


def test_percentile_of_a_small_volume_equals_numpy_on_all_voxels(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.gamma(2.0, 300.0, size=(2, 6, 20, 24)).astype(np.float32)
    values[0, 1, 2, 3] = np.nan  # NaN is reported elsewhere; it must not spoil the estimate
    array = zarr.create_array(
        str(tmp_path / "raw.zarr"), shape=values.shape, chunks=(1, 2, 10, 12), dtype="float32"
    )
    array[:] = values

    transform = resolve_intensity("percentile:1,99.8", open_volume(tmp_path / "raw.zarr").data)

    low, high = np.nanpercentile(values, [1, 99.8])
    assert transform.offset == pytest.approx(low, rel=1e-12)
    assert transform.scale == pytest.approx(1 / (high - low), rel=1e-12)


def test_percentile_reads_a_strided_subsample_of_the_whole_volume():
    z = np.arange(40, dtype=np.float32)[:, None, None]
    # Values grow along z and odd rows are far off: a full read and a stride-2 read disagree.
    values = np.broadcast_to(z, (40, 30, 30)).copy()
    values[:, 1::2] += 1000.0
    data = da.from_array(values[None], chunks=(1, 5, 30, 30))

    transform = resolve_intensity("percentile:0,100", data, max_samples=9000)

    strides = subsample_strides(data.shape, 9000)
    assert strides[0] == 1 and strides[2] % 2 == 0  # channel never skipped; even rows only here
    subsample = values[None][:, :: strides[1], :: strides[2], :: strides[3]]
    assert subsample.size <= 2 * 9000
    assert transform.offset == subsample.min() == 0.0
    assert transform.offset + 1 / transform.scale == subsample.max() < values.max()
    assert subsample.max() >= 36  # the subsample reaches the far end of the volume


@pytest.mark.parametrize(
    ("shape", "max_samples"),
    [((1, 100, 512, 512), 2_000_000), ((3, 2, 4000, 4000), 2_000_000), ((1, 1, 64, 64), 100)],
)
def test_subsample_strides_hit_the_budget(shape, max_samples):
    strides = subsample_strides(shape, max_samples)

    sampled = np.prod([-(-n // s) for n, s in zip(shape, strides, strict=True)])
    assert strides[0] == 1
    assert max_samples / 3 <= sampled <= max_samples * 3
    assert subsample_strides((1, 4, 8, 8), 10**6) == (1, 1, 1, 1)


def test_constant_volume_percentile_is_an_error():
    data = da.full((1, 4, 8, 8), 7, dtype=np.uint8, chunks=(1, 2, 8, 8))

    with pytest.raises(NormcheckError, match="LO == HI == 7 .*constant.*minmax"):
        resolve_intensity("percentile:1,99", data)
    with pytest.raises(NormcheckError, match="no finite voxels"):
        resolve_intensity("percentile:1,99", da.full((1, 2, 2, 2), np.nan, dtype=np.float32))


def test_zscore_is_estimated_once_over_the_whole_volume():
    import dask.array as da

    from napari_normcheck.core.io.intensity import IntensitySpec, resolve_intensity

    rng = np.random.default_rng(3)
    volume = rng.normal(40.0, 7.0, size=(1, 20, 64, 64)).astype(np.float32)
    transform = resolve_intensity("zscore", da.from_array(volume, chunks=(1, 5, 32, 32)))
    assert IntensitySpec.parse("zscore").to_string() == "zscore"
    assert transform.offset == pytest.approx(volume.mean(), rel=1e-3)
    assert 1 / transform.scale == pytest.approx(volume.std(), rel=1e-2)
    with pytest.raises(NormcheckError, match="constant"):
        resolve_intensity("zscore", np.ones((1, 4, 8, 8), np.float32))
