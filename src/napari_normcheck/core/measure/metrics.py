"""Train/eval disparity from accumulated sums.

Disparity per output channel is ``1 - Dice(P_train, P_eval)``:

- hard: Dice of the binarized maps ``p > threshold`` (and, for softmax outputs, of the argmax one-hot);
- soft: the fuzzy Dice ``2 * sum(min(p, q)) / (sum(p) + sum(q))``, which is exactly 1 for ``p == q``.

Empty against empty counts as agreement (Dice 1). Global values come from sums accumulated over the
stitched volume, chunk by chunk, never from a mean of per-tile values.

:func:`dice_sums` takes NumPy arrays or torch tensors: tensors on a CUDA GPU are summed there
(float64 sums in NumPy's order, :mod:`~napari_normcheck.core.measure.rowsums`), so only the sums
cross to the host; CPU tensors are NumPy's arrays (no copy), summed by NumPy's kernels, the fastest
there; other devices' tensors are copied to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from napari_normcheck.core.measure.rowsums import float64_row_sums, numpy_order_row_sums

if TYPE_CHECKING:
    import torch

DICE_KINDS = ("hard", "soft", "argmax")
#: Sum CPU tensors with the GPU's torch operations too (a test's way to run that path on the CPU);
#: otherwise they are summed as NumPy arrays, which is faster there and gives the same bits.
TORCH_SUMS_ON_CPU = False
#: The entry of :func:`dice_sums` (with ``counts=True``) holding the hard foreground of each map:
#: row 0 ``|A|`` (train), row 1 ``|B|`` (eval); not a Dice kind.
FOREGROUND = "foreground"


def dice_sums(
    p_train: np.ndarray | torch.Tensor,
    p_eval: np.ndarray | torch.Tensor,
    threshold: float,
    argmax: bool = False,
    counts: bool = False,
) -> dict[str, np.ndarray]:
    """Per-channel Dice numerators and denominators of two ``(C, ...)`` probability maps.

    Parameters
    ----------
    p_train, p_eval : numpy.ndarray or torch.Tensor
        Probabilities of the two modes, channel first (tensors on one device; both kinds give the
        same sums, bit for bit).
    threshold : float
        Foreground threshold for the hard Dice.
    argmax : bool
        Also compute the argmax one-hot Dice (softmax outputs).
    counts : bool
        Also return the foreground of each map apart, as entry :data:`FOREGROUND`.

    Returns
    -------
    dict
        ``{kind: array (2, C)}`` with row 0 = intersection term ``sum(A and B)`` (hard) or
        ``sum(min(p, q))`` (soft), row 1 = ``sum(A) + sum(B)``; float64. With ``counts``,
        ``FOREGROUND``: row 0 ``sum(A)`` (train), row 1 ``sum(B)`` (eval).

    Notes
    -----
    Every sum runs over one contiguous row per channel (several times faster than over strided
    views; a strided channel is copied first), in float64, in the order of
    ``row.sum(dtype=np.float64)``; ``p == q`` gives
    ``sum(min(p, q)) == sum(p)`` bit for bit, so identical maps have Dice exactly 1. Counts are
    exact.
    """
    if not isinstance(p_train, np.ndarray):
        if p_train.device.type == "cuda":
            return dice_sums_on_device(p_train, p_eval, threshold, argmax, counts)
        if TORCH_SUMS_ON_CPU and p_train.device.type == "cpu":
            return dice_sums_on_device(
                p_train, p_eval, threshold, argmax, counts, row_sums=numpy_order_row_sums
            )
        # The CPU's tensors are its arrays; other accelerators may lack float64: on the host.
        p_train, p_eval = p_train.cpu().numpy(), p_eval.cpu().numpy()
    sums, count_a, count_b = _host_sums(p_train, p_eval, threshold)
    if argmax:
        n = p_train.shape[0]
        ta = np.argmax(p_train, axis=0)
        ea = np.argmax(p_eval, axis=0)
        inter = np.array([np.count_nonzero((ta == c) & (ea == c)) for c in range(n)], float)
        total = np.array(
            [np.count_nonzero(ta == c) + np.count_nonzero(ea == c) for c in range(n)], float
        )
        sums["argmax"] = np.stack([inter, total])
    if counts:
        sums[FOREGROUND] = np.stack([count_a, count_b]).astype(np.float64)
    return sums


#: Values per step of :func:`_host_sums`: a multiple of NumPy's cast buffer (8192), and small
#: enough that a step's temporaries stay in the core's cache.
_STEP_BUFFERS = 8


def _host_sums(
    p_train: np.ndarray, p_eval: np.ndarray, threshold: float
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The hard and soft sums of :func:`dice_sums` on the host, a channel's row a step at a time.

    One pass over each row, in steps of a few of NumPy's cast buffers, with temporaries reused
    from step to step (whole-row temporaries cost more in page faults and cache misses than their
    arithmetic). The float64 sums are those of ``row.sum(dtype=np.float64)`` bit for bit: NumPy
    adds a row's buffers one after the other from 0, and a step whose length is a multiple of the
    buffer, started from the sum so far (``initial``), adds the same buffers in the same order.
    Counts are exact. Returns the sums and each map's count per channel.
    """
    n = p_train.shape[0]
    size = math.prod(p_train.shape[1:])
    step = max(1, min(size, _STEP_BUFFERS * np.getbufsize()))
    above_p = np.empty(step, dtype=bool)
    above_q = np.empty(step, dtype=bool)
    smaller = np.empty(step, dtype=np.float32)
    counts = np.zeros((3, n), dtype=np.int64)  # both, train, eval
    soft = np.zeros((3, n))  # sum of min, sum of train, sum of eval
    for c in range(n):
        p = _contiguous_row(p_train[c])
        q = _contiguous_row(p_eval[c])
        both = count_p = count_q = 0
        sum_min = sum_p = sum_q = 0.0
        for start in range(0, size, step):
            p_step, q_step = p[start : start + step], q[start : start + step]
            k = p_step.shape[0]
            a, b, m = above_p[:k], above_q[:k], smaller[:k]
            np.greater(p_step, threshold, out=a)
            np.greater(q_step, threshold, out=b)
            count_p += np.count_nonzero(a)
            count_q += np.count_nonzero(b)
            np.logical_and(a, b, out=a)
            both += np.count_nonzero(a)
            np.minimum(p_step, q_step, out=m)
            sum_min = np.add.reduce(m, dtype=np.float64, initial=sum_min)
            sum_p = np.add.reduce(p_step, dtype=np.float64, initial=sum_p)
            sum_q = np.add.reduce(q_step, dtype=np.float64, initial=sum_q)
        counts[:, c] = both, count_p, count_q
        soft[:, c] = sum_min, sum_p, sum_q
    sums = {
        "hard": np.stack([counts[0], counts[1] + counts[2]]).astype(np.float64),
        "soft": np.stack([soft[0], soft[1] + soft[2]]),
    }
    return sums, counts[1], counts[2]


def _contiguous_row(values: np.ndarray) -> np.ndarray:
    """One channel's values as a contiguous float32 row (a view where they already are one)."""
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1)


def dice_sums_on_device(
    p_train: torch.Tensor,
    p_eval: torch.Tensor,
    threshold: float,
    argmax: bool = False,
    counts: bool = False,
    row_sums=float64_row_sums,
) -> dict[str, np.ndarray]:
    """:func:`dice_sums` with torch operations where the tensors are; only the sums cross.

    Counts are exact integer sums; the float64 sums add in NumPy's order (``row_sums``), so the
    result is :func:`dice_sums`'s of the same values on the host, bit for bit.
    """
    import torch  # here: this module also serves the widget's tables, which need no torch

    n = p_train.shape[0]
    p = p_train.float().contiguous().reshape(n, -1)
    q = p_eval.float().contiguous().reshape(n, -1)
    a = p > threshold
    b = q > threshold
    count_a = a.sum(dim=1)
    count_b = b.sum(dim=1)
    inter = (a & b).sum(dim=1)
    hard = torch.stack([inter, count_a + count_b]).cpu().numpy().astype(np.float64)
    sums = {
        "hard": hard,
        "soft": np.stack([row_sums(torch.minimum(p, q)), row_sums(p) + row_sums(q)]),
    }
    if argmax:
        ta = p_train.argmax(dim=0)
        ea = p_eval.argmax(dim=0)
        classes = [(ta == c, ea == c) for c in range(n)]
        inter_c = torch.stack([(x & y).sum() for x, y in classes])
        total_c = torch.stack([x.sum() + y.sum() for x, y in classes])
        sums["argmax"] = torch.stack([inter_c, total_c]).cpu().numpy().astype(float)
    if counts:
        sums[FOREGROUND] = torch.stack([count_a, count_b]).cpu().numpy().astype(np.float64)
    return sums


def dice_from_sums(sums: np.ndarray) -> np.ndarray:
    """Dice per channel from ``(2, C)`` sums; 1 where both maps are empty."""
    inter, total = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), 1.0)


def disparity_from_sums(sums: np.ndarray) -> list[float]:
    """``1 - Dice`` per channel from ``(2, C)`` sums, as plain floats."""
    return [float(v) for v in 1.0 - dice_from_sums(sums)]


@dataclass
class DisparityAccumulator:
    """Global Dice sums over the stitched volume, added chunk by chunk.

    Besides the Dice kinds it keeps each map's hard foreground (entry :data:`FOREGROUND`), as long
    as every chunk's sums had it: a run resumed from progress saved before the counts existed has
    none (:meth:`foreground` is then ``None``), never a partial count.
    """

    n_channels: int
    threshold: float = 0.5
    argmax: bool = False
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, p_train: np.ndarray, p_eval: np.ndarray) -> dict[str, np.ndarray]:
        """Add the sums of one finished chunk (``(C, z, y, x)`` probabilities); return them."""
        sums = dice_sums(p_train, p_eval, self.threshold, self.argmax, counts=True)
        self.add_sums(sums)
        return sums

    def add_sums(self, sums: dict[str, np.ndarray]) -> None:
        """Add one chunk's sums computed elsewhere (a distributed block), in the caller's order."""
        counted = not self.sums or FOREGROUND in self.sums
        for kind, values in sums.items():
            if kind == FOREGROUND and not counted:
                continue
            self.sums[kind] = self.sums.get(kind, 0.0) + np.asarray(values, dtype=np.float64)
        if FOREGROUND not in sums:
            self.sums.pop(FOREGROUND, None)

    def result(self) -> dict[str, list[float]]:
        """``{"hard": [...], "soft": [...](, "argmax": [...])}`` disparity per channel."""
        if not self.sums:
            return {"hard": [0.0] * self.n_channels, "soft": [0.0] * self.n_channels}
        return {kind: disparity_from_sums(s) for kind, s in self.sums.items() if kind != FOREGROUND}

    def foreground(self) -> np.ndarray | None:
        """``(2, C)`` hard foreground voxels: row 0 train, row 1 eval; ``None`` when not counted."""
        if not self.sums:
            return np.zeros((2, self.n_channels))
        return self.sums.get(FOREGROUND)

    def to_dict(self) -> dict[str, list]:
        """The raw sums (for resume and for merging partial results)."""
        return {kind: s.tolist() for kind, s in self.sums.items()}

    def load(self, data: dict[str, list]) -> None:
        """Restore sums saved by :meth:`to_dict`."""
        self.sums = {kind: np.asarray(v, dtype=np.float64) for kind, v in data.items()}


def tile_disparity(
    p_train: np.ndarray, p_eval: np.ndarray, threshold: float, argmax: bool = False
) -> dict[str, list[float]]:
    """Disparity of one tile from its own two predictions (``(C, ...)`` probabilities)."""
    return {
        kind: disparity_from_sums(s)
        for kind, s in dice_sums(p_train, p_eval, threshold, argmax).items()
        if kind != FOREGROUND
    }
