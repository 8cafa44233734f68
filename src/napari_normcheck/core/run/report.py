"""The run report: a JSON contract for scripts, a per-tile CSV, and a short human summary.

The JSON's top-level keys ``disparity``, ``mismatch_eval``, ``mismatch_train`` (each
``{"hard": [per channel], "soft": [per channel]}``), ``tiles``, ``norm_layers``, ``params``,
``model_sha256``, ``versions`` and ``timing`` are a contract: keys may be added, never renamed.
Each tile's keys and the CSV's columns are ``index``, ``start``, ``stop``, the registered tile
metrics (:data:`~napari_normcheck.core.run.registry.TILE_METRICS`) and ``feature_z``.

A hard Dice counts only where it rests on enough foreground
(:mod:`~napari_normcheck.core.measure.support`): the report's ``support`` says how much each
channel has and whether it is judged, ``verdict_detail`` which channel and number the verdict
rests on; a channel or tile whose hard value is not judged shows "not judged" or "-" and ranks in
no worst list.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Container
from pathlib import Path
from typing import Any

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.measure.support import (
    DEFAULT_MIN_FOREGROUND,
    MinForeground,
    judged_mask,
)
from napari_normcheck.core.run import registry


def tile_metric_keys(present: Container[str]) -> tuple[str, ...]:
    """The registered tile metrics' keys a report's tile carries, in registry order.

    ``present``: the keys of the tile's record (or of all records, for the CSV's columns).

    A metric with a grid has a value for every tile, so its key is always there (``null`` where the
    run did not compute it); one without (``disparity_argmax``) only where the record has it.
    """
    return tuple(
        m.key
        for m in registry.TILE_METRICS
        if (m.grid is not None and m.opt_in is None) or m.key in present
    )


def tile_columns(tiles: list[dict[str, Any]]) -> tuple[str, ...]:
    """The per-tile CSV's columns: ``index``, ``start``, ``stop``, the tile metrics, ``feature_z``."""
    present = {key for tile in tiles for key in tile}
    return ("index", "start", "stop", *tile_metric_keys(present), "feature_z")


def software_versions() -> dict[str, str]:
    """Versions of the software that produced the numbers.

    A package the run did not import is not imported for its version (MONAI's import takes over a
    second): its installed metadata says it.
    """
    from napari_normcheck import __version__

    versions = {"napari-normcheck": __version__, "python": platform.python_version()}
    for name in ("torch", "monai", "numpy", "dask", "zarr"):
        versions[name] = _package_version(name)
    return versions


def _package_version(name: str) -> str:
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


#: The summary's keys of ``--grid-shift`` (:mod:`~napari_normcheck.core.run.grid_shift`), copied
#: into the report when the run made them.
GRID_SHIFT_KEYS = ("grid_shift", "grid_shift_offset", "grid_shift_fraction")


def build_report(summary: dict[str, Any], store_attrs: dict[str, Any]) -> dict[str, Any]:
    """Assemble the report from a run's summary and its OUT.zarr ``normcheck`` attributes."""
    tiles = []
    for t in summary.get("tiles", []):
        columns = ("index", "start", "stop", *tile_metric_keys(t), "feature_z")
        tiles.append({**{key: t.get(key) for key in columns}, **t})
    model = store_attrs.get("model", {})
    return {
        "disparity": summary["disparity"],
        "mismatch_eval": summary["mismatch_eval"],
        "mismatch_train": summary["mismatch_train"],
        "tiles": tiles,
        "norm_layers": store_attrs.get("norm_layers"),
        "params": store_attrs.get("params"),
        "plan": store_attrs.get("plan"),
        "intensity": store_attrs.get("intensity"),
        "model_sha256": model.get("sha256"),
        "model": model,
        "source": store_attrs.get("source"),
        "out": summary.get("out"),
        "versions": software_versions(),
        "timing": summary.get("timing"),
        "precision_effect": summary.get("precision_effect"),
        "distributed": summary.get("distributed"),
        "support": summary_support(summary),
        "verdict_detail": verdict_detail(summary),
        "verdict": verdict(summary),
        **{key: summary[key] for key in GRID_SHIFT_KEYS if key in summary},
    }


def write_report(path: str | Path, report: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``report`` as JSON (``.json``) or one CSV row per tile (``.csv``), atomically."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".csv"):
        raise NormcheckError(f"report {path} must end in .json or .csv")
    if path.exists() and not overwrite:
        raise NormcheckError(
            f"report {path} already exists; pass --overwrite or choose another name"
        )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps(report, indent=2))
        else:
            with tmp.open("w", newline="") as handle:
                writer = csv.writer(handle)
                columns = tile_columns(report["tiles"])
                writer.writerow(columns)
                for tile in report["tiles"]:
                    writer.writerow([_csv_value(tile.get(c)) for c in columns])
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise NormcheckError(f"cannot write report {path}: {error.strerror}") from None
    return path


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(_csv_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


LEVELS = ((0.1, "high"), (0.02, "moderate"), (0.0, "low"))
SEAMS_AT = 0.05


def channel_name(channel: int, channel_names: list[str] | None = None) -> str:
    """The model's name of an output channel, else ``"channel N"``."""
    if channel_names and channel < len(channel_names) and channel_names[channel]:
        return str(channel_names[channel])
    return f"channel {channel}"


def summary_support(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The summary's ``support``; for a summary stored before it existed, what its sums give.

    An older summary's eval-against-train hard sums hold ``|A| + |B|`` per channel and its tiles
    cover the ROI, so the rule (at its default) can still be applied; ``None`` without them.
    """
    if summary.get("support"):
        return summary["support"]
    hard = (summary.get("disparity_sums") or {}).get("hard")
    tiles = summary.get("tiles") or []
    if hard is None or not tiles:
        return None
    n_voxels = sum(math.prod(b - a for a, b in zip(t["start"], t["stop"])) for t in tiles)
    union = [int(round(v)) for v in hard[1]]
    soft = (summary.get("disparity_sums") or {}).get("soft")
    soft_mass = [float(v) for v in soft[1]] if soft is not None else None
    return {
        "foreground_fraction": None,
        "foreground_voxels": None,
        "n_voxels": n_voxels,
        "union_voxels": union,
        "judged": judged_mask(union, n_voxels, DEFAULT_MIN_FOREGROUND),
        "min_foreground": DEFAULT_MIN_FOREGROUND.to_dict(),
        "soft_foreground": soft_mass,
        "soft_judged": (
            None if soft_mass is None else judged_mask(soft_mass, n_voxels, DEFAULT_MIN_FOREGROUND)
        ),
        "mismatch_judged": None,
    }


def _level(value: float) -> str:
    return next(name for floor, name in LEVELS if value >= floor)


def channel_evidence(
    hard: list[float],
    soft: list[float],
    judged: list[bool] | None,
    soft_judged: list[bool] | None,
) -> list[tuple[float, int, str]]:
    """What each channel's 1 - Dice rests on: ``(value, channel, "hard" | "soft")``.

    Its hard value where judged, else its soft value where that is judged (its denominator,
    sum(p) + sum(q), passes the same rule), else nothing. Flags a summary lacks count as judged
    (the rule did not exist yet). The verdict, the seams line and the sweep's recommendation and
    plots all read values through it.
    """
    evidence = []
    for c, value in enumerate(hard):
        if judged is None or judged[c]:
            evidence.append((value, c, "hard"))
        elif c < len(soft) and (soft_judged is None or soft_judged[c]):
            evidence.append((soft[c], c, "soft"))
    return evidence


def _worst(evidence: list[tuple[float, int, str]]) -> tuple[float, int, str] | None:
    # The highest level first; within a level a hard value (a count of voxels that change)
    # outranks a soft one (probability mass, which on a nearly empty channel is mostly the
    # background's), then the larger value, then the first channel.
    rank = {name: i for i, (_floor, name) in enumerate(reversed(LEVELS))}
    return max(
        evidence,
        key=lambda e: (rank[_level(e[0])], e[2] == "hard", e[0], -e[1]),
        default=None,
    )


def verdict_detail(summary: dict[str, Any]) -> dict[str, Any]:
    """What the verdict rests on: ``{"level", "channel", "basis", "value"}``.

    Each channel offers its hard disparity where it is judged, else its soft disparity where only
    that is judged (:func:`channel_evidence`); the verdict takes the highest level among them, a hard
    value before a soft one of the same level, then the larger value. ``level`` is ``high``
    (>= 0.1), ``moderate`` (>= 0.02) or ``low``, and ``not judged`` (channel ``None``, value 0)
    where no channel has enough foreground for either.
    """
    disparity = summary["disparity"]
    support = summary_support(summary) or {}
    worst = _worst(
        channel_evidence(
            disparity["hard"],
            disparity.get("soft", []),
            support.get("judged"),
            support.get("soft_judged"),
        )
    )
    if worst is None:
        return {"level": "not judged", "channel": None, "basis": "hard", "value": 0.0}
    value, channel, basis = worst
    return {"level": _level(value), "channel": channel, "basis": basis, "value": float(value)}


def _seams(summary: dict[str, Any]) -> tuple[float, int, str] | None:
    mismatch = summary["mismatch_eval"]
    support = summary_support(summary) or {}
    worst = _worst(
        channel_evidence(
            mismatch["hard"],
            mismatch.get("soft", []),
            (support.get("mismatch_judged") or {}).get("eval"),
            (support.get("mismatch_soft_judged") or {}).get("eval"),
        )
    )
    return worst if worst is not None and worst[0] >= SEAMS_AT else None


def _over(detail: dict[str, Any], support: dict[str, Any]) -> str:
    # How much foreground the number rests on, so a small support is seen at once.
    key = "union_voxels" if detail["basis"] == "hard" else "soft_foreground"
    counts = support.get(key) or []
    channel = detail["channel"]
    if channel is None or channel >= len(counts):
        return ""
    kind = "foreground" if detail["basis"] == "hard" else "soft foreground"
    return f" over {round(counts[channel]):,} {kind} voxels"


def verdict_lines(summary: dict[str, Any], channel_names: list[str] | None = None) -> list[str]:
    """The verdict as short lines: the finding, each channel not judged, the seams.

    Parameters
    ----------
    summary : dict
        A run's summary (or report).
    channel_names : list of str, optional
        The model's names of its output channels; ``"channel N"`` by default.
    """
    detail = verdict_detail(summary)
    support = summary_support(summary) or {}
    name = channel_name(detail["channel"], channel_names) if detail["channel"] is not None else ""
    rests = f"{name}, {detail['basis']} {detail['value']:.2f}{_over(detail, support)}"
    if detail["level"] == "high":
        lines = [
            f"HIGH train/eval disparity ({rests}): eval-mode predictions differ from what the "
            "network does with batch statistics; its running statistics do not fit this data."
        ]
    elif detail["level"] == "moderate":
        lines = [f"moderate train/eval disparity ({rests}): check the worst tiles."]
    elif detail["level"] == "low":
        lines = [
            f"low train/eval disparity ({name}, {detail['basis']} {detail['value']:.3f}"
            f"{_over(detail, support)})."
        ]
    else:
        rule = MinForeground(**support.get("min_foreground", DEFAULT_MIN_FOREGROUND.to_dict()))
        lines = [
            f"train/eval disparity not judged: no output channel has {rule.describe()} as "
            "foreground in eval and train together (hard or soft)."
        ]
    judged = support.get("judged") or []
    soft_judged = support.get("soft_judged")
    union = support.get("union_voxels") or []
    soft = summary["disparity"].get("soft", [])
    for c, ok in enumerate(judged):
        if ok or c >= len(union):
            continue
        name_c = channel_name(c, channel_names)
        if c < len(soft) and (soft_judged is None or soft_judged[c]):
            lines.append(
                f"{name_c}: hard Dice not judged ({union[c]} foreground voxels); "
                f"soft {soft[c]:.3f} speaks for it."
            )
        elif support.get("probabilities") is False:
            lines.append(f"{name_c}: not judged ({union[c]} foreground voxels).")
        else:
            lines.append(
                f"{name_c}: not judged ({union[c]} foreground voxels; too little probability "
                "for the soft Dice too)."
            )
    if support.get("probabilities") is False:
        lines.append(
            "The predictions are not probabilities (activation none, no sigmoid or softmax in "
            "the model): the hard Dice thresholds the raw outputs, and no soft Dice is judged. "
            "Choose the activation the network was trained with (sigmoid or softmax)."
        )
    seams = _seams(summary)
    if seams is not None:
        value, c, basis = seams
        lines.append(
            f"Tiles disagree where they overlap ({channel_name(c, channel_names)}, eval mismatch "
            f"{basis} {value:.2f}): expect seams."
        )
    return lines


def verdict(summary: dict[str, Any], channel_names: list[str] | None = None) -> str:
    """One line a biologist can act on: the finding, the channel and the number it rests on."""
    return " ".join(verdict_lines(summary, channel_names))


def tile_hard_value(record: dict[str, Any], key: str, channel: int) -> float | None:
    """A tile's value of metric ``key`` on ``channel``; ``None`` where its hard value is not judged.

    Metrics that are always defined (soft values, flips) come back as they are; ``None`` too
    where the record has no value.
    """
    values = record.get(key)
    if values is None or channel >= len(values):
        return None
    flags = record.get(registry.JUDGED_BY.get(key, ""))
    if flags is not None and channel < len(flags) and not flags[channel]:
        return None
    return values[channel]


def worst_tiles(
    tiles: list[dict[str, Any]], key: str = "disparity_hard", count: int = 5
) -> list[tuple[dict[str, Any], int, float]]:
    """The ``count`` tiles with the largest judged value of ``key``: ``(record, channel, value)``.

    A tile's value is its largest over the channels where it is judged; tiles without any
    judged channel are left out.
    """
    ranked = []
    for tile in tiles:
        values = [
            (v, c)
            for c in range(len(tile.get(key) or []))
            if (v := tile_hard_value(tile, key, c)) is not None
        ]
        if values:
            value, channel = max(values, key=lambda e: (e[0], -e[1]))
            ranked.append((tile, channel, float(value)))
    ranked.sort(key=lambda e: (-e[2], e[0]["index"]))
    return ranked[:count]


def format_summary(
    report: dict[str, Any], worst: int = 5, channel_names: list[str] | None = None
) -> str:
    """The short summary printed at the end of ``run``."""
    support = summary_support(report) or {}

    def per_channel(
        values: list[float], judged: list[bool] | None = None, counts: list[int] | None = None
    ) -> str:
        parts = []
        for c, v in enumerate(values):
            name = channel_name(c, channel_names)
            if judged is not None and c < len(judged) and not judged[c]:
                count = (
                    f" ({round(counts[c])} foreground voxels)" if counts and c < len(counts) else ""
                )
                parts.append(f"{name} not judged{count}")
            else:
                parts.append(f"{name} {v:.3f}")
        return ", ".join(parts)

    mismatch_judged = support.get("mismatch_judged") or {}
    mismatch_counts = support.get("mismatch_foreground_voxels") or {}
    hard = per_channel(
        report["disparity"]["hard"], support.get("judged"), support.get("union_voxels")
    )
    soft = (
        per_channel(
            report["disparity"]["soft"], support.get("soft_judged"), support.get("soft_foreground")
        )
        if support.get("probabilities") is not False
        else "not judged: the predictions are not probabilities (use --activation sigmoid or softmax)"
    )
    lines = [
        f"train/eval disparity (hard): {hard}",
        f"train/eval disparity (soft): {soft}",
        *(
            f"tile mismatch {mode:<5} (hard):  "
            + per_channel(
                report[f"mismatch_{mode}"]["hard"],
                mismatch_judged.get(mode),
                mismatch_counts.get(mode),
            )
            for mode in ("eval", "train")
        ),
    ]
    if support.get("min_foreground"):
        rule = MinForeground(**support["min_foreground"])
        lines.append(
            f"hard Dice judged where eval and train together have at least {rule.describe()} "
            "as foreground (--min-foreground)"
        )
    ranked = worst_tiles(report["tiles"], count=worst)
    if ranked:
        lines.append(f"worst {len(ranked)} tiles by hard disparity (judged tiles only):")
        for tile, channel, value in ranked:
            box = " ".join(f"{a}:{b}" for a, b in zip(tile["start"], tile["stop"]))
            lines.append(
                f"  tile {tile['index']:>4} at z,y,x {box}: disparity {value:.3f} "
                f"({channel_name(channel, channel_names)})"
            )
    elif report["tiles"]:
        lines.append("worst tiles: none ranked, no tile has enough foreground for a hard Dice")
    effect = report.get("precision_effect")
    if effect:
        lines.append(
            f"{effect['precision']} against fp32 on {len(effect['tiles'])} tiles (1 - Dice, hard): "
            f"eval {per_channel(effect['eval']['hard'])}; train {per_channel(effect['train']['hard'])}"
        )
    for name, values in (report.get("grid_shift") or {}).items():
        offset = ",".join(map(str, report.get("grid_shift_offset") or []))
        lines.append(
            f"grid shift {name:<5} (grid moved by z,y,x {offset}; 1 - Dice of the results): hard "
            f"{per_channel(values['hard'], values.get('judged'), values.get('union_voxels'))}; "
            f"soft {per_channel(values['soft'])}"
        )
    lines.append(f"verdict: {verdict(report, channel_names)}")
    return "\n".join(lines)
