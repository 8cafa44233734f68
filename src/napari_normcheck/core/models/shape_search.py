"""Which input shapes a network takes: a working shape, then each axis's divisor on its own.

A 3D network may downsample z by 1, 2 or 4 while y and x go down by 16 or 32, pool with padding,
stride in some levels only, or refuse a bottleneck of one voxel (instance norm). So each axis is
searched while the others stay at a shape that works, and every answer is a forward that ran.
The strides seen in the first forward give a candidate divisor; a global pooling (Cellpose's style
vector, a squeeze-and-excitation gate) is no stride and is told apart by a forward at another size
(:mod:`~napari_normcheck.core.models.grid_steps`). Forwards then confirm the candidate, raise it
while they fail, and lower it while a smaller one works and passes every stride whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from napari_normcheck.core.models.grid_steps import (
    GlobalSteps,
    divides_cleanly,
    find_global_steps,
    global_candidates,
    remainder_watch,
    second_size,
    stride_hint,
)
from napari_normcheck.core.models.trials import StepWatch, Trial

# Cube sides tried first, smallest first: larger ones only when a small one collapses the grid.
PROBE_SIDES = {2: (64, 128, 256), 3: (32, 64, 128)}
MAX_DIVISOR = 64
# Errors of a Linear layer or a reshape fed by a grid of the wrong size: the model has a fixed size.
_MATMUL = re.compile(r"\((\d+)x(\d+) and (\d+)x(\d+)\)")
_VIEW = re.compile(r"shape '\[([-\d, ]+)\]' is invalid for input of size (\d+)")

# Errors of a grid too small somewhere inside (a bottleneck of one voxel, a kernel larger than the
# grid, a size check of the network's own): a larger input may work.
_SIZE_ERROR = re.compile(
    r"spatial element|value per channel|too small|greater than|divisible|must match|at least",
    re.IGNORECASE,
)

_TOO_SMALL = re.compile(r"spatial element|value per channel|too small|greater than", re.I)

# Runs one forward on the given spatial sides; ``watch=`` may stop it early (see run_trial).
TrialFn = Callable[..., Trial]


@dataclass
class AxisSizes:
    """Per-axis size rules declared by a package: ``min + n * step`` (step 0: fixed)."""

    minimum: tuple[int, ...]
    step: tuple[int, ...]

    def near(self, target: int) -> tuple[int, ...]:
        """The declared sizes closest to ``target`` on every axis (at least the minimum)."""
        return tuple(
            m if s == 0 else m + s * max(0, round((target - m) / s))
            for m, s in zip(self.minimum, self.step)
        )


@dataclass
class ShapeSearch:
    """What the search found.

    Attributes
    ----------
    base : Trial or None
        A forward that worked (None when none did).
    divisor : tuple of int
        Per axis.
    fixed : tuple of (int or None)
        Per axis, the only side that worked, or None.
    tried : list of Trial
        Every forward, in order.
    global_ops : tuple of str
        The ops found to pool whole maps (not downsampling), by name, once each.
    """

    base: Trial | None
    divisor: tuple[int, ...] = ()
    fixed: tuple[int | None, ...] = ()
    tried: list[Trial] = field(default_factory=list)
    global_ops: tuple[str, ...] = ()


def find_base(
    trial: TrialFn, dims: int, hint: AxisSizes | None
) -> tuple[Trial | None, list[Trial]]:
    """A shape the model takes: growing cubes (or a package's sizes), or the size a Linear needs."""
    tried: list[Trial] = []
    candidates = (
        [hint.near(side) for side in PROBE_SIDES[dims]]
        if hint is not None
        else [(side,) * dims for side in PROBE_SIDES[dims]]
    )
    for spatial in dict.fromkeys(candidates):
        result = trial(spatial)
        tried.append(result)
        if result.ok:
            return result, tried
        fixed = fixed_size_from_error(result)
        if fixed is not None:
            retry = trial(fixed)
            tried.append(retry)
            if retry.ok:
                return retry, tried
        # A grid strided down to a voxel or two may be too small for a layer (instance norm
        # refuses one voxel): larger may work. Any other failure would recur, only slower.
        too_small = result.collapsed() or _SIZE_ERROR.search(result.error or "")
        if result.error is not None and not too_small and result.output is None:
            break
    return None, tried


def fixed_size_from_error(result: Trial) -> tuple[int, ...] | None:
    """The cube side a Linear layer or a reshape asks for, from its size-mismatch error."""
    text = result.error or ""
    ratio = None
    if found := _MATMUL.search(text):
        ratio = int(found.group(3)) / int(found.group(2))
    elif found := _VIEW.search(text):
        wanted = [int(v) for v in found.group(1).split(",") if int(v) > 0]
        ratio = math.prod(wanted) / int(found.group(2))
    if not ratio or ratio == 1:
        return None
    dims = len(result.spatial)
    side = result.spatial[0] * ratio ** (1 / dims)
    if abs(side - round(side)) > 1e-6 or round(side) < 1:
        return None
    return (round(side),) * dims


def _trial_sides(base_side: int, divisor: int) -> tuple[int, int]:
    """Odd multiples of ``divisor``: the largest not above ``base_side``, the smallest above it.

    They are multiples of the divisor but of no larger power-of-two multiple of it, so a forward
    that works there confirms this divisor and not a coarser one. The one below is cheaper; the
    one above is tried when the one below was too small for some layer.
    """
    below = base_side // divisor
    below -= 1 - below % 2
    above = max(3, -(-base_side // divisor))
    above += 1 - above % 2
    # A trial on the base side itself would not show that other sizes work (a fixed size).
    first = divisor * below if below >= 1 and divisor * below != base_side else divisor * above
    return first, divisor * above


def _confirm(
    trial: TrialFn,
    base: Trial,
    axis: int,
    divisor: int,
    skip: GlobalSteps,
    watch: StepWatch | None = None,
) -> tuple[Trial | None, list[Trial]]:
    """A forward on an odd multiple of ``divisor`` along ``axis`` that worked, or None.

    The smaller odd multiple first; the larger one when that was too small for some layer (a
    watched forward: only when a layer said so).
    """
    tried = []
    for side in dict.fromkeys(_trial_sides(base.spatial[axis], divisor)):
        spatial = list(base.spatial)
        spatial[axis] = side
        result = trial(spatial, watch=watch) if watch is not None else trial(spatial)
        tried.append(result)
        if result.ok:
            return result, tried
        collapsed = watch is None and result.collapsed(skip)
        if not (collapsed or _TOO_SMALL.search(result.error or "")):
            break
    return None, tried


def _halved(divisor: int) -> int | None:
    """The next smaller divisor to try: half of an even one, 1 below an odd one."""
    if divisor <= 1:
        return None
    return divisor // 2 if divisor % 2 == 0 else 1


def axis_divisor(
    trial: TrialFn,
    base: Trial,
    axis: int,
    hint: int,
    step: int | None = None,
    global_steps: GlobalSteps = frozenset(),
) -> tuple[int | None, list[Trial]]:
    """The smallest divisor that forwards confirm, starting from ``hint`` (or a package's ``step``).

    Only ``axis`` changes; the others keep the base shape. Up from the hint while a forward on an
    odd multiple fails; when the hint itself works, down (halving) while a forward on an odd
    multiple of the smaller divisor works and passes every stride whole (a hint too large, from a
    step that was not a stride, is lowered; a network that pads odd grids keeps its downsampling).
    A package's declared step is not lowered. None when no size but the base side works (a fixed
    axis).
    """
    start = step or hint
    ladder = sorted(d for d in {start, *(2**k for k in range(7))} if d >= start)
    tried: list[Trial] = []
    for divisor in ladder:
        if divisor > max(MAX_DIVISOR, start):
            break
        confirmed, rung_tried = _confirm(trial, base, axis, divisor, global_steps)
        tried.extend(rung_tried)
        if confirmed is None:
            continue
        if divisor != start or step:
            return divisor, tried
        watch = remainder_watch(base, axis, global_steps)
        while (smaller := _halved(divisor)) is not None:
            lower, rung_tried = _confirm(trial, base, axis, smaller, global_steps, watch)
            tried.extend(rung_tried)
            if lower is None or not divides_cleanly(base, lower, axis, global_steps):
                break
            divisor = smaller
        return divisor, tried
    return None, tried


def search_shapes(trial: TrialFn, dims: int, hint: AxisSizes | None = None) -> ShapeSearch:
    """Find a working shape, then each axis's divisor (or its fixed side) by forwards.

    The divisor of an axis is the smallest that forwards confirm: tile sides that are multiples of
    it run, and pass every stride of the network whole. Global poolings are not strides.

    Parameters
    ----------
    trial : callable
        Runs one forward on the given spatial shape and returns a :class:`Trial`.
    dims : int
        2 or 3.
    hint : AxisSizes, optional
        A package's declared sizes (its steps are the divisors to confirm).

    Returns
    -------
    ShapeSearch
    """
    base, tried = find_base(trial, dims, hint)
    if base is None:
        return ShapeSearch(None, tried=tried)
    global_steps: GlobalSteps = frozenset()
    if hint is None and (axes := global_candidates(base)):
        # Some op reduced a map to one voxel: a global pooling or a stride; a second size tells.
        other = trial(second_size(base, axes))
        tried.append(other)
        global_steps = find_global_steps(base, other)
    hints = stride_hint(base, global_steps)
    divisor, fixed = [], []
    for axis in range(dims):
        step = hint.step[axis] if hint is not None else None
        if hint is not None and step == 0:
            divisor.append(base.spatial[axis])
            fixed.append(base.spatial[axis])
            continue
        found, axis_tried = axis_divisor(trial, base, axis, hints[axis], step, global_steps)
        tried.extend(axis_tried)
        divisor.append(found or base.spatial[axis])
        fixed.append(None if found else base.spatial[axis])
    pooled = dict.fromkeys(base.steps[index].op for index, _ in sorted(global_steps))
    return ShapeSearch(base, tuple(divisor), tuple(fixed), tried, tuple(pooled))
