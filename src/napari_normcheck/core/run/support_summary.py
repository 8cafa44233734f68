"""The run summary's ``support``: how much foreground each hard Dice rests on, and whether it counts.

See :mod:`~napari_normcheck.core.measure.support` for the rule and its default. The numbers are
exact: the global foreground is summed chunk by chunk with the disparity's Dice sums, the tile
mismatch's over the tile pairs' shared voxels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_normcheck.core.measure.metrics import DisparityAccumulator
from napari_normcheck.core.measure.mismatch import MismatchTracker
from napari_normcheck.core.measure.support import (
    DEFAULT_MIN_FOREGROUND,
    MinForeground,
    foreground_from_sums,
    judged_mask,
)


def min_foreground_of(params: dict[str, Any] | None) -> MinForeground:
    """The rule a run's stored parameters ask for (the default for a run stored before it existed)."""
    pair = (params or {}).get("min_foreground")
    return DEFAULT_MIN_FOREGROUND if pair is None else MinForeground(int(pair[0]), float(pair[1]))


def predictions_are_probabilities(attrs: dict[str, Any]) -> bool:
    """Whether a run's stored metadata says its predictions are probabilities.

    An activation of the run's own, or one inside the model (the probe's ``output_activation``
    that the command line and the widget record under ``model``), makes probabilities. A model
    whose probe outputs left 0..1 (``output_activation`` recorded as ``None``) with ``--activation
    none`` gives logits. A run that recorded nothing else counts as probabilities, as before (its
    soft sums still tell logits by a negative foreground: :func:`run_support`).
    """
    if (attrs.get("params") or {}).get("activation", "none") != "none":
        return True
    model = attrs.get("model") or {}
    return "output_activation" not in model or model["output_activation"] is not None


def run_support(
    disparity: DisparityAccumulator,
    mismatch: MismatchTracker,
    n_voxels: int,
    min_foreground: MinForeground,
    probabilities: bool = True,
) -> dict[str, Any]:
    """The summary's ``support`` entry.

    Parameters
    ----------
    disparity : DisparityAccumulator
        Eval against train over the whole ROI, every chunk added.
    mismatch : MismatchTracker
        Every tile pair's sums.
    n_voxels : int
        Voxels of the ROI (per channel).
    min_foreground : MinForeground
        The rule.
    probabilities : bool
        Whether the predictions are probabilities. Soft Dice sums of logits (``--activation
        none`` on a model without a sigmoid or softmax) mean nothing, and their "foreground" can
        be negative (which also tells logits): then no soft value is judged, and the entry
        ``probabilities`` says why.

    Returns
    -------
    dict
        ``foreground_fraction`` and ``foreground_voxels`` (``{"eval": [...], "train": [...]}``,
        each prediction's own hard foreground; ``None`` for a run resumed from progress saved
        before the counts existed), ``n_voxels``, ``union_voxels`` (``|A| + |B|`` per channel,
        what the rule judges), ``judged``, ``min_foreground``; ``soft_foreground``
        (``sum(p) + sum(q)`` per channel, the soft Dice's denominator in voxels) and
        ``soft_judged`` (the same rule on it: where neither is judged, the channel says nothing);
        for the tile mismatch per prediction ``mismatch_judged``, ``mismatch_soft_judged``,
        ``mismatch_foreground_voxels``, ``mismatch_soft_foreground`` (the soft Dice's
        denominator, so that runs can be pooled) and ``mismatch_n_voxels`` (voxels the pairs
        share).
    """

    def soft_mask(mass: list[float], voxels: int, rule: MinForeground) -> list[bool]:
        return judged_mask(mass, voxels, rule) if probabilities else [False] * len(mass)

    counts = disparity.foreground()
    zeros = np.zeros((2, disparity.n_channels))
    union = foreground_from_sums(disparity.sums.get("hard", zeros))
    soft_mass = [float(v) for v in np.asarray(disparity.sums.get("soft", zeros))[1]]
    probabilities = probabilities and not any(v < 0 for v in soft_mass)
    if counts is not None:
        per_mode = {"eval": counts[1], "train": counts[0]}
        voxels = {m: [int(v) for v in c] for m, c in per_mode.items()}
        fraction = {m: [float(v) / max(n_voxels, 1) for v in c] for m, c in per_mode.items()}
    else:
        voxels = fraction = None
    support: dict[str, Any] = {
        "foreground_fraction": fraction,
        "foreground_voxels": voxels,
        "n_voxels": int(n_voxels),
        "union_voxels": union,
        "judged": judged_mask(union, n_voxels, min_foreground),
        "min_foreground": min_foreground.to_dict(),
        "soft_foreground": soft_mass,
        "soft_judged": soft_mask(soft_mass, n_voxels, min_foreground),
        "probabilities": probabilities,
        "mismatch_judged": {},
        "mismatch_soft_judged": {},
        "mismatch_foreground_voxels": {},
        "mismatch_soft_foreground": {},
        "mismatch_n_voxels": {},
    }
    for name in mismatch.names:
        foreground, soft, pair_voxels = mismatch.support(name)
        support["mismatch_judged"][name] = judged_mask(foreground, pair_voxels, min_foreground)
        support["mismatch_soft_judged"][name] = soft_mask(soft, pair_voxels, min_foreground)
        support["mismatch_foreground_voxels"][name] = foreground
        support["mismatch_soft_foreground"][name] = soft
        support["mismatch_n_voxels"][name] = pair_voxels
    return support
