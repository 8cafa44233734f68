"""When a hard Dice can be judged: enough foreground in the two predictions together.

The hard disparity ``1 - Dice(A, B) = |A xor B| / (|A| + |B|)`` divides by the foreground of both
predictions. With little foreground it is unstable: on a channel where 101 voxels of a million
exceed the threshold, a few dozen voxels flipping at an object's edge read as "disparity 0.78",
and on an empty channel it is undefined (0 / 0; :mod:`~napari_normcheck.core.measure.metrics`
counts it as agreement). Metrics Reloaded (Maier-Hein et al., *Nature Methods* 21, 195-212, 2024)
warns for the same reasons against overlap metrics on small structures and empty references.
So a channel's (or a tile's, or a tile pair's) hard Dice is judged only where the foreground
``N = |A| + |B|`` passes both floors of :class:`MinForeground`; elsewhere its hard value is
"not judged" and the soft disparity, which weighs every voxel by its probability, speaks for it.

Why the default (``DEFAULT_MIN_FOREGROUND``: 1000 voxels and 0.1 % of the voxels compared):

- **1000 voxels.** The verdict's smallest step is 0.02 (low -> moderate; moderate -> high at 0.1).
  One voxel flipping changes ``|A xor B|`` by one and ``N`` by at most one, so the disparity moves
  by at most ``2 / N``: 0.002 at ``N = 1000``, a tenth of the smallest step. Disagreements that
  come from boundary jitter behave like counts: ``X = d * N`` flipped voxels fluctuate by about
  ``sqrt(X)``, the disparity by ``sqrt(d / N)``, i.e. at most ``1 / sqrt(N)``; at the moderate
  step (``d = 0.02``) that is 0.0045 for ``N = 1000``, under a quarter of the step, and 0.01 at
  the high step (a tenth of it). Fewer voxels (``N = 100``: 0.014 and 0.03) let noise alone move
  a verdict by a level. 1000 voxels are also a 10 x 10 x 10 cube: a structure a few voxels thick
  on every side, not a speck.
- **0.1 % of the voxels compared.** In a large region a thousand voxels are still a speck: on a
  512 x 512 x 30 stack (7.9 million voxels) the channel would be empty to the eye, and its Dice
  says nothing about the region. The fraction floor keeps a nearly empty channel of a large
  region unjudged; on a tile of 64^3 voxels it is 262 voxels, so there the voxel floor decides.

The soft disparity ``sum(|p - q|) / (sum(p) + sum(q))`` has the same form, with the soft
foreground ``sum(p) + sum(q)`` (in voxels) as denominator, and the same weakness: on a nearly
empty channel it compares background probabilities of 0.001 and 0.003. So it speaks for a
channel whose hard Dice is not judged only where its soft foreground passes the same floors;
where neither does, the channel is not judged at all (both predictions say "nothing here").

Both floors are an option (``--min-foreground VOXELS[,FRACTION]``; ``0,0`` judges everything, the
behaviour before the rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_normcheck.core.base.errors import NormcheckError


@dataclass(frozen=True)
class MinForeground:
    """The least foreground ``|A| + |B|`` a hard Dice is judged on: both floors must hold.

    Attributes
    ----------
    voxels : int
        Foreground voxels of the two predictions together.
    fraction : float
        The same count as a fraction of the voxels compared (``|A| + |B|`` over the region's
        voxels, so two full predictions give 2.0).
    """

    voxels: int = 1000
    fraction: float = 0.001

    def __post_init__(self) -> None:
        if self.voxels < 0 or not 0 <= self.fraction <= 2:
            raise NormcheckError(
                f"minimum foreground {self.voxels} voxels, {self.fraction} of the region: give "
                "voxels >= 0 and a fraction in [0, 2]"
            )

    def to_dict(self) -> dict[str, float]:
        """``{"voxels": int, "fraction": float}``."""
        return {"voxels": int(self.voxels), "fraction": float(self.fraction)}

    def describe(self) -> str:
        """``"1000 voxels and 0.1 % of the voxels compared"``."""
        return f"{self.voxels} voxels and {self.fraction * 100:g} % of the voxels compared"


DEFAULT_MIN_FOREGROUND = MinForeground()


def is_judged(
    foreground_voxels: float,
    n_voxels: float,
    min_foreground: MinForeground = DEFAULT_MIN_FOREGROUND,
) -> bool:
    """Whether a hard Dice over ``n_voxels`` voxels with ``|A| + |B| = foreground_voxels`` is judged.

    Both floors must hold; an empty region (``n_voxels == 0``) is never judged, an empty
    channel only with both floors at zero.
    """
    if n_voxels <= 0:
        return False
    return (
        foreground_voxels >= min_foreground.voxels
        and foreground_voxels / n_voxels >= min_foreground.fraction
    )


def judged_mask(
    foreground_voxels: Sequence[float] | np.ndarray,
    n_voxels: float,
    min_foreground: MinForeground = DEFAULT_MIN_FOREGROUND,
) -> list[bool]:
    """:func:`is_judged` per channel."""
    return [is_judged(float(f), n_voxels, min_foreground) for f in foreground_voxels]


def foreground_from_sums(sums: np.ndarray) -> list[int]:
    """``|A| + |B|`` per channel from a hard ``(2, C)`` Dice sums array (its denominator row)."""
    return [int(round(v)) for v in np.asarray(sums, dtype=np.float64)[1]]
