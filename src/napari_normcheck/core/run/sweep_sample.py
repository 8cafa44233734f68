"""``sweep --sample N``: regions spread over the content of a volume, and one row from their runs.

The regions. Every region has the same size, :func:`region_size`: twice the sweep's largest tile
along each axis (so that even the largest tile has neighbours, and its grid can move by half a
step), clipped to the volume. Candidate boxes of that size lie on a coarse grid over the volume
(about half a box apart); each is scored by its texture, the mean absolute difference between
neighbouring voxels of a strided view of the volume (at most :data:`PROBE_VOXELS` voxels are
read, never the whole volume). Boxes whose score is at least :data:`CONTENT_FRACTION` of the
best one count as content (flat background scores near 0); from them, N boxes are taken one after the other, each the
content box farthest from those already taken (the best-scoring box first; boxes that do not
overlap a taken one first). Everything is deterministic: the same volume, tiles and N give the
same regions, and every setting of the sweep runs on them.

The row. Each region is its own run under the setting's folder; the row combines them with the
Dice of the summed sums. A run's report keeps every ``1 - Dice`` with its denominator
``|A| + |B|`` (hard: ``union_voxels``; soft: ``soft_foreground``), and ``1 - Dice = 1 - 2I/U``
gives ``I = (1 - d) U / 2``, so ``1 - 2 sum(I) / sum(U)`` is the ``U``-weighted mean of the
regions' values: :func:`pooled`. The support rule is applied again to the summed foreground.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.measure.support import MinForeground, judged_mask

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

#: Voxels of the strided view that scores the candidate boxes (about 64^3).
PROBE_VOXELS = 262_144
#: A candidate counts as content when its score is at least this fraction of the best one.
CONTENT_FRACTION = 0.25
#: Candidate positions per axis at most (the coarse grid).
MAX_POSITIONS = 9


def region_size(
    tiles: Sequence[Sequence[int]], volume_shape: Sequence[int]
) -> tuple[int, int, int]:
    """The sampled regions' size: twice the largest tile per axis, clipped to the volume.

    An axis the volume is too short for is taken whole: there the largest tile may fill the
    region (then its grid does not move along that axis) or exceed it (the network may refuse
    that setting, as it would the volume).
    """
    largest = [max(int(t[axis]) for t in tiles) for axis in range(3)]
    return tuple(min(2 * side, int(n)) for side, n in zip(largest, volume_shape))  # type: ignore[return-value]


def _positions(n: int, size: int) -> list[int]:
    # Starts about half a box apart, the first at 0 and the last at the far end.
    room = n - size
    if room <= 0:
        return [0]
    count = min(MAX_POSITIONS, math.ceil(room / max(size / 2, 1)) + 1)
    return sorted({int(round(v)) for v in np.linspace(0, room, count)})


def candidate_boxes(volume_shape: Sequence[int], size: Sequence[int]) -> list[Box]:
    """Boxes of ``size`` on a coarse grid over ``volume_shape`` (spatial ``Z, Y, X``), C order."""
    starts = [_positions(int(n), int(s)) for n, s in zip(volume_shape, size)]
    return [
        tuple((a, a + int(s)) for a, s in zip(corner, size))  # type: ignore[misc]
        for corner in itertools.product(*starts)
    ]


def probe_strides(volume_shape: Sequence[int], voxels: int = PROBE_VOXELS) -> tuple[int, ...]:
    """The same stride on every axis that leaves at most ``voxels`` voxels to read."""
    total = math.prod(int(n) for n in volume_shape)
    stride = max(1, math.ceil((total / voxels) ** (1 / len(volume_shape))))
    while math.prod(math.ceil(int(n) / stride) for n in volume_shape) > voxels:
        stride += 1
    return (stride,) * len(volume_shape)


def content_scores(data: Any, boxes: Sequence[Box]) -> list[float]:
    """Each box's texture on a strided view of ``data`` (``C, Z, Y, X``; channels averaged).

    The texture of a voxel is the sum over the axes of its absolute difference to the next voxel
    of the view; a box's score is its mean. Flat background scores 0 and a box half background
    about half of a full one (an intensity standard deviation would rank that box first: the
    step from background to content is its largest variation). ``data`` is read lazily: only
    the strided view is computed.
    """
    spatial = tuple(int(n) for n in data.shape[1:])
    strides = probe_strides(spatial)
    view = data[(slice(None), *(slice(None, None, s) for s in strides))]
    probe = np.asarray(view.compute() if hasattr(view, "compute") else view, dtype=np.float64)
    probe = probe.mean(axis=0)
    texture = np.zeros_like(probe)
    for axis in range(probe.ndim):
        if probe.shape[axis] > 1:
            step = np.abs(np.diff(probe, axis=axis))
            texture[tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))] += step
    scores = []
    for box in boxes:
        inside = tuple(
            slice(a // s, max(a // s + 1, -(-b // s))) for (a, b), s in zip(box, strides)
        )
        values = texture[inside]
        scores.append(float(values.mean()) if values.size else 0.0)
    return scores


def _overlaps(a: Box, b: Box) -> bool:
    return all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(a, b))


def _distance(a: Box, b: Box) -> float:
    return math.dist([(x0 + x1) / 2 for x0, x1 in a], [(x0 + x1) / 2 for x0, x1 in b])


def spread_choice(boxes: Sequence[Box], scores: Sequence[float], n: int) -> list[Box]:
    """``n`` content boxes, each the farthest from those taken before (best-scoring first).

    Content: a score of at least :data:`CONTENT_FRACTION` of the best one. Boxes that overlap no
    taken one are preferred; ties go to the higher score, then to scan order. Fewer than ``n``
    when there are fewer content boxes.
    """
    if not boxes:
        return []
    best = max(scores)
    content = [i for i, s in enumerate(scores) if s >= CONTENT_FRACTION * best]
    chosen = [max(content, key=lambda i: (scores[i], -i))]
    while len(chosen) < n:
        left = [i for i in content if i not in chosen]
        if not left:
            break

        def rank(i: int) -> tuple[bool, float, float, int]:
            free = not any(_overlaps(boxes[i], boxes[j]) for j in chosen)
            near = min(_distance(boxes[i], boxes[j]) for j in chosen)
            return (free, near, scores[i], -i)

        chosen.append(max(left, key=rank))
    return [boxes[i] for i in chosen]


def sample_regions(data: Any, tiles: Sequence[Sequence[int]], n: int) -> list[Box]:
    """``n`` regions of :func:`region_size` spread over the content of ``data`` (``C, Z, Y, X``).

    Raises
    ------
    NormcheckError
        When ``n`` is below 1.
    """
    if n < 1:
        raise NormcheckError(f"--sample {n}: give at least one region")
    spatial = tuple(int(v) for v in data.shape[1:])
    size = region_size(tiles, spatial)
    boxes = candidate_boxes(spatial, size)
    return spread_choice(boxes, content_scores(data, boxes), n)


def roi_text(box: Box) -> str:
    """``z0:z1,y0:y1,x0:x1``: a region as ``--roi`` takes it."""
    return ",".join(f"{a}:{b}" for a, b in box)


# --- one row from the regions' reports -------------------------------------------------------


def pooled(values: Sequence[Sequence[float]], weights: Sequence[Sequence[float]]) -> list[float]:
    """Per channel ``sum(d * U) / sum(U)``: the ``1 - Dice`` of the regions' summed sums.

    ``values``: each region's ``1 - Dice`` per channel; ``weights``: its ``|A| + |B|``. A channel
    with no foreground anywhere is 0, as the Dice of two empty maps counts as agreement.
    """
    d = np.asarray(values, dtype=np.float64)
    u = np.asarray(weights, dtype=np.float64)
    total = u.sum(axis=0)
    summed = (d * u).sum(axis=0)
    return [float(v) for v in np.where(total > 0, summed / np.where(total > 0, total, 1.0), 0.0)]


def _summed(lists: Sequence[Sequence[float]]) -> list[float]:
    return [float(v) for v in np.asarray(lists, dtype=np.float64).sum(axis=0)]


def _combined_mismatch(reports: Sequence[dict[str, Any]], mode: str) -> dict[str, list[float]]:
    supports = [r["support"] for r in reports]
    hard_u = [s["mismatch_foreground_voxels"][mode] for s in supports]
    soft_u = [s["mismatch_soft_foreground"][mode] for s in supports]
    return {
        "hard": pooled([r[f"mismatch_{mode}"]["hard"] for r in reports], hard_u),
        "soft": pooled([r[f"mismatch_{mode}"]["soft"] for r in reports], soft_u),
    }


def combine_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One report-like dict for :func:`~napari_normcheck.core.run.sweep.sweep_row` from the regions'.

    ``disparity``, ``mismatch_eval``, ``mismatch_train`` and ``grid_shift`` are the Dice of the
    summed sums (:func:`pooled`); ``support`` holds the summed foreground and the support rule
    applied to it; ``plan`` the summed tiles and voxels; ``timing`` the summed seconds.

    Raises
    ------
    NormcheckError
        When a report lacks the soft foreground of its tile mismatch (a run stored before it
        existed): its soft mismatch cannot be combined honestly.
    """
    if not reports:
        raise NormcheckError("no region ran")
    supports = [r["support"] for r in reports]
    if any("mismatch_soft_foreground" not in s for s in supports):
        raise NormcheckError(
            "a region's report has no soft mismatch foreground (stored by an older version): "
            "rerun the sweep with --overwrite"
        )
    rule = MinForeground(**supports[0]["min_foreground"])
    # Soft sums of logits judge nothing (see run_support), pooled or not.
    probabilities = all(s.get("probabilities", True) for s in supports)

    def soft_mask(mass: list[float], voxels: int) -> list[bool]:
        return judged_mask(mass, voxels, rule) if probabilities else [False] * len(mass)

    n_voxels = sum(int(s["n_voxels"]) for s in supports)
    union = _summed([s["union_voxels"] for s in supports])
    soft_mass = _summed([s["soft_foreground"] for s in supports])
    support: dict[str, Any] = {
        "n_voxels": n_voxels,
        "union_voxels": [int(round(v)) for v in union],
        "judged": judged_mask(union, n_voxels, rule),
        "soft_foreground": soft_mass,
        "soft_judged": soft_mask(soft_mass, n_voxels),
        "probabilities": probabilities,
        "min_foreground": rule.to_dict(),
    }
    if all(s.get("foreground_voxels") for s in supports):
        support["foreground_voxels"] = {
            mode: [int(v) for v in _summed([s["foreground_voxels"][mode] for s in supports])]
            for mode in ("eval", "train")
        }
    for key in ("mismatch_judged", "mismatch_soft_judged"):
        support[key] = {}
    for key in ("mismatch_foreground_voxels", "mismatch_soft_foreground", "mismatch_n_voxels"):
        support[key] = {}
    for mode in supports[0]["mismatch_judged"]:
        pair_voxels = sum(int(s["mismatch_n_voxels"][mode]) for s in supports)
        hard_u = _summed([s["mismatch_foreground_voxels"][mode] for s in supports])
        soft_u = _summed([s["mismatch_soft_foreground"][mode] for s in supports])
        support["mismatch_n_voxels"][mode] = pair_voxels
        support["mismatch_foreground_voxels"][mode] = [int(round(v)) for v in hard_u]
        support["mismatch_soft_foreground"][mode] = soft_u
        support["mismatch_judged"][mode] = judged_mask(hard_u, pair_voxels, rule)
        support["mismatch_soft_judged"][mode] = soft_mask(soft_u, pair_voxels)

    combined: dict[str, Any] = {
        "disparity": {
            "hard": pooled(
                [r["disparity"]["hard"] for r in reports], [s["union_voxels"] for s in supports]
            ),
            "soft": pooled(
                [r["disparity"]["soft"] for r in reports], [s["soft_foreground"] for s in supports]
            ),
        },
        "mismatch_eval": _combined_mismatch(reports, "eval"),
        "mismatch_train": _combined_mismatch(reports, "train"),
        "support": support,
        "plan": {
            "n_tiles": sum(int((r.get("plan") or {}).get("n_tiles") or 0) for r in reports),
            "n_voxels": n_voxels,
        },
        "timing": {
            "total": sum(float((r.get("timing") or {}).get("total") or 0.0) for r in reports)
        },
    }
    shifts = [r.get("grid_shift") for r in reports]
    if all(shifts):
        combined["grid_shift"] = {}
        for mode in shifts[0]:
            entries = [s[mode] for s in shifts]
            hard_u = _summed([e["union_voxels"] for e in entries])
            soft_u = _summed([e["soft_foreground"] for e in entries])
            compared = sum(int(e["n_voxels"]) for e in entries)
            combined["grid_shift"][mode] = {
                "hard": pooled([e["hard"] for e in entries], [e["union_voxels"] for e in entries]),
                "soft": pooled(
                    [e["soft"] for e in entries], [e["soft_foreground"] for e in entries]
                ),
                "judged": judged_mask(hard_u, compared, rule),
                "soft_judged": soft_mask(soft_u, compared),
                "union_voxels": [int(round(v)) for v in hard_u],
                "soft_foreground": soft_u,
                "n_voxels": compared,
            }
        offsets = {tuple(r.get("grid_shift_offset") or ()) for r in reports}
        # The regions have one size, so one offset; keep the first otherwise (never expected).
        combined["grid_shift_offset"] = list(reports[0].get("grid_shift_offset") or [])
        if len(offsets) > 1:
            combined["grid_shift_offsets"] = [r.get("grid_shift_offset") for r in reports]
    return combined


def region_entry(box: Box, out: Any, report: dict[str, Any]) -> dict[str, Any]:
    """A region's own numbers in its setting's row (``regions``)."""
    return {
        "roi": [list(axis) for axis in box],
        "out": str(out),
        "disparity": report["disparity"],
        "mismatch_eval": report["mismatch_eval"],
        "grid_shift": report.get("grid_shift"),
        "seconds": round(float((report.get("timing") or {}).get("total") or 0.0), 3),
    }
