"""Every output of a run, registered once: where it is stored, how it is computed, how it is shown.

Two kinds of outputs:

- :class:`VoxelOutput`: a map over the volume, written chunk by chunk (each prediction, the
  disparity) or tile pair by tile pair (the seams).
- :class:`TileMetric`: one value per tile and output channel, kept in each tile's record, written as
  a grid with one cell per tile, reported per tile and sortable in the widget's tile table.

The store (:mod:`~napari_normcheck.core.run.runsteps`), the tile loop, the report, the reader, the
widget's layers and tile table and the distributed merge all read these tuples. Adding a metric is
one :class:`TileMetric` entry plus its function in :mod:`~napari_normcheck.core.measure.tile_metrics`;
tile records travel whole between blocks, so the distributed merge needs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from napari_normcheck.core.measure import tile_metrics
from napari_normcheck.core.measure.tile_metrics import TileView

Group = Literal["prediction", "remedy", "disparity"]


@dataclass(frozen=True)
class Display:
    """How napari shows an output: a short layer name and ``add_image`` style keywords.

    Attributes
    ----------
    layer : str
        Short layer name (``"disparity"``); the channel's name is appended.
    colormap, blending : str
        napari colormap and blending.
    opacity : float
        Layer opacity.
    visible : bool
        Shown when added.
    group : str
        ``prediction``, ``remedy`` or ``disparity`` (what the widget groups and recolours).
    widget : bool
        The widget adds this layer for a run (the reader opens every output).
    contrast : tuple of float or None
        Contrast limits of the values as computed (a 0..1 fraction, say); ``None``: they follow
        the run's activation (probabilities 0..1, logits from the data). Stored uint8 values are
        shown over 0..255 either way.
    """

    layer: str
    colormap: str
    blending: str = "additive"
    opacity: float = 0.6
    visible: bool = True
    group: Group = "disparity"
    widget: bool = False
    contrast: tuple[float, float] | None = (0.0, 1.0)

    def style(self) -> dict[str, Any]:
        """``add_image`` keywords of the style (name, place and contrast are the caller's)."""
        return {
            "colormap": self.colormap,
            "blending": self.blending,
            "opacity": self.opacity,
            "visible": self.visible,
        }


ChunkFunction = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class VoxelOutput:
    """A voxel map in OUT.zarr, with the input's grid and the output channels first.

    Attributes
    ----------
    name : str
        The image group in OUT.zarr.
    needs : tuple of str
        The predictions it is computed from; it exists in a run that makes all of them.
    meaning : str
        Stored in the group's attributes.
    display : Display
        How napari shows it.
    compute : callable or None
        From a finished chunk's activated predictions by name, each ``(C, z, y, x)``, to the values
        stored (probabilities in ``[0, 1]`` after an activation). ``None``: written tile pair by
        tile pair (the seams).
    opt_in : str or None
        The boolean :class:`~napari_normcheck.core.base.config.RunConfig` field that turns it on.
    """

    name: str
    needs: tuple[str, ...]
    meaning: str
    display: Display
    compute: ChunkFunction | None = None
    opt_in: str | None = None

    @property
    def pyramid(self) -> bool:
        """Written per chunk, so every chunk writes its own coarser levels too."""
        return self.compute is not None

    def wanted(self, predictions: tuple[str, ...], config: Any) -> bool:
        """Whether a run making ``predictions`` with ``config`` writes this output."""
        if not set(self.needs) <= set(predictions):
            return False
        return self.opt_in is None or bool(getattr(config, self.opt_in))


def _prediction(name: str) -> ChunkFunction:
    def compute(probabilities: Mapping[str, np.ndarray]) -> np.ndarray:
        return probabilities[name]

    compute.__name__ = f"prediction_{name}"
    return compute


def _disparity(probabilities: Mapping[str, np.ndarray]) -> np.ndarray:
    # Arrays or tensors (a chunk's probabilities on the run's device).
    return _abs_difference(probabilities["train"], probabilities["eval"])


def _abs_difference(a: Any, b: Any) -> Any:
    """``abs(a - b)`` for arrays or tensors, the absolute value taken in the difference's memory."""
    difference = a - b
    if isinstance(difference, np.ndarray):
        return np.abs(difference, out=difference)
    return difference.abs_()


def _shift_diff(name: str) -> ChunkFunction:
    # The grid shift's comparer adds "shifted_<name>" to a finished chunk's predictions.
    def compute(probabilities: Mapping[str, np.ndarray]) -> np.ndarray:
        return _abs_difference(probabilities[name], probabilities[f"shifted_{name}"])

    compute.__name__ = f"shift_diff_{name}"
    return compute


_PREDICTION_STYLE = {"blending": "additive", "opacity": 0.6, "visible": False, "contrast": None}
# Predictions get one colour each: eval and train overlaid are white where they agree, green or
# magenta where they do not.
PREDICTION_DISPLAY = {
    "eval": Display("eval", "green", **_PREDICTION_STYLE, group="prediction", widget=True),
    "train": Display("train", "magenta", **_PREDICTION_STYLE, group="prediction", widget=True),
    "recalibrated": Display("recalibrated", "cyan", **_PREDICTION_STYLE, group="remedy"),
    "batchstats": Display("batch-stats", "yellow", **_PREDICTION_STYLE, group="remedy"),
}
PREDICTION_MEANING = {
    "eval": "eval-mode prediction (running statistics)",
    "train": "train-mode prediction (batch statistics, running statistics untouched)",
    "recalibrated": "eval-mode prediction of a copy with recalibrated running statistics",
    "batchstats": "eval-mode prediction with each tile normalized by its own statistics",
}


def prediction_group(name: str) -> str:
    """The OUT.zarr group of prediction ``name``: ``pred_<name>``."""
    return f"pred_{name}"


VOXEL_OUTPUTS: tuple[VoxelOutput, ...] = (
    *(
        VoxelOutput(
            prediction_group(name),
            (name,),
            PREDICTION_MEANING[name],
            PREDICTION_DISPLAY[name],
            compute=_prediction(name),
        )
        for name in PREDICTION_DISPLAY
    ),
    VoxelOutput(
        "disparity",
        ("eval", "train"),
        "|P_train - P_eval| per channel",
        # Shown first: the disparity is what to look at; eye icons compare the predictions.
        Display("disparity", "magma", opacity=0.8, widget=True),
        compute=_disparity,
    ),
    *(
        VoxelOutput(
            f"seams_{mode}",
            (mode,),
            f"largest |P_A - P_B| of overlapping tiles A, B ({mode} mode); zero where one tile "
            "covers a voxel",
            # Where overlapping tiles disagree: tiling artifacts show up here.
            Display(
                f"seams ({mode})",
                "cyan",
                opacity=0.8,
                visible=mode == "eval",
                widget=mode == "eval",
            ),
            opt_in="seams",
        )
        for mode in ("eval", "train")
    ),
    *(
        VoxelOutput(
            f"shift_diff_{mode}",
            (mode,),
            f"|P - P_shifted| of the stitched {mode} prediction against the one on the shifted grid "
            "(--grid-shift); zero where only one grid covers a voxel",
            # Where moving the grid changes the result: the seams of both grids, where they matter.
            # The widget adds both; only eval's is shown at first (the result users keep).
            Display(
                f"shift diff ({mode})", "yellow", opacity=0.7, visible=mode == "eval", widget=True
            ),
            compute=_shift_diff(mode),
            opt_in="grid_shift",
        )
        for mode in ("eval", "train")
    ),
)

TileFunction = Callable[[TileView], "list[float] | None"]
_GRID = {"blending": "translucent", "opacity": 0.4, "visible": False}


@dataclass(frozen=True)
class TileMetric:
    """One value per tile and output channel.

    Attributes
    ----------
    key : str
        The key in each tile's record, in the report's ``tiles`` and the per-tile CSV.
    meaning : str
        One line for the grid's attributes.
    compute : callable or None
        From the tile's :class:`~napari_normcheck.core.measure.tile_metrics.TileView` to a list per
        channel, or ``None`` where it does not apply (the key is then left out). ``None`` for the
        metrics of tile pairs, which the tile loop's mismatch tracker fills in at the end.
    grid : str or None
        The grid group in OUT.zarr (one cell per tile); ``None`` for none.
    display : Display or None
        How napari shows the grid.
    sort : str or None
        Its name in the widget's tile table sort choice; ``None`` when not offered.
    needs : tuple of str
        The predictions it is computed from.
    opt_in : str or None
        The :class:`~napari_normcheck.core.base.config.RunConfig` field that turns it on; such a
        metric is filled in by its own step when the run ends (the grid shift's), and a run
        without it has neither the key nor the grid.
    """

    key: str
    meaning: str
    compute: TileFunction | None = None
    grid: str | None = None
    display: Display | None = None
    sort: str | None = None
    needs: tuple[str, ...] = ("eval", "train")
    opt_in: str | None = None


TILE_METRICS: tuple[TileMetric, ...] = (
    TileMetric(
        "disparity_hard",
        "per-tile disparity hard (1 - Dice)",
        tile_metrics.disparity_hard,
        grid="tile_disparity",
        display=Display("tile disparity (hard)", "inferno", **_GRID),
    ),
    TileMetric(
        "disparity_soft",
        "per-tile disparity soft (1 - Dice)",
        tile_metrics.disparity_soft,
        grid="tile_disparity_soft",
        display=Display("tile disparity", "inferno", **_GRID, widget=True),
        sort="disparity",
    ),
    TileMetric(
        "disparity_argmax", "per-tile disparity of argmax classes", tile_metrics.disparity_argmax
    ),
    TileMetric(
        "flip_fraction",
        "per-tile fraction of voxels whose hard label differs between eval and train",
        tile_metrics.flip_fraction,
        grid="tile_flips",
        display=Display("tile flips", "plasma", **_GRID),
        sort="flips",
    ),
    TileMetric(
        "mismatch_eval",
        "per-tile mismatch eval (1 - Dice)",
        grid="tile_mismatch_eval",
        display=Display("tile mismatch", "viridis", **_GRID, widget=True),
        sort="mismatch (eval)",
        needs=("eval",),
    ),
    TileMetric(
        "mismatch_train",
        "per-tile mismatch train (1 - Dice)",
        grid="tile_mismatch_train",
        display=Display("tile mismatch (train)", "viridis", **_GRID),
        needs=("train",),
    ),
    TileMetric(
        "foreground_voxels",
        "per-tile hard foreground of eval and train together (|A| + |B|, the Dice's support)",
        tile_metrics.foreground_voxels,
    ),
    # Filled in when the run ends, from foreground_voxels and the run's min_foreground.
    TileMetric("judged", "per-tile: the hard disparity has enough foreground to be judged"),
    *(
        TileMetric(
            f"grid_shift_{mode}",
            f"per-tile grid shift {mode} (soft 1 - Dice of the stitched result against the shifted "
            "grid's, over the output chunks the tile writes)",
            grid=f"tile_grid_shift_{mode}",
            display=Display(f"tile grid shift ({mode})", "cividis", **_GRID),
            needs=(mode,),
            opt_in="grid_shift",
        )
        for mode in ("eval", "train")
    ),
)

#: The tile metrics of ``--grid-shift`` (filled in by :mod:`~napari_normcheck.core.run.grid_shift`).
GRID_SHIFT_METRICS: tuple[TileMetric, ...] = tuple(
    m for m in TILE_METRICS if m.opt_in == "grid_shift"
)


def voxel_outputs(predictions: tuple[str, ...], config: Any) -> tuple[VoxelOutput, ...]:
    """The voxel outputs a run making ``predictions`` with ``config`` writes, in registry order."""
    return tuple(o for o in VOXEL_OUTPUTS if o.wanted(predictions, config))


def tile_metrics_of(predictions: tuple[str, ...]) -> tuple[TileMetric, ...]:
    """The tile metrics a run making ``predictions`` computes, in registry order.

    Opt-in metrics are left out: their own step fills them in (:data:`GRID_SHIFT_METRICS`).
    """
    return tuple(m for m in TILE_METRICS if m.opt_in is None and set(m.needs) <= set(predictions))


def output_display() -> dict[str, Display]:
    """Every stored output with a display (voxel maps and tile grids), by group name."""
    shown = {o.name: o.display for o in VOXEL_OUTPUTS}
    shown |= {m.grid: m.display for m in TILE_METRICS if m.grid and m.display}
    return shown


#: The record key holding the judged flags (per channel) of each hard tile metric: a value whose
#: flag is false is kept in the record but shown as "-", ranks in no worst list and is NaN in its
#: grid (:mod:`~napari_normcheck.core.measure.support`). Metrics not named are always defined.
JUDGED_BY: dict[str, str] = {
    "disparity_hard": "judged",
    "disparity_argmax": "judged",
    **{f"mismatch_{name}": f"mismatch_{name}_judged" for name in PREDICTION_DISPLAY},
}
