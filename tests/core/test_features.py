import numpy as np
import pytest
import torch

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import plan_tiles
from napari_normcheck.core.io.intensity import resolve_intensity
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.measure.features import FeatureRecorder, default_feature_layers
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.tile_io import read_window
from tests.conftest import synthetic_volume, tiny_unet


def test_first_norm_layer_statistics_and_z_match_direct_computation(tmp_path, batchnorm_unet):
    model = batchnorm_unet
    layers = default_feature_layers(model)
    assert layers[0] == "conv_0.conv_0.adn.N"
    volume = open_volume(synthetic_volume((16, 40, 40)))
    config = RunConfig(tile=(16, 32, 32), overlap=0.5, eval_batch=2)
    summary = list(run_check(volume, model, config, tmp_path / "o.zarr"))[-1].summary
    plan = plan_tiles((16, 40, 40), (16, 32, 32), overlap=0.5)
    transform = resolve_intensity("none", volume.data)
    norm = model.conv_0.conv_0.adn.N
    for record in summary["tiles"]:
        image = read_window(volume, plan, plan.get_tile(record["index"]), transform)
        with torch.inference_mode():
            features = model.conv_0.conv_0.conv(torch.from_numpy(image)[None]).double()[0]
        mean = features.flatten(1).mean(1).numpy()
        var = features.flatten(1).var(1, unbiased=False).numpy()
        z = (mean - norm.running_mean.double().numpy()) / np.sqrt(
            norm.running_var.double().numpy() + norm.eps
        )
        got = record["features"][layers[0]]
        np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["var"], var, rtol=1e-5)
        np.testing.assert_allclose(got["z"], z, rtol=1e-5, atol=1e-5)
        assert record["feature_z"]["layer"] == layers[0]
        assert record["feature_z"]["max_abs"] == pytest.approx(np.abs(z).max(), rel=1e-5)


def test_group_norm_model_has_no_z_but_named_layers_can_be_recorded(tmp_path):
    model = tiny_unet(("group", {"num_groups": 2}))
    assert default_feature_layers(model) == []
    volume = open_volume(synthetic_volume((16, 32, 32)))
    config = RunConfig(tile=(16, 32, 32), feature_layers=("conv_0.conv_0.conv",))
    record = list(run_check(volume, model, config, tmp_path / "o.zarr"))[-1].summary["tiles"][0]
    assert record["feature_z"] is None
    assert len(record["features"]["conv_0.conv_0.conv"]["mean"]) == 1  # the conv's input: 1 channel
    with pytest.raises(NormcheckError, match="no layer named"):
        FeatureRecorder(model, ["nope"])


def test_per_sample_moments_equal_var_mean_and_handle_constant_channels():
    import torch

    from napari_normcheck.core.measure.features import per_sample_moments

    x = torch.randn(3, 4, 5, 6, 7) * 2 + 1
    x[1, 2] = 3.0  # a constant channel: variance 0, not inf
    moments = per_sample_moments(x)
    var, mean = torch.var_mean(x.flatten(2), dim=2, unbiased=False)
    assert moments.shape == (3, 4, 2)
    torch.testing.assert_close(moments[..., 0], mean.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moments[..., 1], var.double(), rtol=1e-5, atol=1e-7)
    assert moments[1, 2].tolist() == [3.0, 0.0]


def test_moments_of_every_layer_cross_in_one_copy_with_the_same_values(batchnorm_unet):
    """On a GPU the layers' statistics go to the host once per forward (joined, then split):
    the arrays are those of a copy per layer, bit for bit."""
    from napari_normcheck.core.measure.features import _to_host

    recorder = FeatureRecorder(batchnorm_unet, default_feature_layers(batchnorm_unet))
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad(), recorder.recording():
        batchnorm_unet.eval()(x)
        moments = list(recorder._batch.values())
        per_sample = recorder.take()
    assert len({m.shape[1] for m in moments}) > 1  # layers of several widths
    joined = _to_host(moments, one_copy=True)
    for got, tensor in zip(joined, moments):
        assert got.dtype == np.float64 and np.array_equal(got, tensor.numpy())
    assert len(per_sample) == 2
    for name, tensor in zip(list(per_sample[0]), moments):
        assert np.array_equal(per_sample[1][name], tensor.numpy()[1])
