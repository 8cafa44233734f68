"""The remedies notes: numbers per channel, and a row equal to another by construction says so."""

from __future__ import annotations

from napari_normcheck.core.remedies.table import remedy_notes


def table(n_channels: int) -> dict:
    """A remedies table whose eval disparity is 0.060 on channel 0 and 0.937 on channel 1."""
    disparity = [0.060, 0.937][:n_channels]
    zeros = [0.0] * n_channels
    return {
        "eval": {
            "disparity_vs_train": {"hard": disparity, "soft": disparity},
            "mismatch": {"hard": [0.05, 0.5][:n_channels]},
            "dice_vs_labels": None,
        },
        "train": {
            "disparity_vs_train": {"hard": zeros, "soft": zeros},
            "mismatch": {"hard": [0.08, 0.6][:n_channels]},
            "dice_vs_labels": None,
        },
        "recalibrated": {
            "disparity_vs_train": {"hard": [0.010, 0.900][:n_channels]},
            "mismatch": {"hard": [0.05, 0.5][:n_channels]},
            "dice_vs_labels": None,
        },
        "batchstats": {
            "disparity_vs_train": {"hard": zeros},
            "mismatch": {"hard": [0.08, 0.6][:n_channels]},
            "dice_vs_labels": None,
        },
    }


def test_channels_are_not_averaged_into_one_number():
    recalibrated, batchstats = remedy_notes(table(2), train_batch=4)
    # Not the mean over channels (0.499 -> 0.455): each channel its own before -> after.
    assert "0.499" not in recalibrated
    assert "channel 0 0.060 -> 0.010 (lower: better)" in recalibrated
    assert "channel 1 0.937 -> 0.900 (lower: better)" in recalibrated
    assert "tile mismatch per channel: channel 0 0.050 -> 0.050 (unchanged)" in recalibrated
    # With 4 tiles per train batch, per-tile statistics are not train mode: a real change.
    assert "channel 0 0.060 -> 0.000 (lower: better)" in batchstats
    single = remedy_notes(table(1), train_batch=4)[0]
    assert "disparity vs train 0.060 -> 0.010 (lower: better)" in single


def test_batch_stats_equal_to_train_by_construction_reads_as_no_cure():
    notes = remedy_notes(table(2), train_batch=1)
    batchstats = next(note for note in notes if note.startswith("batch-stats eval"))
    assert "equal to train" in batchstats and "by construction" in batchstats
    assert "0.060 -> 0.000" not in batchstats and "0.937 -> 0.000" not in batchstats
    # Its tile mismatch is train's, and that is said as a change against eval (worse here).
    assert "channel 0 0.050 -> 0.080 (higher: worse)" in batchstats
    recalibrated = next(note for note in notes if note.startswith("recalibrated eval"))
    assert "by construction" not in recalibrated


def test_a_channel_not_judged_says_so_instead_of_a_number():
    result = table(2) | {"judged": [True, False]}
    recalibrated = remedy_notes(result, train_batch=4)[0]
    assert "channel 0 0.060 -> 0.010 (lower: better)" in recalibrated
    assert "channel 1 not judged (too little foreground)" in recalibrated
    assert "0.937" not in recalibrated
    # The tile mismatch is not the disparity: its numbers stay.
    assert (
        "tile mismatch per channel: channel 0 0.050 -> 0.050 (unchanged), channel 1" in recalibrated
    )
