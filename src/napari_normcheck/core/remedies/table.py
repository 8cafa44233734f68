"""The remedies table: every prediction's disparity against train, tile mismatch and Dice vs labels.

Rows ``eval`` and ``train`` come from the check's summary, each remedy's from its prediction in the
tile loop; with labels, every stored prediction's Dice against them is added chunk by chunk, and one
plain sentence per remedy says what got better and what got worse.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import TilePlan
from napari_normcheck.core.io.store import OutputStore
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.measure.labels import (
    dice_of_stored_many,
    label_box,
    open_labels,
    parse_label_map,
)
from napari_normcheck.core.remedies.recalibrate import RecalibrationResult
from napari_normcheck.core.remedies.variants import REMEDIES
from napari_normcheck.core.run.registry import prediction_group

ROWS = ("eval", "train", *REMEDIES)
ROW_TITLES = {
    "eval": "eval",
    "train": "train",
    "recalibrated": "recalibrated eval",
    "batchstats": "batch-stats eval",
}


def assemble_remedies(
    summary: dict[str, Any],
    measured: dict[str, dict[str, Any]],
    recal_result: RecalibrationResult | None,
) -> dict[str, Any]:
    """The remedies table: eval and train from the check's summary, then each remedy measured.

    Parameters
    ----------
    summary : dict
        The check's summary (its ``disparity``, ``mismatch_eval``, ``mismatch_train``).
    measured : dict
        Per remedy: ``prediction``, ``disparity_vs_train`` and ``mismatch``.
    recal_result : RecalibrationResult or None
        The recalibration, for its provenance and held-out effect.
    """
    n_out = len(summary["disparity"]["hard"])
    result: dict[str, Any] = {
        "eval": {
            "prediction": "pred_eval",
            "disparity_vs_train": summary["disparity"],
            "mismatch": summary["mismatch_eval"],
            "dice_vs_labels": None,
        },
        "train": {
            "prediction": "pred_train",
            "disparity_vs_train": {"hard": [0.0] * n_out, "soft": [0.0] * n_out},
            "mismatch": summary["mismatch_train"],
            "dice_vs_labels": None,
        },
    }
    for remedy, row in measured.items():
        result[remedy] = dict(row) | {"dice_vs_labels": None}
    # Which channels' hard disparity has foreground enough to be judged (the check's rule).
    result["judged"] = (summary.get("support") or {}).get("judged")
    if recal_result is not None and "recalibrated" in measured:
        provenance = recal_result.provenance
        result["recalibration"] = {
            key: provenance.get(key)
            for key in ("date", "variance", "n_batches", "tiles", "holdout_tiles", "notes")
        } | {
            "batch_size": provenance["config"]["batch_size"],
            "holdout": recal_result.holdout,
        }
    return result


def finish_remedies(
    store: OutputStore,
    result: dict[str, Any],
    label_volume: Volume | None,
    mapping: dict,
    offset: tuple[int, ...],
    ignore_labels: tuple[int, ...],
    config: RunConfig,
    notes: list[str],
) -> None:
    """Add the Dice of every stored prediction against the labels, and the notes, to ``result``."""
    if label_volume is not None:
        rows = [row for row in ROWS if row in result]
        # One pass over the labels for every stored prediction.
        dice = dice_of_stored_many(
            {row: store.array(prediction_group(row)) for row in rows},
            label_volume,
            mapping,
            offset=offset,
            threshold=config.threshold,
            argmax=config.activation == "softmax",
            ignore=tuple(ignore_labels),
        )
        for row in rows:
            result[row]["dice_vs_labels"] = dice[row]
        result["labels"] = {
            "source": label_volume.source,
            "mapping": {str(c): list(v) for c, v in mapping.items()},
            "ignore": list(ignore_labels),
        }
    result["notes"] = notes + remedy_notes(result, config.train_batch)


def prepare_labels(
    labels: Any, label_map: Any, plan: TilePlan
) -> tuple[Volume | None, dict, tuple[int, ...]]:
    """Open the labels and parse their map; returns ``(labels, mapping, offset)`` (no labels: None).

    Raises
    ------
    NormcheckError
        For a map without labels or labels without a map.
    """
    if labels is None:
        if label_map is not None:
            raise NormcheckError("--label-map needs --labels (the ground-truth label volume)")
        return None, {}, (0, 0, 0)
    if label_map is None:
        raise NormcheckError(
            "labels need a mapping from label values to output channels: add --label-map '{\"1\": 0}'"
        )
    label_volume = labels if isinstance(labels, Volume) else open_labels(labels)
    mapping = parse_label_map(label_map) if not _is_parsed(label_map) else label_map
    offset = label_box(label_volume, plan.volume_shape, plan.roi_start, plan.roi_stop)
    return label_volume, mapping, offset


def _is_parsed(mapping: Any) -> bool:
    return isinstance(mapping, dict) and all(
        isinstance(k, int) and isinstance(v, tuple) for k, v in mapping.items()
    )


def _per_channel(values: list[float] | None) -> list[float] | None:
    return [float(v) for v in values] if values else None


def _change(before: float, after: float, higher_is_better: bool) -> str:
    if abs(after - before) < 1e-4:
        return "unchanged"
    better = (after > before) == higher_is_better
    return f"{'higher' if after > before else 'lower'}: {'better' if better else 'worse'}"


def remedy_notes(result: dict[str, Any], train_batch: int | None = None) -> list[str]:
    """One plain sentence per remedy: what it changed against eval, better or worse, nothing hidden.

    Each number is per output channel (``channel 0 0.060 -> 0.010 (lower: better), channel 1
    ...``); nothing is averaged over channels, so a nearly empty channel cannot hide in a mean,
    and a channel whose hard disparity is not judged (``result["judged"]``, the check's rule)
    says so instead of a number.
    With ``train_batch == 1`` the batch-stats remedy normalizes each tile by its own statistics,
    which is what train mode does: its disparity against train is zero by construction, and the
    note says so instead of a before -> after that reads as a cure.
    """
    notes = []
    base = result["eval"]
    judged = result.get("judged")
    for remedy in REMEDIES:
        row = result.get(remedy)
        if row is None:
            continue
        parts = []
        for key, label, kind, higher_is_better in (
            ("disparity_vs_train", "disparity vs train", "hard", False),
            ("mismatch", "tile mismatch", "hard", False),
            ("dice_vs_labels", "Dice vs labels", "hard", True),
        ):
            if key == "disparity_vs_train" and remedy == "batchstats" and train_batch == 1:
                parts.append(
                    "disparity vs train 0 by construction (equal to train: with 1 tile per train "
                    "batch, train mode also normalizes each tile by its own statistics)"
                )
                continue
            before = _per_channel((base.get(key) or {}).get(kind))
            after = _per_channel((row.get(key) or {}).get(kind))
            if before is None or after is None:
                continue
            changes = [
                "not judged (too little foreground)"
                if key == "disparity_vs_train" and judged is not None and not judged[c]
                else f"{b:.3f} -> {a:.3f} ({_change(b, a, higher_is_better)})"
                for c, (b, a) in enumerate(zip(before, after))
            ]
            if len(changes) == 1:
                parts.append(f"{label} {changes[0]}")
            else:
                channels = ", ".join(f"channel {c} {text}" for c, text in enumerate(changes))
                parts.append(f"{label} per channel: {channels}")
        if parts:
            notes.append(f"{ROW_TITLES[remedy]} vs eval: " + "; ".join(parts))
    return notes


def to_plain(value: Any) -> Any:
    """A JSON-ready stand-in for ``value`` (``json.dumps``'s ``default``): numbers, lists, text."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    with contextlib.suppress(Exception):
        return float(value)
    return str(value)
