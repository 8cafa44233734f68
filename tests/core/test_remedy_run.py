"""The remedies pass against independent computations: MONAI's sliding window, numpy, the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from monai.inferers import sliding_window_inference

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.remedies.remedy_run import (
    RemediesFinished,
    RemediesStarted,
    RemedyTileDone,
    run_remedies,
)
from napari_normcheck.core.remedies.table import ROWS
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished
from napari_normcheck.data import SAMPLE_MODELS, make_synthetic_em

SHAPE = (48, 96, 112)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The packaged BatchNorm sample model checked on a crop of the synthetic EM sample."""
    out = tmp_path_factory.mktemp("remedies") / "bn.zarr"
    raw, truth = make_synthetic_em(SHAPE, seed=3)
    sample = SAMPLE_MODELS["batchnorm"]
    model = sample.load()
    config = RunConfig(
        tile=sample.tile,
        overlap=0.25,
        normalize=sample.normalize,
        activation=sample.activation,
        output_dtype="float32",  # the stored predictions are checked against MONAI below
        device="cpu",
    )
    events = list(run_check(open_volume(raw), model, config, out))
    assert isinstance(events[-1], RunFinished)
    labels = (truth[0] + 2 * truth[1] * (truth[0] == 0)).astype(np.uint8)
    return out, raw, labels, model


def test_remedies_on_the_packaged_batchnorm_sample(sample_run):
    out, raw, labels, model = sample_run
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    volume = open_volume(raw)
    events = list(
        run_remedies(
            out,
            volume,
            model,
            labels=labels,
            label_map='{"1": 0, "2": 1}',
            recalibration={"n_tiles": 6, "holdout": 2},
        )
    )
    assert isinstance(events[-1], RemediesFinished)
    started = next(e for e in events if isinstance(e, RemediesStarted))
    assert sum(isinstance(e, RemedyTileDone) for e in events) == started.n_tiles
    result = events[-1].remedies
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["normcheck"]["remedies"] == result
    assert set(ROWS) <= set(result)
    p_eval, p_train = root["pred_eval/0"][...], root["pred_train/0"][...]
    p_recal, p_stats = root["pred_recalibrated/0"][...], root["pred_batchstats/0"][...]
    ome = {
        name: root[name].attrs["ome"]["multiscales"][0] for name in ("pred_eval", "pred_batchstats")
    }
    assert ome["pred_batchstats"]["datasets"] == ome["pred_eval"]["datasets"]
    assert ome["pred_batchstats"]["axes"] == ome["pred_eval"]["axes"]
    assert p_recal.shape == p_eval.shape and p_recal.dtype == p_eval.dtype

    # Batch statistics per tile = train mode at train batch 1: zero disparity, mismatch remains.
    np.testing.assert_allclose(p_stats, p_train, atol=1e-5)
    assert result["batchstats"]["disparity_vs_train"]["hard"] == [0.0, 0.0]
    assert max(result["batchstats"]["mismatch"]["hard"]) > 0.01
    np.testing.assert_allclose(
        result["batchstats"]["mismatch"]["hard"], result["train"]["mismatch"]["hard"], atol=1e-4
    )

    # The recalibrated prediction is MONAI's sliding window with the recalibrated model.
    recalibrated = events[-1].recalibration.model
    image = torch.from_numpy(raw[None, None].astype(np.float32) / 255.0)
    with torch.no_grad():
        expected = torch.sigmoid(
            sliding_window_inference(image, (48, 64, 64), 1, recalibrated, 0.25, "gaussian")
        )[0].numpy()
    np.testing.assert_allclose(p_recal, expected, atol=1e-5)

    # Disparity vs train and Dice vs labels recomputed with numpy from the stored arrays.
    for row, prediction in (("recalibrated", p_recal), ("batchstats", p_stats), ("eval", p_eval)):
        a, b = p_train > 0.5, prediction > 0.5
        for c in range(2):
            total = a[c].sum() + b[c].sum()
            dice = 1.0 if total == 0 else 2 * (a[c] & b[c]).sum() / total
            assert result[row]["disparity_vs_train"]["hard"][c] == pytest.approx(1 - dice, abs=1e-9)
    for row, prediction in zip(ROWS, (p_eval, p_train, p_recal, p_stats)):
        for c, value in enumerate((1, 2)):
            truth, predicted = labels == value, prediction[c] > 0.5
            dice = 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum())
            assert result[row]["dice_vs_labels"]["hard"][c] == pytest.approx(dice, abs=1e-9)
    assert any("batch-stats eval" in note for note in result["notes"])
    holdout = result["recalibration"]["holdout"]
    assert holdout["n_tiles"] == 2 and len(holdout["before"]["hard"]) == 2


def test_labels_only_and_input_errors(sample_run, tmp_path):
    out, raw, labels, model = sample_run
    volume = open_volume(raw)
    events = list(run_remedies(out, volume, model, remedies=(), labels=labels, label_map={1: 0}))
    result = events[-1].remedies
    assert result["eval"]["dice_vs_labels"]["channels"] == [0]
    with pytest.raises(NormcheckError, match="label-map"):
        list(run_remedies(out, volume, model, remedies=(), labels=labels))
    with pytest.raises(NormcheckError, match="shape"):
        list(run_remedies(out, open_volume(raw[:, :64]), model))
    with pytest.raises(NormcheckError, match="finished"):
        list(run_remedies(tmp_path / "nothing.zarr", volume, model))


def test_crop_mode_2d_model_and_uint8_outputs(tmp_path):
    """Other stitching and storage: batch statistics still equal the stored train pass."""
    from tests.conftest import calibrate, synthetic_volume, tiny_unet

    model = calibrate(tiny_unet("batch", spatial_dims=2), (1, 32, 32))
    volume = open_volume(synthetic_volume((3, 40, 50)))
    config = RunConfig(
        tile=(1, 32, 32),
        blend="crop",
        halo=(0, 8, 8),
        activation="sigmoid",
        output_dtype="uint8",
        device="cpu",
        spatial_dims=2,
    )
    out = tmp_path / "crop.zarr"
    list(run_check(volume, model, config, out, spatial_dims=2))
    events = list(run_remedies(out, volume, model, recalibration={"n_tiles": 3, "holdout": 1}))
    result = events[-1].remedies
    root = zarr.open_group(str(out), mode="r")
    assert root["pred_batchstats/0"].dtype == np.uint8
    stats, train = (root[f"{n}/0"][...].astype(int) for n in ("pred_batchstats", "pred_train"))
    assert np.abs(stats - train).max() <= 1  # x255 rounding of values equal to 1e-5
    assert result["batchstats"]["disparity_vs_train"]["hard"] == [0.0, 0.0]
    assert result["recalibration"]["batch_size"] == 1


def test_a_model_without_running_statistics_needs_no_remedy(tmp_path):
    from tests.conftest import synthetic_volume, tiny_unet

    model = tiny_unet(("group", {"num_groups": 2}))
    volume = open_volume(synthetic_volume((16, 32, 40)))
    out = tmp_path / "gn.zarr"
    list(run_check(volume, model, RunConfig(tile=(16, 32, 32), device="cpu"), out))
    result = list(run_remedies(out, volume, model))[-1].remedies
    assert "recalibrated" not in result and "batchstats" not in result
    assert "nothing to remedy" in result["notes"][0]
    assert "pred_recalibrated" not in zarr.open_group(str(out), mode="r")
