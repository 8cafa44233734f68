"""``run --remedies``: the remedies as predictions of the check's own tile loop.

Against the check without remedies (its numbers do not move), against the remedies pass on a
finished check (same predictions), and across an interruption (resume gives the same result).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.store import is_complete
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.models.models import load_model
from napari_normcheck.core.remedies.check_remedies import check_with_remedies
from napari_normcheck.core.remedies.remedy_run import RemediesFinished, run_remedies
from napari_normcheck.core.remedies.variants import REMEDIES
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished, TileDone
from tests.conftest import TINY_UNET_ARCH, calibrate, synthetic_volume, tiny_unet, tiny_unet_kwargs

SHAPE = (40, 48, 52)  # a 3 x 2 x 2 grid of tiles
CONFIG = RunConfig(
    tile=(16, 32, 32),
    overlap=0.25,
    activation="sigmoid",
    output_dtype="float32",
    seams=True,
    cache_mb=0,
    device="cpu",
)
RECALIBRATION = {"n_tiles": 3, "holdout": 1}
PREDICTIONS = ("pred_eval", "pred_train", "pred_recalibrated", "pred_batchstats", "disparity")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.save(calibrate(tiny_unet("batch"), (1, 16, 32, 32)).state_dict(), folder / "m.pt")
    return load_model(folder / "m.pt", arch=TINY_UNET_ARCH, arch_kwargs=tiny_unet_kwargs("batch"))


@pytest.fixture(scope="module")
def volume():
    return open_volume(synthetic_volume(SHAPE))


@pytest.fixture(scope="module")
def with_remedies(tmp_path_factory, loaded, volume):
    out = tmp_path_factory.mktemp("remedies") / "with.zarr"
    events = list(
        check_with_remedies(
            volume, loaded, CONFIG, out, remedies=REMEDIES, recalibration=RECALIBRATION
        )
    )
    return out, events


def arrays_of(out, names=PREDICTIONS):
    root = zarr.open_group(str(out), mode="r")
    return {name: root[f"{name}/0"][...] for name in names if name in root}


def table(events):
    """The remedies table without what differs between runs: seconds and recalibration date."""
    result = dict(next(e for e in events if isinstance(e, RemediesFinished)).remedies)
    result.pop("seconds")
    result["recalibration"] = dict(result["recalibration"], date=None)
    return result


def test_remedies_join_the_check_without_moving_its_numbers(
    tmp_path, loaded, volume, with_remedies
):
    out, events = with_remedies
    summary = next(e for e in events if isinstance(e, RunFinished)).summary
    plain = list(run_check(volume, loaded.module, CONFIG, tmp_path / "plain.zarr"))
    expected = plain[-1].summary
    for key in ("disparity", "mismatch_eval", "mismatch_train"):
        assert summary[key] == expected[key], key
    got, want = arrays_of(out), arrays_of(tmp_path / "plain.zarr")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Each tile was read once and predicted four ways; the remedies' forwards are timed apart.
    assert sum(isinstance(e, TileDone) for e in events) == summary["n_tiles"]
    assert summary["timing"]["forward_remedies"] > 0
    assert set(summary["predictions"]) == set(REMEDIES)

    result = table(events)
    assert zarr.open_group(str(out), mode="r").attrs["normcheck"]["remedies"]["notes"]
    # Batch statistics per tile are train mode at train batch 1: no disparity, mismatch remains.
    np.testing.assert_allclose(got["pred_batchstats"], got["pred_train"], atol=1e-5)
    assert result["batchstats"]["disparity_vs_train"]["hard"] == [0.0, 0.0]
    np.testing.assert_allclose(
        result["batchstats"]["mismatch"]["hard"], result["train"]["mismatch"]["hard"], atol=1e-4
    )

    # The remedies pass on a finished check predicts the same (recalibration is seeded).
    list(run_remedies(tmp_path / "plain.zarr", volume, loaded.module, recalibration=RECALIBRATION))
    after = arrays_of(tmp_path / "plain.zarr")
    for name in ("pred_recalibrated", "pred_batchstats"):
        np.testing.assert_array_equal(after[name], got[name], err_msg=name)
    stored = zarr.open_group(str(tmp_path / "plain.zarr"), mode="r").attrs["normcheck"]
    for row in REMEDIES:
        assert stored["remedies"][row]["disparity_vs_train"] == result[row]["disparity_vs_train"]
        assert stored["remedies"][row]["mismatch"] == result[row]["mismatch"]


@pytest.mark.parametrize("stop_after", [2, 9])
def test_cancel_then_resume_equals_uninterrupted(
    tmp_path, loaded, volume, with_remedies, stop_after
):
    reference, reference_events = with_remedies
    out = tmp_path / "o.zarr"
    cancel = threading.Event()
    options = {"remedies": REMEDIES, "recalibration": RECALIBRATION}
    for event in check_with_remedies(volume, loaded, CONFIG, out, cancel=cancel, **options):
        if isinstance(event, TileDone) and event.n_done == stop_after:
            cancel.set()
    assert not is_complete(out)
    # The resumed run reuses the stored recalibration (no second recalibration event).
    events = list(check_with_remedies(volume, loaded, CONFIG, out, resume=True, **options))
    assert not any(type(e).__name__ == "RecalibrationProgress" for e in events)
    assert sum(isinstance(e, TileDone) for e in events) < 12 or stop_after < 9
    got, want = arrays_of(out), arrays_of(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert table(events) == table(reference_events)


def test_resume_refuses_other_predictions(tmp_path, loaded, volume):
    out = tmp_path / "o.zarr"
    cancel = threading.Event()
    for event in run_check(volume, loaded.module, CONFIG, out, cancel=cancel):
        if isinstance(event, TileDone):
            cancel.set()
    with pytest.raises(NormcheckError, match="predictions differ"):
        list(
            check_with_remedies(volume, loaded, CONFIG, out, remedies=("batchstats",), resume=True)
        )


def test_an_output_that_cannot_be_written_fails_before_the_recalibration(
    tmp_path, loaded, volume, with_remedies
):
    finished, _ = with_remedies
    options = {"remedies": REMEDIES, "recalibration": RECALIBRATION}
    events = check_with_remedies(volume, loaded, CONFIG, finished, **options)
    with pytest.raises(NormcheckError, match="already exists"):
        next(events)  # the first event would be the recalibration's
    with pytest.raises(NormcheckError, match="nothing to resume"):
        next(
            check_with_remedies(
                volume, loaded, CONFIG, tmp_path / "no.zarr", resume=True, **options
            )
        )
