"""Does the stitched result depend on where the tiles fall? The shifted-grid check.

With ``RunConfig.grid_shift = F`` every prediction of the run is made a second time on a second
grid: the run's own plan (:func:`~napari_normcheck.core.base.tiling.plan_tiles`, MONAI's for
gaussian and constant blending) for the region cropped by ``s = round(F * step)`` voxels at its
start, ``step = max(1, int(tile * (1 - overlap)))`` as in MONAI (the tile in crop mode), per tiled
axis. An axis the region fills with one tile, or a tile one voxel thick (a 2D model's z), gets
``s = 0``. The second grid uses the run's intensity transform (computed once for the region, never
re-estimated on the crop) and is stitched the same way.

The indicator is ``1 - Dice(P, P_shifted)`` per channel, soft and hard, over the voxels both grids
cover, summed chunk by chunk over the stitched float predictions (never the rounded stored ones).
Hard values follow the support rule (:mod:`~napari_normcheck.core.measure.support`).

How it runs, through the one tile loop:

1. the shifted grid first: a :class:`~napari_normcheck.core.run.tileloop.TileLoop` over the
   shifted plan writes its activated predictions, float32, to ``shifted_pred_<name>`` (with its
   own resume bookkeeping, ``grid_shift_done`` in the progress file);
2. the main grid: as each of its chunks is finished, :class:`ShiftComparer` reads the shifted
   prediction of the chunk's common voxels, adds the Dice sums and hands the tile loop the values
   of ``shift_diff_<name>`` (``|P - P_shifted|``, zero where only one grid covers a voxel).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.tiling import TilePlan, plan_tiles
from napari_normcheck.core.io.pyramid import Pyramid
from napari_normcheck.core.io.store import OutputStore
from napari_normcheck.core.io.volume import Volume
from napari_normcheck.core.measure.metrics import dice_sums, disparity_from_sums
from napari_normcheck.core.measure.support import MinForeground, foreground_from_sums, judged_mask
from napari_normcheck.core.run.events import TileDone
from napari_normcheck.core.run.grids import write_tile_grids
from napari_normcheck.core.run.predictions import BoundPrediction
from napari_normcheck.core.run.region import ChunkIndex, whole_train_batches
from napari_normcheck.core.run.registry import GRID_SHIFT_METRICS
from napari_normcheck.core.run.runsetup import RunSetup
from napari_normcheck.core.run.save_pacing import SavePacing
from napari_normcheck.core.run.tileloop import TileLoop
from napari_normcheck.core.run.timing import Timing

#: The progress file's key listing the shifted grid's finished chunks.
DONE_KEY = "grid_shift_done"


def shifted_group(name: str) -> str:
    """The OUT.zarr group of prediction ``name`` on the shifted grid: ``shifted_pred_<name>``."""
    return f"shifted_pred_{name}"


def shift_offset(plan: TilePlan, fraction: float) -> tuple[int, int, int]:
    """``(sz, sy, sx)``: ``round(fraction * step)`` per tiled axis, 0 where nothing is tiled.

    ``step`` is MONAI's scan interval ``max(1, int(tile * (1 - overlap)))`` in blend modes and
    the tile in crop mode; an axis with one tile (or a tile one voxel thick) keeps ``s = 0``.
    """
    offset = []
    for d in range(3):
        if plan.grid_shape[d] <= 1 or plan.tile[d] <= 1:
            offset.append(0)
            continue
        step = (
            plan.tile[d] if plan.blend == "crop" else max(1, int(plan.tile[d] * (1 - plan.overlap)))
        )
        offset.append(int(round(fraction * step)))
    return tuple(offset)  # type: ignore[return-value]


def shifted_plan(plan: TilePlan, offset: tuple[int, int, int]) -> TilePlan:
    """The run's own plan for its region cropped by ``offset`` at the start."""
    roi = tuple((a + s, b) for a, b, s in zip(plan.roi_start, plan.roi_stop, offset))
    return plan_tiles(
        plan.volume_shape,
        plan.tile,
        overlap=plan.overlap,
        blend=plan.blend,
        halo=plan.halo,
        roi=roi,
    )


class ShiftComparer:
    """Each finished main-grid chunk against the stored shifted prediction (on the writer thread).

    Parameters
    ----------
    plan, shifted : TilePlan
        The main and the shifted plan.
    shifted_arrays : dict
        ``shifted_pred_<name>`` level 0 by prediction name (float32, the shifted plan's region).
    n_out : int
        Output channels.
    threshold : float
        Foreground threshold of the hard Dice.
    """

    def __init__(
        self,
        plan: TilePlan,
        shifted: TilePlan,
        shifted_arrays: Mapping[str, Any],
        n_out: int,
        threshold: float,
    ) -> None:
        self.plan = plan
        self.shifted = shifted
        self.shifted_arrays = dict(shifted_arrays)
        self.n_out = n_out
        self.threshold = threshold
        self.chunk_sums: dict[ChunkIndex, dict[str, dict[str, np.ndarray]]] = {}

    def add_chunk(
        self, chunk: ChunkIndex, slices: tuple[slice, ...], probabilities: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Sum the chunk's common voxels; return ``shifted_<name>`` values to add to its outputs.

        Outside the common voxels the returned values equal the main prediction, so
        ``|P - P_shifted|`` is zero there.
        """
        lo = [s.start + r for s, r in zip(slices, self.plan.roi_start)]
        hi = [s.stop + r for s, r in zip(slices, self.plan.roi_start)]
        common_lo = [max(a, b) for a, b in zip(lo, self.shifted.roi_start)]
        common_hi = [min(a, b) for a, b in zip(hi, self.shifted.roi_stop)]
        extra = {}
        sums = {}
        empty = any(a >= b for a, b in zip(common_lo, common_hi))
        inside = (slice(None), *(slice(a - s, b - s) for a, b, s in zip(common_lo, common_hi, lo)))
        stored = (
            slice(None),
            *(slice(a - r, b - r) for a, b, r in zip(common_lo, common_hi, self.shifted.roi_start)),
        )
        for name, values in probabilities.items():
            if name not in self.shifted_arrays:
                continue
            copy = values.copy()
            if not empty:
                other = np.asarray(self.shifted_arrays[name][stored], dtype=np.float32)
                copy[inside] = other
                sums[name] = dice_sums(values[inside], other, self.threshold, counts=True)
            extra[f"shifted_{name}"] = copy
        if sums:
            self.chunk_sums[chunk] = sums
        return extra

    def totals(self) -> dict[str, dict[str, np.ndarray]]:
        """Dice sums over every chunk added so far, by prediction name, in chunk order."""
        totals: dict[str, dict[str, np.ndarray]] = {}
        for chunk in sorted(self.chunk_sums):
            for name, sums in self.chunk_sums[chunk].items():
                into = totals.setdefault(name, {})
                for kind, values in sums.items():
                    into[kind] = into.get(kind, 0.0) + np.asarray(values, dtype=np.float64)
        return totals

    def tile_values(self, plan: TilePlan, record: dict[str, Any], name: str) -> list[float] | None:
        """Soft ``1 - Dice`` of the chunks ``record``'s tile writes (``None`` when none is common)."""
        ranges = plan.chunk_range(plan.get_tile(record["index"]))
        total = None
        for chunk in itertools.product(*(range(a, b) for a, b in ranges)):
            sums = self.chunk_sums.get(chunk, {}).get(name)
            if sums is not None:
                total = sums["soft"] + (0.0 if total is None else total)
        return None if total is None else disparity_from_sums(total)

    def tile_judged(
        self, plan: TilePlan, record: dict[str, Any], name: str, min_foreground: MinForeground
    ) -> list[bool] | None:
        """Whether :meth:`tile_values` rests on enough foreground, per channel (the support rule).

        The soft foreground ``sum(p) + sum(q)`` of the chunks ``record``'s tile writes, over their
        voxels both grids cover; ``None`` where no chunk is common.
        """
        ranges = plan.chunk_range(plan.get_tile(record["index"]))
        mass, n_voxels = None, 0
        for chunk in itertools.product(*(range(a, b) for a, b in ranges)):
            sums = self.chunk_sums.get(chunk, {}).get(name)
            if sums is None:
                continue
            mass = sums["soft"][1] + (0.0 if mass is None else mass)
            lo = [r + i * c for r, i, c in zip(plan.roi_start, chunk, plan.chunk_shape)]
            hi = [min(a + c, b) for a, c, b in zip(lo, plan.chunk_shape, plan.roi_stop)]
            n_voxels += math.prod(
                max(0, min(b, sb) - max(a, sa))
                for a, b, sa, sb in zip(lo, hi, self.shifted.roi_start, self.shifted.roi_stop)
            )
        return None if mass is None else judged_mask(mass, n_voxels, min_foreground)

    def to_dict(self) -> dict[str, Any]:
        """The per-chunk sums (for resume)."""
        return {
            ",".join(map(str, chunk)): {
                name: {kind: np.asarray(v).tolist() for kind, v in sums.items()}
                for name, sums in by_name.items()
            }
            for chunk, by_name in self.chunk_sums.items()
        }

    def load(self, data: Mapping[str, Any]) -> None:
        """Restore sums saved by :meth:`to_dict`."""
        for key, by_name in data.items():
            chunk = tuple(int(v) for v in key.split(","))
            self.chunk_sums[chunk] = {
                name: {kind: np.asarray(v, dtype=np.float64) for kind, v in sums.items()}
                for name, sums in by_name.items()
            }

    def result(self, min_foreground: MinForeground) -> dict[str, dict[str, Any]]:
        """The report's ``grid_shift``: per prediction ``hard``, ``soft`` and the support rule.

        ``judged`` / ``soft_judged`` say whether the hard / soft value rests on enough foreground
        (``union_voxels`` = ``|A| + |B|``, ``soft_foreground`` over ``n_voxels`` common voxels).
        """
        n_voxels = int(
            np.prod([b - a for a, b in zip(self.shifted.roi_start, self.shifted.roi_stop)])
        )
        result = {}
        for name, sums in self.totals().items():
            union = foreground_from_sums(sums["hard"])
            soft_mass = [float(v) for v in sums["soft"][1]]
            result[name] = {
                "hard": disparity_from_sums(sums["hard"]),
                "soft": disparity_from_sums(sums["soft"]),
                "judged": judged_mask(union, n_voxels, min_foreground),
                "soft_judged": judged_mask(soft_mass, n_voxels, min_foreground),
                "union_voxels": union,
                "soft_foreground": soft_mass,
                "n_voxels": n_voxels,
            }
        return result


def open_comparer(
    store: OutputStore, plan: TilePlan, config: RunConfig, names: Sequence[str], n_out: int
) -> ShiftComparer:
    """A comparer reading the shifted predictions a run stored (a distributed block's)."""
    shifted = shifted_plan(plan, shift_offset(plan, config.grid_shift))
    arrays = {name: store.array(shifted_group(name)) for name in names}
    return ShiftComparer(plan, shifted, arrays, n_out, config.threshold)


class GridShift:
    """The shifted grid of one run: its plan and outputs, its tile loop, and the comparer.

    Make it with :meth:`open` once OUT.zarr exists; run :meth:`run` before the main grid and give
    the main :class:`TileLoop` :attr:`comparer`; :meth:`finish` adds the per-tile values and
    returns the summary keys.
    """

    def __init__(
        self,
        setup: RunSetup,
        config: RunConfig,
        offset: tuple[int, int, int],
        arrays: dict[str, Pyramid],
        done_chunks: set[ChunkIndex],
    ) -> None:
        self.fraction = config.grid_shift
        self.offset = offset
        self.setup = dataclasses.replace(setup, plan=shifted_plan(setup.plan, offset))
        self.plan = self.setup.plan
        self.arrays = arrays
        self.done_chunks = done_chunks
        self.comparer = ShiftComparer(
            setup.plan,
            self.plan,
            {name: pyramid.arrays[0] for name, pyramid in arrays.items()},
            setup.n_out,
            config.threshold,
        )
        self.loop: TileLoop | None = None
        self.n_run = 0

    @classmethod
    def open(
        cls,
        store: OutputStore,
        config: RunConfig,
        setup: RunSetup,
        volume: Volume,
        names: Sequence[str],
        progress: Mapping[str, Any],
        *,
        resume: bool,
    ) -> GridShift:
        """Create (or, resuming, reopen) the shifted predictions in ``store``."""
        offset = shift_offset(setup.plan, config.grid_shift)
        plan = shifted_plan(setup.plan, offset)
        scale = tuple(volume.scale)
        translation = tuple(t + r * s for t, r, s in zip(volume.translation, plan.roi_start, scale))
        arrays = {}
        for name in names:
            group = shifted_group(name)
            if not (resume and group in store.root):
                store.create_image(
                    group,
                    (setup.n_out, *plan.roi_shape),
                    (1, *plan.chunk_shape),
                    "float32",
                    scale,
                    translation,
                    attrs={
                        "mode": name,
                        "meaning": f"{name} prediction on the grid shifted by {list(offset)}",
                        "grid_shift_offset": list(offset),
                    },
                )
            arrays[name] = store.pyramid(group)
        done = {tuple(c) for c in progress.get(DONE_KEY, [])}
        return cls(setup, config, offset, arrays, done)

    def progress(self) -> dict[str, Any]:
        """The progress file's entries of the shifted grid (its chunks finished so far)."""
        done = self.done_chunks if self.loop is None else self.loop.accumulator.done_chunks
        return {DONE_KEY: sorted(done)}

    def run(
        self,
        volume: Volume,
        config: RunConfig,
        predictions: Sequence[BoundPrediction],
        timing: Timing,
        scratch_dir: Any,
        *,
        n_main: int,
        t_start: float,
        save: Callable[[TileLoop], None],
        cancel: threading.Event | None = None,
    ) -> Iterator[TileDone]:
        """Predict the shifted grid's unfinished tiles, yielding progress (``n_total`` counts both).

        ``save(loop)``, called after every tile, writes the run's progress through ``loop``'s
        writer where a save is due (:class:`~napari_normcheck.core.run.save_pacing.SavePacing`);
        the loop stays open until :meth:`close`, so a final save after a cancel lists only
        written chunks.
        """
        # Predictions only: the shifted grid's own disparity, seams and features are not wanted.
        stored_config = config.replace(output_dtype="float32", seams=False)
        unhooked = [dataclasses.replace(p, recorder=None) for p in predictions]
        plan = self.plan
        # Every tile writing into an unfinished chunk reruns (whole train batches), as on resume;
        # the loop is told which, so its chunks and tile pairs count only those.
        needed = {
            t.index
            for t in plan.tiles()
            if not all(
                chunk in self.done_chunks
                for chunk in itertools.product(*(range(a, b) for a, b in plan.chunk_range(t)))
            )
        }
        needed = whole_train_batches(needed, config.train_batch, plan.n_tiles)
        tiles = [plan.get_tile(i) for i in sorted(needed)]
        self.loop = loop = TileLoop(
            volume,
            self.setup,
            stored_config,
            unhooked,
            {f"pred_{name}": pyramid for name, pyramid in self.arrays.items()},
            timing,
            scratch_dir,
            tiles=sorted(needed),
            done_chunks=self.done_chunks,
        )
        self.n_run = len(tiles)
        with contextlib.closing(loop.run(tiles)) as results:
            for n_done, result in enumerate(results, start=1):
                save(loop)
                yield TileDone(
                    result.tile,
                    n_done,
                    len(tiles) + n_main,
                    time.perf_counter() - t_start,
                    result.chunks_written,
                    {},
                )
                if cancel is not None and cancel.is_set():
                    return
        loop.flush()

    def run_alone(
        self,
        volume: Volume,
        config: RunConfig,
        predictions: Sequence[BoundPrediction],
        store: OutputStore,
        *,
        n_main: int,
        t_start: float,
        cancel: threading.Event | None = None,
    ) -> Iterator[TileDone]:
        """:meth:`run` with its own progress file (a distributed run, whose blocks keep theirs)."""
        pacing = SavePacing()

        def save(loop: TileLoop) -> None:
            if pacing.due():
                pacing.save(self.progress, store.write_progress, loop.write_after_pending)

        try:
            yield from self.run(
                volume,
                config,
                predictions,
                Timing(),
                store.path / ".scratch" / "grid_shift",
                n_main=n_main,
                t_start=t_start,
                save=save,
                cancel=cancel,
            )
        finally:
            self.close()
            store.write_progress(self.progress())

    def close(self) -> None:
        """Finish the shifted loop's pending writes and stop its threads."""
        if self.loop is not None:
            self.done_chunks = set(self.loop.accumulator.done_chunks)
            loop, self.loop = self.loop, None
            loop.close()

    def finish(
        self,
        store: OutputStore,
        records: dict[int, dict[str, Any]],
        cell_transform: tuple[tuple[float, ...], tuple[float, ...]],
        min_foreground: MinForeground,
    ) -> dict[str, Any]:
        """Add each tile's values to ``records``, write their grids; the summary's keys."""
        plan = self.comparer.plan
        names = list(self.arrays)
        for record in records.values():
            for name in names:
                values = self.comparer.tile_values(plan, record, name)
                if values is not None:
                    record[f"grid_shift_{name}"] = values
                    # The support rule of the soft value: "-" in the widget's table where not.
                    record[f"grid_shift_{name}_judged"] = self.comparer.tile_judged(
                        plan, record, name, min_foreground
                    )
        ordered = [records[i] for i in sorted(records)]
        metrics = tuple(m for m in GRID_SHIFT_METRICS if m.key.removeprefix("grid_shift_") in names)
        write_tile_grids(store, plan, ordered, self.setup.n_out, cell_transform, metrics)
        return {
            "grid_shift": self.comparer.result(min_foreground),
            "grid_shift_offset": list(self.offset),
            "grid_shift_fraction": self.fraction,
        }
