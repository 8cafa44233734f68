"""Recalibrated running statistics against direct computations over the same tiles."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import normalization_mode, running_stats_layers
from napari_normcheck.core.io.intensity import resolve_intensity
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.remedies.recalibrate import RecalibrationConfig, recalibrate
from napari_normcheck.core.remedies.recalibrate_export import export_recalibrated
from napari_normcheck.core.run.forward import forward_batch
from napari_normcheck.core.run.tile_sampling import ContentMask, read_tiles, window_plan
from tests.conftest import calibrate, synthetic_volume, tiny_unet

TILE = (16, 32, 32)


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, saved):
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def layer_inputs(model, batches):
    """Per layer, the float64 inputs of every batch, seen by independent hooks in train mode."""
    reference = copy.deepcopy(model)
    layers = running_stats_layers(reference)
    seen = {name: [] for name, _ in layers}
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, inputs, name=name: seen[name].append(inputs[0].double().numpy())
        )
        for name, layer in layers
    ]
    with torch.no_grad(), normalization_mode(reference, "train"):
        for batch in batches:
            reference(torch.from_numpy(np.stack(batch)))
    for hook in hooks:
        hook.remove()
    return seen


def numpy_statistics(inputs, variance, instance=False):
    """Running mean/var as numpy computes them from the layer inputs of each batch."""
    axes = (2, 3, 4) if instance else (0, 2, 3, 4)
    means, variances = [], []
    for x in inputs:
        batch_means = x.mean(axis=axes)
        batch_vars = x.var(axis=axes, ddof=1)
        means.append(batch_means.mean(axis=0) if instance else batch_means)
        variances.append(batch_vars.mean(axis=0) if instance else batch_vars)
    mean = np.mean(means, axis=0)
    if variance == "mean":
        return mean, np.mean(variances, axis=0)
    channels = np.concatenate([np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) for x in inputs], 1)
    return channels.mean(axis=1), channels.var(axis=1, ddof=1)


def calibration_batches(volume, result, transform, batch_size):
    plan = window_plan(volume, TILE, None)
    images = read_tiles(volume, plan, result.calibration_tiles, transform)
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


@pytest.mark.parametrize("variance", ["mean", "pooled"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_running_statistics_equal_numpy_over_the_same_tiles(variance, batch_size):
    model = calibrate(tiny_unet("batch"), (1, *TILE))
    saved = state_copy(model)
    volume = open_volume(synthetic_volume((20, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    config = RecalibrationConfig(
        tile=TILE, batch_size=batch_size, n_tiles=4, holdout=1, variance=variance, seed=3
    )
    result = recalibrate(model, volume, config, transform=transform)
    assert_state_equal(model, saved)
    assert len(result.calibration_tiles) == 4 and len(result.holdout_tiles) == 1
    batches = calibration_batches(volume, result, transform, batch_size)
    inputs = layer_inputs(model, batches)
    recalibrated = dict(result.model.named_modules())
    for name, layer_inputs_ in inputs.items():
        expected_mean, expected_var = numpy_statistics(layer_inputs_, variance)
        layer = recalibrated[name]
        np.testing.assert_allclose(layer.running_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.numpy(), expected_var, rtol=1e-4, atol=1e-6)
        assert int(layer.num_batches_tracked) == len(batches)
    # The original statistics really changed (the check measures something).
    first = running_stats_layers(model)[0][0]
    assert not torch.allclose(
        recalibrated[first].running_mean, dict(model.named_modules())[first].running_mean
    )


def test_mean_estimate_equals_pytorch_cumulative_average():
    """``variance="mean"`` is what PyTorch accumulates with momentum=None over the same batches."""
    model = calibrate(tiny_unet("batch"), (1, *TILE))
    volume = open_volume(synthetic_volume((20, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    config = RecalibrationConfig(tile=TILE, batch_size=2, n_tiles=6, holdout=0)
    result = recalibrate(model, volume, config, transform=transform)
    reference = copy.deepcopy(model).eval()
    for _, layer in running_stats_layers(reference):
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    with torch.no_grad():
        for batch in calibration_batches(volume, result, transform, 2):
            reference(torch.from_numpy(np.stack(batch)))
    got = result.model.state_dict()
    for key, value in reference.state_dict().items():
        if "running" in key:
            np.testing.assert_allclose(got[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-7)
        elif "num_batches" in key:
            assert int(got[key]) == int(value) == 3


def test_instance_norm_with_running_statistics_pooled():
    norm = ("instance", {"track_running_stats": True, "affine": True})
    model = calibrate(tiny_unet(norm), (1, *TILE))
    volume = open_volume(synthetic_volume((20, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    config = RecalibrationConfig(tile=TILE, n_tiles=3, holdout=0, variance="pooled")
    result = recalibrate(model, volume, config, transform=transform)
    inputs = layer_inputs(model, calibration_batches(volume, result, transform, 1))
    modules = dict(result.model.named_modules())
    for name, values in inputs.items():
        mean, var = numpy_statistics(values, "pooled", instance=True)
        np.testing.assert_allclose(modules[name].running_mean.numpy(), mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(modules[name].running_var.numpy(), var, rtol=1e-4, atol=1e-6)


def test_scripted_model_gives_the_same_mean_estimate():
    model = calibrate(tiny_unet("batch"), (1, *TILE))
    volume = open_volume(synthetic_volume((20, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    config = RecalibrationConfig(tile=TILE, batch_size=2, n_tiles=4, holdout=0)
    eager = recalibrate(model, volume, config, transform=transform)
    scripted_model = torch.jit.script(copy.deepcopy(model))
    saved = state_copy(scripted_model)
    scripted = recalibrate(scripted_model, volume, config, transform=transform)
    assert isinstance(scripted.model, torch.jit.ScriptModule)
    assert_state_equal(scripted_model, saved)
    got = scripted.model.state_dict()
    for key, value in eager.model.state_dict().items():
        np.testing.assert_allclose(
            got[key].double().numpy(), value.double().numpy(), rtol=1e-5, atol=1e-6
        )


def test_tiles_are_deterministic_spread_and_respect_the_mask():
    raw = synthetic_volume((24, 64, 64))
    raw[:, :, :32] = -10.0  # an empty half: below the mask
    volume = open_volume(raw)
    transform = resolve_intensity("none", volume.data)
    model = calibrate(tiny_unet("batch"), (1, *TILE))
    config = RecalibrationConfig(tile=TILE, n_tiles=6, holdout=2, mask_below=-5.0, seed=1)
    first = recalibrate(model, volume, config, transform=transform)
    again = recalibrate(model, volume, config, transform=transform)
    starts = [t.window_start for t in first.calibration_tiles + first.holdout_tiles]
    assert starts == [t.window_start for t in again.calibration_tiles + again.holdout_tiles]
    assert len(set(starts)) == 8
    mask = ContentMask(below=-5.0)
    for z, y, x in starts:
        assert 0 <= z <= 24 - 16 and 0 <= y <= 64 - 32 and 0 <= x <= 64 - 32
        window = raw[None, z : z + 16, y : y + 32, x : x + 32]
        assert mask.fraction(window, window.size) >= 0.5
    other = recalibrate(model, volume, dataclasses.replace(config, seed=2), transform=transform)
    assert [t.window_start for t in other.calibration_tiles] != starts[:6]
    with pytest.raises(NormcheckError, match="mask"):
        recalibrate(model, volume, dataclasses.replace(config, mask_below=1e9), transform=transform)


def test_holdout_disparity_matches_direct_forwards():
    model = calibrate(tiny_unet("batch"), (1, *TILE))
    volume = open_volume(synthetic_volume((20, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    config = RecalibrationConfig(tile=TILE, n_tiles=4, holdout=2, activation="sigmoid")
    result = recalibrate(model, volume, config, transform=transform)
    images = read_tiles(volume, window_plan(volume, TILE, None), result.holdout_tiles, transform)
    device = torch.device("cpu")
    train = torch.sigmoid(torch.from_numpy(forward_batch(model, images[:1], "train", 3, device)))
    train2 = torch.sigmoid(torch.from_numpy(forward_batch(model, images[1:], "train", 3, device)))
    after = torch.sigmoid(torch.from_numpy(forward_batch(result.model, images, "eval", 3, device)))
    p_train = torch.cat([train, train2]).numpy() > 0.5
    p_after = after.numpy() > 0.5
    for c in range(2):
        a, b = p_train[:, c], p_after[:, c]
        dice = 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)
        assert result.holdout["after"]["hard"][c] == pytest.approx(1 - dice, abs=1e-12)


def test_export_reloads_and_never_overwrites(tmp_path):
    model = calibrate(tiny_unet("batch"), (1, *TILE))
    input_file = tmp_path / "input.pt"
    torch.save(model.state_dict(), input_file)
    input_bytes = input_file.read_bytes()
    volume = open_volume(synthetic_volume((20, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    config = RecalibrationConfig(tile=TILE, n_tiles=3, holdout=1)
    result = recalibrate(model, volume, config, transform=transform)
    with pytest.raises(NormcheckError, match="input model"):
        export_recalibrated(result, input_file, input_path=input_file)
    with pytest.raises(NormcheckError, match="never overwritten"):
        export_recalibrated(result, input_file)
    assert input_file.read_bytes() == input_bytes
    paths = export_recalibrated(result, tmp_path / "recal.pt")
    reloaded = tiny_unet("batch")
    reloaded.load_state_dict(torch.load(paths["state_dict"], weights_only=True))
    images = read_tiles(volume, window_plan(volume, TILE, None), result.holdout_tiles, transform)
    device = torch.device("cpu")
    np.testing.assert_array_equal(
        forward_batch(reloaded, images, "eval", 3, device),
        forward_batch(result.model, images, "eval", 3, device),
    )
    import json

    provenance = json.loads(paths["provenance"].read_text())
    assert provenance["tiles"] == [list(t.window_start) for t in result.calibration_tiles]
    assert provenance["variance"] == "mean" and provenance["volume"] == volume.source
    with pytest.raises(NormcheckError, match="never overwritten"):
        export_recalibrated(result, tmp_path / "recal.pt")


def test_export_scripted_model_also_writes_torchscript(tmp_path):
    model = torch.jit.script(calibrate(tiny_unet("batch"), (1, *TILE)))
    volume = open_volume(synthetic_volume((20, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    result = recalibrate(
        model, volume, RecalibrationConfig(tile=TILE, n_tiles=2, holdout=1), transform=transform
    )
    paths = export_recalibrated(result, tmp_path / "recal.pt")
    extra = {"normcheck_recalibration.json": ""}
    loaded = torch.jit.load(str(paths["torchscript"]), _extra_files=extra)
    assert b"recalibrated" in extra["normcheck_recalibration.json"]
    images = read_tiles(volume, window_plan(volume, TILE, None), result.holdout_tiles, transform)
    device = torch.device("cpu")
    np.testing.assert_array_equal(
        forward_batch(loaded, images, "eval", 3, device),
        forward_batch(result.model, images, "eval", 3, device),
    )


def test_model_without_running_statistics_is_refused():
    model = tiny_unet(("group", {"num_groups": 2}))
    volume = open_volume(synthetic_volume((20, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    with pytest.raises(NormcheckError, match="nothing to recalibrate"):
        recalibrate(model, volume, RecalibrationConfig(tile=TILE, n_tiles=2), transform=transform)


def test_padding_counts_as_empty():
    """A region thinner than the tile leaves padded windows: kept at half content, skipped above."""
    model = calibrate(tiny_unet("batch"), (1, *TILE))
    volume = open_volume(synthetic_volume((8, 40, 44)))
    transform = resolve_intensity("none", volume.data)
    config = RecalibrationConfig(tile=TILE, n_tiles=2, holdout=0, min_content=0.5)
    result = recalibrate(model, volume, config, transform=transform)
    assert all(t.window_start[0] == -4 for t in result.calibration_tiles)  # centred, as MONAI pads
    with pytest.raises(NormcheckError, match="content mask"):
        recalibrate(
            model, volume, dataclasses.replace(config, min_content=0.6), transform=transform
        )
