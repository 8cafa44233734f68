"""The tile-size trade-off for one model: settings, the rows of a sweep, and its recommendation.

A sweep runs the check (eval, train, the grid shift when asked) once per setting (tile, overlap,
blend) on the same voxels, each setting into its own OUT under the sweep folder, and tabulates
what each report says. The recommendation is the cheapest setting whose eval-mode tiling numbers
(grid shift, tile mismatch) stay below a limit; a hard value counts only where it is judged (the
support rule, :mod:`~napari_normcheck.core.measure.support`), the soft one speaks for it elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.run.report import channel_evidence

#: The eval-mode tiling numbers (1 - Dice) a recommended setting stays below: the verdict's
#: smallest step (low -> moderate), so the tiling moves the result by less than it grades.
TILING_LIMIT = 0.02


@dataclass(frozen=True)
class SweepSetting:
    """One setting of a sweep: tile, overlap and blending (crop mode ignores the overlap)."""

    tile: tuple[int, int, int]
    overlap: float
    blend: str

    @property
    def name(self) -> str:
        """The folder name of the setting's OUT: ``tile_16x96x96_gaussian_overlap0.25.zarr``."""
        tile = "x".join(map(str, self.tile))
        overlap = "" if self.blend == "crop" else f"_overlap{self.overlap:g}"
        return f"tile_{tile}_{self.blend}{overlap}.zarr"

    def config(self, base: RunConfig) -> RunConfig:
        """``base`` with this setting's tile, overlap and blending."""
        return base.replace(tile=self.tile, overlap=self.overlap, blend=self.blend)

    def to_dict(self) -> dict[str, Any]:
        """``{"tile", "overlap", "blend"}`` (overlap ``None`` in crop mode)."""
        return {
            "tile": list(self.tile),
            "overlap": None if self.blend == "crop" else self.overlap,
            "blend": self.blend,
        }


def sweep_settings(
    tiles: Sequence[tuple[int, int, int]], overlaps: Sequence[float], blends: Sequence[str]
) -> list[SweepSetting]:
    """Every combination, in the order given (tile slowest); crop mode once per tile."""
    settings: list[SweepSetting] = []
    for tile, blend, overlap in itertools.product(tiles, blends, overlaps):
        setting = SweepSetting(tuple(tile), 0.0 if blend == "crop" else float(overlap), blend)  # type: ignore[arg-type]
        if setting not in settings:
            settings.append(setting)
    return settings


def sweep_row(
    setting: SweepSetting,
    report: dict[str, Any],
    *,
    out: str | Path,
    peak_memory_mib: float | None,
    cuda_peak_mib: float | None = None,
) -> dict[str, Any]:
    """A sweep row from the report of the setting's run (the same numbers a single run gives).

    ``report`` may also be the regions' reports combined
    (:func:`~napari_normcheck.core.run.sweep_sample.combine_reports`): its ``plan`` then holds
    ``n_voxels`` instead of the region's bounds.
    """
    plan = report.get("plan") or {}
    n_voxels = plan.get("n_voxels") or int(
        np.prod([b - a for a, b in zip(plan["roi_start"], plan["roi_stop"])])
    )
    seconds = float((report.get("timing") or {}).get("total") or 0.0)
    row = {
        **setting.to_dict(),
        "out": str(out),
        "disparity": report["disparity"],
        "mismatch_eval": report["mismatch_eval"],
        "mismatch_train": report["mismatch_train"],
        "grid_shift": report.get("grid_shift"),
        "grid_shift_offset": report.get("grid_shift_offset"),
        "support": report.get("support"),
        "n_tiles": plan.get("n_tiles"),
        "seconds": round(seconds, 3),
        "seconds_per_mvoxel": round(seconds / max(n_voxels, 1) * 1e6, 3),
        "peak_memory_mib": None if peak_memory_mib is None else round(peak_memory_mib, 1),
        "refused": None,
    }
    if cuda_peak_mib is not None:
        row["cuda_peak_memory_mib"] = round(cuda_peak_mib, 1)
    return row


def refused_row(setting: SweepSetting, reason: str) -> dict[str, Any]:
    """The row of a setting the network (or the memory) did not take; the sweep goes on."""
    return {**setting.to_dict(), "refused": reason}


def _judged_values(values: dict[str, Any], judged: Any, soft_judged: Any) -> list[float]:
    # Per channel: the hard value where judged, else the soft one where that is, else nothing.
    evidence = channel_evidence(values["hard"], values.get("soft") or [], judged, soft_judged)
    return [float(value) for value, _c, _kind in evidence]


def _with_flags(row: dict[str, Any], key: str, mode: str | None) -> tuple[dict, Any, Any]:
    """An indicator's values and its hard and soft ``judged`` flags per channel."""
    values = row.get(key) or {}
    if mode is not None:
        values = values.get(mode) or {}
    support = row.get("support") or {}
    if key == "grid_shift":
        return values, values.get("judged"), values.get("soft_judged")
    if key == "mismatch_eval":
        return (
            values,
            (support.get("mismatch_judged") or {}).get("eval"),
            (support.get("mismatch_soft_judged") or {}).get("eval"),
        )
    return values, support.get("judged"), support.get("soft_judged")


def indicator(row: dict[str, Any], key: str, mode: str | None, channel: int = 0) -> float | None:
    """A row's value of ``channel`` for a plotted indicator: the number the recommendation judges.

    The hard value (1 - Dice of the thresholded masks) where the channel has enough foreground to
    judge it, the soft one where only that is judged, ``None`` where neither is (or the row has no
    such indicator). ``key``: ``grid_shift``, ``mismatch_eval`` or ``disparity``; ``mode``: the
    prediction of a grid-shift entry (``eval``, ``train``), ``None`` for the others.
    """
    picked = _indicator_kind(row, key, mode, channel)
    return None if picked is None else picked[0]


def indicator_kind(row: dict[str, Any], key: str, mode: str | None, channel: int = 0) -> str | None:
    """``"hard"`` or ``"soft"``: which 1 - Dice :func:`indicator` gives (``None``: no value)."""
    picked = _indicator_kind(row, key, mode, channel)
    return None if picked is None else picked[1]


def _indicator_kind(
    row: dict[str, Any], key: str, mode: str | None, channel: int
) -> tuple[float, str] | None:
    values, judged, soft_judged = _with_flags(row, key, mode)
    evidence = channel_evidence(
        values.get("hard") or [], values.get("soft") or [], judged, soft_judged
    )
    return next(((float(v), kind) for v, c, kind in evidence if c == channel), None)


def channel_support(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Per output channel, the soft foreground of the rows' eval and train summed (0 if none).

    What a channel's numbers rest on: a plot or a choice shows the best-supported channel first.
    """
    total: list[float] = []
    for row in rows:
        if row.get("refused"):
            continue
        mass = (row.get("support") or {}).get("soft_foreground") or []
        total = [a + b for a, b in itertools.zip_longest(total, mass, fillvalue=0.0)]
    return [float(v) for v in total]


def n_channels(rows: Sequence[dict[str, Any]]) -> int:
    """Output channels of the rows that ran (0 when every one was refused)."""
    return max((len(r["disparity"]["soft"]) for r in rows if not r.get("refused")), default=0)


def eval_tiling(row: dict[str, Any]) -> float | None:
    """The largest eval-mode tiling number of a row (grid shift, tile mismatch); ``None``: none judged."""
    if row.get("refused"):
        return None
    values = _judged_values(*_with_flags(row, "mismatch_eval", None))
    shift = (row.get("grid_shift") or {}).get("eval")
    offset = row.get("grid_shift_offset")
    # A zero offset on every axis (one tile fills the region) compares the grid with itself: 0 by
    # construction, which says nothing about the tiling of a larger volume.
    if shift is not None and not (offset is not None and not any(offset)):
        values += _judged_values(*_with_flags(row, "grid_shift", "eval"))
    return max(values) if values else None


def recommend(
    rows: Sequence[dict[str, Any]],
    limit: float = TILING_LIMIT,
    per_tile_norms: Sequence[str] = (),
) -> dict[str, Any]:
    """The cheapest setting whose eval-mode tiling numbers are below ``limit``, and what it means.

    Parameters
    ----------
    rows : sequence of dict
        The sweep's rows (:func:`sweep_row`, :func:`refused_row`).
    limit : float
        The eval-mode tiling numbers (1 - Dice) a recommended setting stays below.
    per_tile_norms : sequence of str
        The network's normalization layers without running statistics (GroupNorm, InstanceNorm,
        LayerNorm): they normalize each tile by itself in eval mode too, which says why no setting
        may qualify.

    Returns
    -------
    dict
        ``{"tile", "overlap", "blend", "text", "limit"}``; ``tile`` is ``None`` when no setting
        qualifies (the text then says what the numbers mean).
    """
    ran = [r for r in rows if not r.get("refused")]
    none = {"tile": None, "overlap": None, "blend": None, "limit": limit}
    if not ran:
        return none | {"text": "every setting was refused (see each row's reason)"}
    measured = [(r, eval_tiling(r)) for r in ran]
    passing = [r for r, v in measured if v is not None and v < limit]
    if not passing:
        if all(v is None for _, v in measured):
            return none | {
                "text": "no setting has enough foreground to judge its tiling numbers; check "
                "the threshold, the normalization and the region"
            }
        best, value = min(((r, v) for r, v in measured if v is not None), key=lambda p: p[1])
        smallest = (
            f"at no setting tried does the eval result stay in place when the grid moves (the "
            f"smallest eval tiling number is {value:.3f}, at tile "
            f"{'x'.join(map(str, best['tile']))}; limit {limit})"
        )
        if per_tile_norms:
            why = (
                f"the network normalizes each tile by itself ({', '.join(sorted(set(per_tile_norms)))}"
                "), so no tile size removes the seams: use the largest tile that fits, or retrain "
                "with running statistics or BatchRenorm"
            )
        else:
            why = (
                "the network keeps running statistics, so what moves the result is the tile "
                "border: its field of view is wider than the context a tile gives. Try larger "
                "tiles or more overlap"
            )
        return none | {"text": f"{smallest}: {why}"}
    cheapest = min(passing, key=lambda r: r["seconds_per_mvoxel"])
    chosen = {k: cheapest[k] for k in ("tile", "overlap", "blend")}
    where = (
        f"tile {'x'.join(map(str, cheapest['tile']))}, {cheapest['blend']}"
        + ("" if cheapest["overlap"] is None else f", overlap {cheapest['overlap']:g}")
        + f" ({cheapest['seconds_per_mvoxel']:.2f} s per million voxels)"
    )
    disparity = max(cheapest["disparity"]["soft"])
    if len(passing) == len(ran):
        text = (
            f"the eval result is tiling-independent at every setting tried (eval tiling numbers "
            f"below {limit}); the cheapest is {where}. What remains is the train/eval disparity "
            f"(soft {disparity:.3f} there), not the tiling"
        )
    else:
        text = (
            f"the cheapest setting whose eval result stays in place when the grid moves (below "
            f"{limit}) is {where}; at the others the tiling moves the result"
        )
    return chosen | {"limit": limit, "text": text}


@contextlib.contextmanager
def peak_rss_mib(interval: float = 0.05) -> Iterator[dict[str, float | None]]:
    """Sample this process's resident memory while the block runs; ``["peak"]`` in MiB after it.

    Reads ``/proc/self/statm`` (Linux); elsewhere ``peak`` stays ``None``.
    """
    import os

    result: dict[str, float | None] = {"peak": None}
    stop = threading.Event()
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss() -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page / 2**20
        except OSError:
            return None

    def sample() -> None:
        while True:
            now = rss()
            if now is not None:
                result["peak"] = max(result["peak"] or 0.0, now)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=sample, name="normcheck-rss", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
