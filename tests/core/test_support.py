"""A verdict that rests on evidence: hard Dice only where the two predictions have foreground enough.

The end-to-end tests run the packaged sample volume through the packaged BatchNorm model, once as
shipped and once with its second output channel made nearly empty (a strongly negative bias on
the last convolution): only a few dozen voxels exceed 0.5 there, so its hard disparity is noise.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.measure.metrics import FOREGROUND, DisparityAccumulator
from napari_normcheck.core.measure.support import DEFAULT_MIN_FOREGROUND, MinForeground, is_judged
from napari_normcheck.core.run import report
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished
from napari_normcheck.core.run.report import (
    build_report,
    format_summary,
    summary_support,
    tile_hard_value,
    verdict,
    verdict_detail,
    verdict_lines,
    worst_tiles,
)
from napari_normcheck.data import sample_model, sample_volume

SHAPE = (16, 64, 64)
CONFIG = RunConfig(
    tile=(16, 32, 32),
    blend="crop",  # a tile's own predictions are what it writes: per-tile values are checkable
    halo=(0, 8, 8),  # overlapping prediction boxes: tile pairs with a mismatch
    normalize="minmax:0,255",
    activation="sigmoid",
    output_dtype="float32",
    device="cpu",
)


@pytest.fixture(autouse=True)
def no_versions(monkeypatch):
    monkeypatch.setattr(report, "software_versions", dict)


@pytest.fixture(scope="module")
def volume():
    return sample_volume(SHAPE)


def nearly_empty_second_channel(volume: np.ndarray, n_above: int = 40) -> torch.nn.Module:
    """The packaged BatchNorm model with channel 1's bias lowered until ~``n_above`` eval voxels
    of ``volume`` exceed probability 0.5 (train mode, with batch statistics, gets a few more)."""
    model = sample_model("batchnorm").load()
    x = torch.from_numpy(volume.astype(np.float32) / 255)[None, None]
    with torch.no_grad():
        logits = model(x)[0, 1].numpy().ravel()
        cut = float(np.sort(logits)[-n_above])
        model.final_conv.bias[1] -= cut + 1e-3
    return model


def run(volume, model, out, config=CONFIG):
    events = list(run_check(open_volume(volume), model, config, out))
    assert isinstance(events[-1], RunFinished)
    return events[-1].summary


@pytest.fixture(scope="module")
def sparse_run(volume, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse") / "o.zarr"
    return out, run(volume, nearly_empty_second_channel(volume), out)


def numpy_support(out, threshold=0.5):
    root = zarr.open_group(str(out), mode="r")
    a = root["pred_train/0"][:] > threshold
    b = root["pred_eval/0"][:] > threshold
    return a.reshape(2, -1).sum(1), b.reshape(2, -1).sum(1), a[0].size, root


# --- the rule --------------------------------------------------------------------------------


def test_both_floors_must_hold_and_zero_floors_judge_everything():
    rule = MinForeground(1000, 0.001)
    assert is_judged(1000, 1_000_000, rule)
    assert not is_judged(999, 1_000_000, rule)  # the voxel floor
    assert not is_judged(5000, 10_000_000, rule)  # the fraction floor (0.05 %)
    assert is_judged(10_000, 10_000_000, rule)
    assert not is_judged(1000, 0, rule)  # nothing compared
    assert is_judged(0, 100, MinForeground(0, 0.0))  # the behaviour before the rule
    assert not is_judged(0, 100, rule)  # an empty channel has no Dice


def test_the_option_reads_voxels_and_an_optional_fraction():
    assert RunConfig().min_foreground == (
        DEFAULT_MIN_FOREGROUND.voxels,
        DEFAULT_MIN_FOREGROUND.fraction,
    )
    assert RunConfig.from_options({"min_foreground": "500"}).min_foreground == (500, 0.001)
    assert RunConfig.from_options({"min_foreground": "50, 0.01"}).min_foreground == (50, 0.01)
    config = RunConfig.from_options({"min_foreground": "0,0"})
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # A configuration stored before the option existed loads with the default.
    stored = RunConfig().to_dict()
    del stored["min_foreground"]
    assert RunConfig.from_dict(stored).min_foreground == (1000, 0.001)
    for bad in ("many", "10,0.1,3", "-1", "10,5"):
        with pytest.raises(NormcheckError, match="min_foreground|minimum foreground"):
            RunConfig.from_options({"min_foreground": bad})


def test_accumulator_counts_each_prediction_and_old_progress_gives_no_partial_count():
    rng = np.random.default_rng(0)
    p, q = rng.random((2, 2, 6, 8, 8)).astype(np.float32)
    acc = DisparityAccumulator(2, 0.5)
    for z in range(0, 6, 2):
        acc.add(p[:, z : z + 2], q[:, z : z + 2])
    np.testing.assert_array_equal(
        acc.foreground(), [(p > 0.5).reshape(2, -1).sum(1), (q > 0.5).reshape(2, -1).sum(1)]
    )
    assert set(acc.result()) == {"hard", "soft"}  # the counts are no disparity kind
    # Progress saved before the counts existed: the sums resume, the counts are not made up.
    old = {k: v for k, v in acc.to_dict().items() if k != FOREGROUND}
    resumed = DisparityAccumulator(2, 0.5)
    resumed.load(old)
    resumed.add(p[:, :2], q[:, :2])
    assert resumed.foreground() is None and FOREGROUND not in resumed.to_dict()
    assert set(resumed.result()) == {"hard", "soft"}


# --- a model whose second channel is nearly empty --------------------------------------------


def test_support_equals_numpy_on_the_stored_predictions(sparse_run):
    out, summary = sparse_run
    train, eval_, n_voxels, root = numpy_support(out)
    support = summary["support"]
    assert support["n_voxels"] == n_voxels == int(np.prod(SHAPE))
    assert support["foreground_voxels"] == {"eval": eval_.tolist(), "train": train.tolist()}
    np.testing.assert_allclose(support["foreground_fraction"]["eval"], eval_ / n_voxels)
    np.testing.assert_allclose(support["foreground_fraction"]["train"], train / n_voxels)
    union = train + eval_
    assert union[1] < 1000 < union[0]  # the second channel really is nearly empty
    assert support["union_voxels"] == union.tolist() and support["judged"] == [True, False]
    p = root["pred_train/0"][:].reshape(2, -1).astype(np.float64)
    q = root["pred_eval/0"][:].reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(support["soft_foreground"], p.sum(1) + q.sum(1), rtol=1e-9)
    assert support["min_foreground"] == {"voxels": 1000, "fraction": 0.001}
    assert support["mismatch_judged"]["eval"][0] and not support["mismatch_judged"]["eval"][1]


def test_the_verdict_rests_on_the_judged_channel_not_the_empty_one(sparse_run):
    _, summary = sparse_run
    hard = summary["disparity"]["hard"]
    detail = summary["verdict_detail"]
    assert detail["channel"] == 0 and detail["basis"] == "hard"
    assert detail["value"] == pytest.approx(hard[0])
    expected_level = "high" if hard[0] >= 0.1 else "moderate" if hard[0] >= 0.02 else "low"
    assert detail["level"] == expected_level
    assert "channel 0" in summary["verdict"] and f"{hard[0]:.2f}" in summary["verdict"]
    assert "channel 1: not judged" in summary["verdict"]
    assert f"over {summary['support']['union_voxels'][0]:,} foreground voxels" in summary["verdict"]
    lines = verdict_lines(summary, ["membrane", "organelle"])
    assert len(lines) >= 2 and "(membrane, hard" in lines[0]
    assert lines[1].startswith("organelle: not judged (")
    assert " ".join(verdict_lines(summary)) == summary["verdict"]
    # Without the rule the nearly empty channel heads the verdict: the false alarm of issue 18.
    assert hard[1] > hard[0]
    unruled = copy.deepcopy(summary)
    unruled["support"]["judged"] = [True, True]
    assert verdict_detail(unruled)["channel"] == 1
    # Names from the model replace "channel N".
    assert verdict(summary, ["membrane", "organelle"]).startswith(
        f"{expected_level if expected_level != 'high' else 'HIGH'} train/eval disparity (membrane"
    )


def test_tiles_without_foreground_show_no_hard_value_and_never_rank(sparse_run):
    out, summary = sparse_run
    root = zarr.open_group(str(out), mode="r")
    p_train, p_eval = root["pred_train/0"][:], root["pred_eval/0"][:]
    grid = root["tile_disparity/0"][:]
    flips = root["tile_flips/0"][:]
    for record in summary["tiles"]:
        box = (slice(None), *(slice(a, b) for a, b in zip(record["start"], record["stop"])))
        a, b = p_train[box] > 0.5, p_eval[box] > 0.5
        foreground = (a.reshape(2, -1).sum(1) + b.reshape(2, -1).sum(1)).tolist()
        assert record["foreground_voxels"] == foreground
        assert record["judged"] == [is_judged(f, a[0].size) for f in foreground]
        cells = grid[(slice(None), *record["grid"])]
        for c, judged in enumerate(record["judged"]):
            assert math.isnan(cells[c]) != judged
            assert (tile_hard_value(record, "disparity_hard", c) is None) != judged
            assert not math.isnan(flips[(c, *record["grid"])])  # flips are always defined
    assert not any(record["judged"][1] for record in summary["tiles"])
    # The exact values stay in the record; the nearly empty channel's are the largest.
    assert max(t["disparity_hard"][1] for t in summary["tiles"]) > max(
        t["disparity_hard"][0] for t in summary["tiles"]
    )
    ranked = worst_tiles(summary["tiles"], count=5)
    assert ranked and all(channel == 0 and tile["judged"][0] for tile, channel, _ in ranked)
    values = [value for _, _, value in ranked]
    assert values == sorted(values, reverse=True)


def test_report_and_printed_summary_hold_the_same_rule(sparse_run, tmp_path):
    _, summary = sparse_run
    built = build_report(summary, {})
    assert built["support"] == summary["support"]
    assert built["verdict_detail"] == summary["verdict_detail"]
    assert built["verdict"] == summary["verdict"]
    text = format_summary(built)
    union = summary["support"]["union_voxels"][1]
    assert f"channel 1 not judged ({union} foreground voxels)" in text
    assert f"verdict: {summary['verdict']}" in text
    worst = [line for line in text.splitlines() if " at z,y,x " in line]
    assert worst and all(line.endswith("(channel 0)") for line in worst)
    path = report.write_report(tmp_path / "r.json", built)
    assert json.loads(path.read_text())["verdict_detail"]["channel"] == 0


def test_a_summary_stored_before_the_rule_is_judged_from_its_sums(sparse_run):
    _, summary = sparse_run
    old = {k: v for k, v in summary.items() if k not in ("support", "verdict_detail", "verdict")}
    for tile in old["tiles"]:
        tile.pop("judged", None)
    derived = summary_support(old)
    assert derived["judged"] == summary["support"]["judged"]
    assert derived["n_voxels"] == summary["support"]["n_voxels"]
    assert verdict_detail(old) == summary["verdict_detail"]
    assert summary_support({"disparity": summary["disparity"], "tiles": []}) is None


# --- the packaged sample as shipped ----------------------------------------------------------


def test_packaged_sample_every_channel_is_judged_and_the_verdict_names_the_worst(volume, tmp_path):
    summary = run(volume, sample_model("batchnorm").load(), tmp_path / "o.zarr")
    train, eval_, n_voxels, _ = numpy_support(tmp_path / "o.zarr")
    assert summary["support"]["judged"] == [
        is_judged(f, n_voxels) for f in (train + eval_).tolist()
    ]
    hard = summary["disparity"]["hard"]
    evidence = [
        h if j else s
        for h, s, j in zip(hard, summary["disparity"]["soft"], summary["support"]["judged"])
    ]
    detail = summary["verdict_detail"]
    assert detail["channel"] == int(np.argmax(evidence))
    assert detail["value"] == pytest.approx(max(evidence))
    assert f"channel {detail['channel']}" in summary["verdict"]


def test_nothing_judged_says_so(sparse_run):
    _, summary = sparse_run
    strict = copy.deepcopy(summary)
    strict["support"]["judged"] = [False, False]
    strict["support"]["soft_judged"] = [False, False]
    assert verdict_detail(strict) == {
        "level": "not judged",
        "channel": None,
        "basis": "hard",
        "value": 0.0,
    }
    assert verdict(strict).startswith("train/eval disparity not judged")
    # A channel whose hard Dice is not judged but whose probabilities are: the soft value speaks.
    soft_only = copy.deepcopy(summary)
    soft_only["support"]["judged"] = [False, False]
    soft_only["support"]["soft_judged"] = [True, False]
    detail = verdict_detail(soft_only)
    assert detail["basis"] == "soft" and detail["channel"] == 0
    assert detail["value"] == pytest.approx(summary["disparity"]["soft"][0])
    assert "soft" in verdict(soft_only) and "speaks for it" in verdict(soft_only)


def _two_channel_summary(hard, soft, judged, soft_judged):
    return {
        "disparity": {"hard": hard, "soft": soft},
        "mismatch_eval": {"hard": [0.0, 0.0], "soft": [0.0, 0.0]},
        "mismatch_train": {"hard": [0.0, 0.0], "soft": [0.0, 0.0]},
        "support": {
            "judged": judged,
            "soft_judged": soft_judged,
            "union_voxels": [50_000, 500],
            "soft_foreground": [60_000.0, 1_500.0],
        },
    }


def test_a_hard_value_outranks_a_soft_one_of_the_same_level():
    # Channel 1's hard Dice is not judged; its soft value (mostly background mass) is larger than
    # channel 0's hard value, but both are "high": the verdict rests on the count of voxels.
    summary = _two_channel_summary([0.3, 0.9], [0.28, 0.94], [True, False], [True, True])
    assert verdict_detail(summary) == {
        "level": "high",
        "channel": 0,
        "basis": "hard",
        "value": 0.3,
    }
    # A soft value of a higher level still heads the verdict: nothing is hidden.
    summary = _two_channel_summary([0.01, 0.9], [0.01, 0.5], [True, False], [True, True])
    detail = verdict_detail(summary)
    assert (detail["level"], detail["channel"], detail["basis"]) == ("high", 1, "soft")
    # Within a level and a basis, the larger value.
    summary = _two_channel_summary([0.12, 0.4], [0.1, 0.3], [True, True], [True, True])
    assert verdict_detail(summary)["channel"] == 1
