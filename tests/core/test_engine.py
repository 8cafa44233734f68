"""The engine against independent computations: MONAI's sliding window, direct forwards, numpy."""

from __future__ import annotations

import copy
import os
import threading

import numpy as np
import pytest
import torch
import zarr
from monai.inferers import sliding_window_inference

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import has_running_stats
from napari_normcheck.core.io.intensity import resolve_intensity
from napari_normcheck.core.io.store import is_complete
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished, TileDone
from tests.conftest import calibrate, synthetic_volume, tiny_unet


def run_engine(array, model, out, spatial_dims=3, **config):
    volume = open_volume(array)
    events = list(run_check(volume, model, RunConfig(**config), out, spatial_dims=spatial_dims))
    assert isinstance(events[-1], RunFinished)
    root = zarr.open_group(str(out), mode="r")
    return root["pred_eval/0"][:], root["pred_train/0"][:]


def monai_reference(image, model, tile, overlap, mode, eval_batch, train_batch):
    x = torch.from_numpy(image)[None]
    eval_model = copy.deepcopy(model).eval()
    train_model = copy.deepcopy(model).eval()
    for m in train_model.modules():
        if has_running_stats(m):
            m.train()
            m.momentum = 0.0
    with torch.no_grad():
        expected_eval = sliding_window_inference(x, tile, eval_batch, eval_model, overlap, mode)
        expected_train = sliding_window_inference(x, tile, train_batch, train_model, overlap, mode)
    return expected_eval[0].numpy(), expected_train[0].numpy()


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, saved):
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


NORMS = {
    "batch": "batch",
    "instance_running": ("instance", {"track_running_stats": True, "affine": True}),
}


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_parity_with_monai_on_synthetic_volume(tmp_path, norm, mode):
    model = calibrate(tiny_unet(NORMS[norm]), (1, 16, 32, 32))
    saved = state_copy(model)
    volume = synthetic_volume((20, 40, 44))
    tile, overlap = (16, 32, 32), 0.25
    got_eval, got_train = run_engine(
        volume, model, tmp_path / "out.zarr", tile=tile, overlap=overlap, blend=mode, eval_batch=2
    )
    exp_eval, exp_train = monai_reference(volume[None], model, tile, overlap, mode, 2, 1)
    np.testing.assert_allclose(got_eval, exp_eval, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_train, exp_train, atol=1e-5, rtol=0)
    assert np.abs(got_eval - got_train).max() > 1e-3  # the check measures something real
    assert_state_equal(model, saved)
    assert is_complete(tmp_path / "out.zarr")


def test_parity_with_monai_on_real_em_crop(tmp_path, isbi_crop):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), norm="batch")
    model = calibrate(model, (1, 16, 32, 32))
    transform = resolve_intensity("minmax:0,255", open_volume(isbi_crop).data)
    image = transform.apply(isbi_crop[None])
    got_eval, got_train = run_engine(
        isbi_crop,
        model,
        tmp_path / "o.zarr",
        tile=(16, 32, 32),
        overlap=0.5,
        blend="gaussian",
        normalize="minmax:0,255",
        train_batch=2,
        eval_batch=3,
    )
    exp_eval, exp_train = monai_reference(image, model, (16, 32, 32), 0.5, "gaussian", 3, 2)
    np.testing.assert_allclose(got_eval, exp_eval, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_train, exp_train, atol=1e-5, rtol=0)


def test_volume_smaller_than_tile_is_padded_as_monai(tmp_path, batchnorm_unet):
    volume = synthetic_volume((9, 20, 40))
    got_eval, got_train = run_engine(
        volume, batchnorm_unet, tmp_path / "o.zarr", tile=(16, 32, 32), blend="gaussian"
    )
    exp_eval, exp_train = monai_reference(
        volume[None], batchnorm_unet, (16, 32, 32), 0.25, "gaussian", 1, 1
    )
    assert got_eval.shape == (2, 9, 20, 40)
    np.testing.assert_allclose(got_eval, exp_eval, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_train, exp_train, atol=1e-5, rtol=0)


def test_2d_model_on_3d_volume_runs_plane_by_plane(tmp_path):
    model = calibrate(tiny_unet("batch", spatial_dims=2), (1, 32, 32))
    volume = synthetic_volume((3, 40, 50))
    got_eval, got_train = run_engine(
        volume, model, tmp_path / "o.zarr", spatial_dims=2, tile=(1, 32, 32), blend="gaussian"
    )
    for z in range(volume.shape[0]):
        exp_eval, exp_train = monai_reference(
            volume[None, z], model, (32, 32), 0.25, "gaussian", 1, 1
        )
        np.testing.assert_allclose(got_eval[:, z], exp_eval, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_train[:, z], exp_train, atol=1e-5, rtol=0)


def test_crop_mode_writes_inner_blocks_of_halo_windows(tmp_path, batchnorm_unet):
    volume = synthetic_volume((12, 40, 36))
    halo = (2, 8, 8)
    got_eval, got_train = run_engine(
        volume, batchnorm_unet, tmp_path / "o.zarr", tile=(12, 16, 16), halo=halo, blend="crop"
    )
    # Independent computation: reflect-pad the whole volume, run each window, keep the inner block.
    padded = np.pad(volume, [(h, 40) for h in halo], mode="reflect")
    model = batchnorm_unet
    for z0 in range(0, 12, 12):
        for y0 in range(0, 40, 16):
            for x0 in range(0, 36, 16):
                window = padded[z0 : z0 + 16, y0 : y0 + 32, x0 : x0 + 32]
                x = torch.from_numpy(np.ascontiguousarray(window))[None, None]
                with torch.no_grad():
                    expected = model.eval()(x)[0].numpy()
                inner = expected[:, 2:14, 8:24, 8:24]
                block = got_eval[:, z0 : z0 + 12, y0 : y0 + 16, x0 : x0 + 16]
                np.testing.assert_array_equal(
                    block, inner[:, : block.shape[1], : block.shape[2], : block.shape[3]]
                )


class ChannelLayerNormNet(torch.nn.Module):
    """Conv -> LayerNorm over channels (channels-last) -> conv; or no norm at all."""

    def __init__(self, norm: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 6, 3, padding=1)
        self.norm = torch.nn.LayerNorm(6) if norm else None
        self.head = torch.nn.Conv3d(6, 2, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x.movedim(1, -1)).movedim(-1, 1)
        return self.head(torch.relu(x))


@pytest.mark.parametrize("kind", ["group", "layer", "none"])
def test_models_without_running_stats_agree_between_modes(tmp_path, kind):
    model = (
        tiny_unet(("group", {"num_groups": 2}))
        if kind == "group"
        else ChannelLayerNormNet(kind == "layer")
    )
    volume = synthetic_volume((16, 40, 40))
    e, t = run_engine(
        volume, model, tmp_path / "a.zarr", tile=(16, 32, 32), eval_batch=1, activation="sigmoid"
    )
    np.testing.assert_array_equal(e, t)
    e, t = run_engine(
        volume, model, tmp_path / "b.zarr", tile=(16, 32, 32), eval_batch=3, activation="sigmoid"
    )
    np.testing.assert_allclose(e, t, atol=1e-6, rtol=0)


def test_cancel_leaves_valid_incomplete_store_and_model_unchanged(tmp_path, batchnorm_unet):
    saved = state_copy(batchnorm_unet)
    cancel = threading.Event()
    out = tmp_path / "o.zarr"
    events = run_check(
        open_volume(synthetic_volume((20, 40, 44))),
        batchnorm_unet,
        RunConfig(tile=(16, 32, 32)),
        out,
        cancel=cancel,
    )
    seen = []
    for event in events:
        seen.append(event)
        if isinstance(event, TileDone):
            cancel.set()
    assert not any(isinstance(e, RunFinished) for e in seen)
    assert not is_complete(out)
    assert zarr.open_group(str(out), mode="r")["pred_eval/0"].shape == (2, 20, 40, 44)
    assert_state_equal(batchnorm_unet, saved)
    assert not any(m.training for m in batchnorm_unet.modules())


def test_failure_mid_run_restores_model(tmp_path, batchnorm_unet):
    saved = state_copy(batchnorm_unet)
    volume = synthetic_volume((20, 40, 44))
    volume[15, 30, 40] = np.nan
    with pytest.raises(NormcheckError, match="NaN or Inf"):
        list(
            run_check(
                open_volume(volume),
                batchnorm_unet,
                RunConfig(tile=(16, 32, 32)),
                tmp_path / "o.zarr",
            )
        )
    assert_state_equal(batchnorm_unet, saved)


def test_existing_output_is_refused_and_kept(tmp_path, batchnorm_unet):
    out = tmp_path / "o.zarr"
    volume = synthetic_volume((16, 32, 32))
    first, _ = run_engine(volume, batchnorm_unet, out, tile=(16, 32, 32))
    with pytest.raises(NormcheckError, match="already exists"):
        run_engine(volume, batchnorm_unet, out, tile=(16, 32, 32))
    # A failing overwrite does not destroy the earlier complete output.
    bad = volume.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(NormcheckError):
        list(
            run_check(
                open_volume(bad), batchnorm_unet, RunConfig(tile=(16, 32, 32)), out, overwrite=True
            )
        )
    assert is_complete(out)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["pred_eval/0"][:], first)


def test_output_dtypes(tmp_path, batchnorm_unet):
    volume = open_volume(synthetic_volume((16, 32, 32)))

    def run(name, **config):
        config = RunConfig(tile=(16, 32, 32), **config)
        events = list(run_check(volume, batchnorm_unet, config, tmp_path / name))
        return zarr.open_group(str(tmp_path / name), mode="r"), events[-1].summary

    f32, f32_summary = run("a.zarr", activation="sigmoid", output_dtype="float32")
    # The default after an activation: probabilities x 255 as uint8; metrics before rounding.
    u8, u8_summary = run("b.zarr", activation="sigmoid")
    assert u8["pred_eval/0"].dtype == np.uint8
    np.testing.assert_array_equal(
        u8["pred_eval/0"][:], np.round(f32["pred_eval/0"][:] * 255).astype(np.uint8)
    )
    assert u8_summary["disparity"] == f32_summary["disparity"]
    # eval, train and disparity: 3 bytes per input voxel per output channel (4x that in float32).
    assert u8_summary["out_bytes_per_voxel_channel"] == 3.0
    assert f32_summary["out_bytes_per_voxel_channel"] == 12.0
    logits, _ = run("c.zarr")
    assert logits["pred_eval/0"].dtype == np.float32  # logits stay float
    with pytest.raises(NormcheckError, match="logits need"):
        RunConfig(output_dtype="uint8")


def test_spilling_to_disk_gives_identical_output(tmp_path, batchnorm_unet):
    volume = synthetic_volume((20, 70, 70))
    a, _ = run_engine(volume, batchnorm_unet, tmp_path / "a.zarr", tile=(16, 32, 32))
    b, _ = run_engine(volume, batchnorm_unet, tmp_path / "b.zarr", tile=(16, 32, 32), cache_mb=0)
    np.testing.assert_array_equal(a, b)


def test_output_metadata_overlays_input(tmp_path, batchnorm_unet):
    out = tmp_path / "o.zarr"
    run_engine(
        synthetic_volume((20, 40, 44)),
        batchnorm_unet,
        out,
        tile=(16, 32, 32),
        roi=((2, 18), (4, 40), (0, 44)),
    )
    group = zarr.open_group(str(out / "pred_eval"), mode="r")
    transforms = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms[1]["translation"] == [0.0, 2.0, 4.0, 0.0]
    assert group["0"].shape == (2, 16, 36, 44)
    params = zarr.open_group(str(out), mode="r").attrs["normcheck"]["params"]
    assert params["train_batch"] == 1


class Shrinking(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3)  # no padding: the output is smaller than the input

    def forward(self, x):
        return self.conv(x)


class TupleOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return {"logits": self.conv(x), "aux": 0}


def test_model_output_shape_must_match_input(tmp_path):
    with pytest.raises(NormcheckError, match="spatial shape"):
        list(
            run_check(
                open_volume(synthetic_volume((8, 16, 16))),
                Shrinking(),
                RunConfig(tile=(8, 16, 16)),
                tmp_path / "o.zarr",
            )
        )


def test_dict_output_uses_first_tensor_and_says_so(tmp_path):
    import napari_normcheck.core.run.forward as forward

    forward._warned_tuple_output = False
    with pytest.warns(UserWarning, match="first tensor"):
        e, t = run_engine(
            synthetic_volume((8, 16, 16)), TupleOutput(), tmp_path / "o.zarr", tile=(8, 16, 16)
        )
    assert e.shape == (2, 8, 16, 16)


def test_unwritable_output_folder(tmp_path, batchnorm_unet):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(NormcheckError, match="not writable"):
            list(
                run_check(
                    open_volume(synthetic_volume((16, 32, 32))),
                    batchnorm_unet,
                    RunConfig(tile=(16, 32, 32)),
                    locked / "o.zarr",
                )
            )
    finally:
        locked.chmod(0o700)


def test_output_folder_missing(tmp_path, batchnorm_unet):
    with pytest.raises(NormcheckError, match="does not exist"):
        list(
            run_check(
                open_volume(synthetic_volume((16, 32, 32))),
                batchnorm_unet,
                RunConfig(tile=(16, 32, 32)),
                tmp_path / "nowhere" / "o.zarr",
            )
        )
