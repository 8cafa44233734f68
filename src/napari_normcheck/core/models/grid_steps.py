"""Strides versus global poolings, told apart by comparing the grid steps of two forwards.

A stride divides the grid: twice the input, twice the output. A global pooling (Cellpose's style
vector, a squeeze-and-excitation gate, ``F.avg_pool2d(x, x.shape[2:])``) reduces the whole map to one
voxel whatever its size, so its output does not follow its input; it is no downsampling, and tile
sides need not be multiples of the map it pools. One forward cannot tell a whole-map pooling from a
2x2 pooling of a 2x2 map; a second forward at another size can.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from napari_normcheck.core.models.trials import GridStep, StepWatch, Trial, smallest_grid

# (index of the step in the forward, axis): the steps that are global along that axis.
GlobalSteps = frozenset[tuple[int, int]]


def _aligned(
    first: Sequence[GridStep], second: Sequence[GridStep]
) -> list[tuple[GridStep, GridStep]]:
    """Steps of two forwards paired in order, up to the first that is not the same op."""
    pairs = []
    for one, other in zip(first, second):
        if one.op != other.op:
            break
        pairs.append((one, other))
    return pairs


def _global_along(one: GridStep, other: GridStep, axis: int) -> bool:
    """The step reduced a map of two voxels or more to one at both sizes: global, not a stride."""
    return (
        one.output[axis] == other.output[axis] == 1
        and min(one.source[axis], other.source[axis]) >= 2
        and one.source[axis] != other.source[axis]
    )


def _reduced_to_one(step: GridStep, axis: int) -> bool:
    return step.shrinks(axis) and step.output[axis] == 1 and step.source[axis] >= 2


def global_candidates(base: Trial) -> list[int]:
    """Axes along which some step of ``base`` reduced a map to one voxel (global, or a stride)."""
    return [
        axis
        for axis in range(len(base.spatial))
        if any(_reduced_to_one(step, axis) for step in base.steps)
    ]


def second_size(base: Trial, axes: Sequence[int]) -> tuple[int, ...]:
    """Sides for the forward that tells global steps from strides along ``axes``.

    Half the base side (cheap) where every map reduced to one voxel has four or more: a global
    pooling still reduces two or more to one there, a stride gets one voxel or none. Where one had
    two or three, twice the side, on one such axis only (the forward costs twice the base, not
    eight times): a stride then gives two or more, a global pooling one.
    """
    sides = list(base.spatial)
    doubled = False
    for axis in axes:
        pooled = min(step.source[axis] for step in base.steps if _reduced_to_one(step, axis))
        if pooled >= 4:
            sides[axis] //= 2
        elif not doubled:
            sides[axis] *= 2
            doubled = True
    return tuple(sides)


def find_global_steps(base: Trial, other: Trial) -> GlobalSteps:
    """``(index, axis)`` of the steps of ``base`` that reduce the whole map along ``axis``.

    ``other`` is a forward at other sides (:func:`second_size`); it may have failed part way (its
    steps up to the error count). A step found global along a changed axis is global along the
    unchanged axes it also reduces to one voxel (a whole-map pooling pools every axis). A step
    that cannot be paired is taken for a stride, the safe side: a divisor too large is then
    lowered by the forwards that confirm it.
    """
    found = set()
    changed = [a for a, (n, m) in enumerate(zip(base.spatial, other.spatial)) if n != m]
    for index, (one, two) in enumerate(_aligned(base.steps, other.steps)):
        axes = [a for a in changed if one.shrinks(a) and _global_along(one, two, a)]
        if axes:
            found.update((index, a) for a in range(len(base.spatial)) if _reduced_to_one(one, a))
    return frozenset(found)


def stride_hint(base: Trial, global_steps: GlobalSteps = frozenset()) -> tuple[int, ...]:
    """Per axis, the downsampling the strided ops of the base forward showed (1 when none)."""
    smallest = smallest_grid(base.steps, len(base.spatial), global_steps)
    return tuple(
        1 if n is None else math.ceil(side / max(n, 1)) for side, n in zip(base.spatial, smallest)
    )


def _divides_as_at_base(
    index: int, one: GridStep, two: GridStep, axis: int, global_steps: GlobalSteps
) -> bool:
    """Step ``two`` scales ``axis`` as its base ``one`` does (global steps do not scale).

    A step that reduced four voxels or more to one at the base, and still reduces the map to one,
    is global even when the second size missed it (a stride of 2 cannot do that).
    """
    if (index, axis) in global_steps:
        return True
    if _global_along(one, two, axis) and one.source[axis] >= 4:
        return True
    if one.source[axis] == two.source[axis] == 1:  # a one-voxel map broadcast back
        return True
    return two.source[axis] * one.output[axis] == two.output[axis] * one.source[axis]


def remainder_watch(base: Trial, axis: int, global_steps: GlobalSteps) -> StepWatch:
    """Stops a forward at the first step that does not scale ``axis`` as in ``base``.

    A network that pads odd grids back (MONAI's BasicUNet) takes any side, but only multiples of
    its downsampling pass each stride whole, and those are the sides advised; once a stride leaves a
    remainder the rest of the forward cannot change that.
    """

    def watch(index: int, step: GridStep) -> str | None:
        if index >= len(base.steps) or base.steps[index].op != step.op:
            return f"{step.op} is not the base forward's step {index}"
        one = base.steps[index]
        if _divides_as_at_base(index, one, step, axis, global_steps):
            return None
        return f"{step.op} {step.source} -> {step.output} leaves a remainder"

    return watch


def divides_cleanly(base: Trial, other: Trial, axis: int, global_steps: GlobalSteps) -> bool:
    """Every step of ``other`` scales ``axis`` as in ``base``, and it ran the same steps."""
    if len(base.steps) != len(other.steps):
        return False
    pairs = _aligned(base.steps, other.steps)
    return len(pairs) == len(base.steps) and all(
        _divides_as_at_base(index, one, two, axis, global_steps)
        for index, (one, two) in enumerate(pairs)
    )
