"""The shifted-grid check (``--grid-shift``) against MONAI's sliding window on the cropped region."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import zarr
from monai.inferers import sliding_window_inference

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import has_running_stats
from napari_normcheck.core.base.tiling import plan_tiles
from napari_normcheck.core.io.store import read_progress
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished, TileDone
from napari_normcheck.core.run.grid_shift import shift_offset
from tests.conftest import calibrate, synthetic_volume, tiny_unet

TILE, OVERLAP = (16, 32, 32), 0.25


def monai_predictions(image, model, tile, overlap, mode="gaussian"):
    """Eval and norm-train predictions of MONAI's sliding window, sigmoid applied."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    eval_model = copy.deepcopy(model).eval()
    train_model = copy.deepcopy(model).eval()
    for m in train_model.modules():
        if has_running_stats(m):
            m.train()
            m.momentum = 0.0
    with torch.no_grad():
        out = {
            name: torch.sigmoid(sliding_window_inference(x, tile, 1, net, overlap, mode))[0].numpy()
            for name, net in (("eval", eval_model), ("train", train_model))
        }
    return out


def one_minus_dice(p, q, threshold=0.5):
    """Per channel: hard and soft ``1 - Dice``, computed directly."""
    hard, soft = [], []
    for c in range(p.shape[0]):
        a, b = p[c] > threshold, q[c] > threshold
        union = a.sum() + b.sum()  # both empty: agreement, as the metrics count it
        hard.append(1 - 2 * np.logical_and(a, b).sum() / union if union else 0.0)
        soft.append(
            1 - 2 * np.minimum(p[c], q[c]).astype(np.float64).sum() / (p[c].sum() + q[c].sum())
        )
    return hard, soft


def run(volume_array, model, out, **options):
    volume = open_volume(volume_array[None])
    config = RunConfig(
        tile=TILE,
        overlap=OVERLAP,
        activation="sigmoid",
        output_dtype="float32",
        device="cpu",
        **options,
    )
    events = list(run_check(volume, model, config, out, spatial_dims=3))
    assert isinstance(events[-1], RunFinished)
    return events


def test_offset_follows_monai_step_and_skips_single_tile_axes():
    plan = plan_tiles((20, 80, 40), (16, 32, 40), overlap=0.25)
    # y: step int(32 * 0.75) = 24 -> 12; x is one tile -> 0; z: two tiles, step 12 -> 6.
    assert shift_offset(plan, 0.5) == (6, 12, 0)
    assert shift_offset(plan, 0.25) == (3, 6, 0)
    crop = plan_tiles((20, 80, 40), (16, 32, 32), blend="crop", halo=(0, 8, 8))
    assert shift_offset(crop, 0.5) == (8, 16, 16)  # crop mode: the step is the tile
    flat = plan_tiles((5, 80, 80), (1, 32, 32), overlap=0.25)
    assert shift_offset(flat, 0.9)[0] == 0  # a 2D model's planes are not tiled against each other


def test_config_grid_shift_range_and_old_configs():
    assert RunConfig.from_dict({"tile": [16, 32, 32]}).grid_shift == 0.0
    assert RunConfig.from_options({"grid_shift": "0.5"}).grid_shift == 0.5
    with pytest.raises(NormcheckError, match="grid shift"):
        RunConfig(grid_shift=1.0)


def assert_equals_monai(image, model, out, summary):
    """The run's predictions, shifted predictions, indicator and maps are MONAI's on the crop."""
    root = zarr.open_group(str(out), mode="r")
    sz, sy, sx = summary["grid_shift_offset"]
    main = monai_predictions(image, model, TILE, OVERLAP)
    shifted = monai_predictions(image[sz:, sy:, sx:], model, TILE, OVERLAP)
    for name in ("eval", "train"):
        np.testing.assert_allclose(root[f"shifted_pred_{name}/0"][:], shifted[name], atol=1e-5)
        np.testing.assert_allclose(root[f"pred_{name}/0"][:], main[name], atol=1e-5)
        hard, soft = one_minus_dice(main[name][:, sz:, sy:, sx:], shifted[name])
        np.testing.assert_allclose(summary["grid_shift"][name]["hard"], hard, atol=2e-3)
        np.testing.assert_allclose(summary["grid_shift"][name]["soft"], soft, atol=1e-5)
        diff = root[f"shift_diff_{name}/0"][:]
        expected = np.zeros_like(diff)
        expected[:, sz:, sy:, sx:] = np.abs(main[name][:, sz:, sy:, sx:] - shifted[name])
        np.testing.assert_allclose(diff, expected, atol=1e-5)
        grid = root[f"tile_grid_shift_{name}/0"][:]
        assert np.isfinite(grid).any()


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_on_real_em_the_indicator_is_what_monai_gives_by_hand(tmp_path, norm, isbi_crop):
    """The issue's definition on real ssTEM: two MONAI calls, the second on the cropped region."""
    network = tiny_unet(("group", {"num_groups": 2}) if norm == "group" else "batch")
    model = calibrate(network, (1, 16, 32, 32))
    image = isbi_crop.astype(np.float32) / 255.0
    out = tmp_path / "out.zarr"
    summary = run(image, model, out, grid_shift=0.5)[-1].summary
    assert_equals_monai(image, model, out, summary)
    assert summary["grid_shift"]["eval"]["soft"][0] > 0  # real data: the grid moves the result


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_shifted_prediction_and_indicator_equal_monai(tmp_path, norm):
    network = tiny_unet(("group", {"num_groups": 2}) if norm == "group" else "batch")
    model = calibrate(network, (1, 16, 32, 32))
    image = synthetic_volume((20, 48, 56))
    out = tmp_path / "out.zarr"
    events = run(image, model, out, grid_shift=0.5)
    summary = events[-1].summary
    offset = summary["grid_shift_offset"]
    assert offset == [6, 12, 12]
    # Progress counts both grids' tiles, the shifted grid first.
    done = [e for e in events if isinstance(e, TileDone)]
    assert [e.n_done for e in done] == list(range(1, len(done) + 1))
    assert done[-1].n_total == len(done)

    assert_equals_monai(image, model, out, summary)
    # Train-mode BatchNorm normalizes each tile by itself: moving the grid changes its result more
    # than the eval-mode one's; GroupNorm does so in both modes.
    result = {name: summary["grid_shift"][name]["soft"][0] for name in ("eval", "train")}
    if norm == "batch":
        assert result["train"] > 2 * result["eval"]
    else:
        assert result["eval"] > 1e-3
    tiles = summary["tiles"]
    assert all(len(t["grid_shift_eval"]) == 2 for t in tiles if "grid_shift_eval" in t)


def test_plain_run_has_no_grid_shift_outputs(tmp_path):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    out = tmp_path / "out.zarr"
    events = run(synthetic_volume((16, 32, 40)), model, out)
    summary = events[-1].summary
    assert "grid_shift" not in summary
    root = zarr.open_group(str(out), mode="r")
    assert not any(k.startswith(("shift", "tile_grid_shift")) for k in root.group_keys())
    assert all("grid_shift_eval" not in t for t in summary["tiles"])


SHIFT_OUTPUTS = (
    "pred_eval",
    "pred_train",
    "shifted_pred_eval",
    "shifted_pred_train",
    "shift_diff_eval",
    "shift_diff_train",
    "tile_grid_shift_eval",
)


def shift_outputs(out):
    root = zarr.open_group(str(out), mode="r")
    arrays = {}
    for name in SHIFT_OUTPUTS:
        for dataset in root[name].attrs["ome"]["multiscales"][0]["datasets"]:
            arrays[f"{name}/{dataset['path']}"] = root[f"{name}/{dataset['path']}"][:]
    return arrays


@pytest.mark.parametrize("stop_after", [3, 9])  # in the shifted grid, in the main grid
def test_cancel_then_resume_equals_uninterrupted(tmp_path, batchnorm_unet, stop_after):
    import threading

    volume = open_volume(synthetic_volume((16, 72, 56))[None])
    config = RunConfig(
        tile=TILE,
        overlap=OVERLAP,
        activation="sigmoid",
        cache_mb=0,
        pyramid_side=16,
        grid_shift=0.5,
    )
    events = list(run_check(volume, batchnorm_unet, config, tmp_path / "ref.zarr"))
    reference = events[-1].summary
    n_shifted = sum(1 for e in events if isinstance(e, TileDone)) - reference["n_tiles"]
    assert (stop_after <= n_shifted) == (stop_after == 3)

    out = tmp_path / "o.zarr"
    cancel = threading.Event()
    for event in run_check(volume, batchnorm_unet, config, out, cancel=cancel):
        if isinstance(event, TileDone) and event.n_done == stop_after:
            cancel.set()
    progress = read_progress(out)
    assert progress["grid_shift_done"]  # the shifted grid's finished chunks are listed
    resumed = list(run_check(volume, batchnorm_unet, config, out, resume=True))[-1].summary
    expected, got = shift_outputs(tmp_path / "ref.zarr"), shift_outputs(out)
    assert got.keys() == expected.keys() and "shift_diff_eval/1" in got
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    for name in ("eval", "train"):
        for kind in ("hard", "soft"):
            np.testing.assert_allclose(
                resumed["grid_shift"][name][kind], reference["grid_shift"][name][kind], atol=1e-12
            )
    np.testing.assert_allclose(
        [t["grid_shift_eval"] for t in resumed["tiles"]],
        [t["grid_shift_eval"] for t in reference["tiles"]],
        atol=1e-12,
    )
