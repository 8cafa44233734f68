"""The sweep's plot: each indicator against tile size, one line per overlap and blending.

One row of panels per output channel (named as the model names it), one panel per indicator. The
x axis is the tile's voxel count, labelled with the tiles themselves; the eval-mode tiling panels
draw the recommendation's limit, under which a setting qualifies, and the recommended setting is
a black star. Drawn with matplotlib when it is installed (the ``testing`` extra has it).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from napari_normcheck.core.run.report import channel_name
from napari_normcheck.core.run.sweep import channel_support, indicator, indicator_kind, n_channels

#: ``(title, row key, mode, limit drawn)``: what each panel shows (1 - Dice, as the
#: recommendation judges it: hard where the foreground suffices, else soft, drawn hollow).
PANELS = (
    ("grid shift (eval)", "grid_shift", "eval", True),
    ("tile mismatch (eval)", "mismatch_eval", None, True),
    ("grid shift (train)", "grid_shift", "train", False),
    ("train/eval disparity", "disparity", None, False),
)
#: Rows of panels at most: the channels with the most foreground when there are more.
MOST_CHANNELS = 4


def plotted_channels(rows: list[dict[str, Any]]) -> list[int]:
    """The channels drawn: all, or the :data:`MOST_CHANNELS` with most foreground, in order."""
    support = channel_support(rows)
    channels = list(range(n_channels(rows)))
    if len(channels) > MOST_CHANNELS:
        channels = sorted(sorted(channels, key=lambda c: -support[c])[:MOST_CHANNELS])
    return channels


def _tile_label(tile: list[int]) -> str:
    return "×".join(map(str, tile))


def _is_recommended(row: dict[str, Any], recommendation: dict[str, Any]) -> bool:
    return bool(recommendation.get("tile")) and all(
        row.get(k) == recommendation.get(k) for k in ("tile", "overlap", "blend")
    )


def plot_sweep(
    path: str | Path,
    rows: list[dict[str, Any]],
    recommendation: dict[str, Any],
    channel_names: list[str] | None = None,
) -> bool:
    """Write the plot to ``path`` (PNG or SVG); ``False`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import rc_context
    except ImportError:
        return False
    # SVG text stays text: searchable, and editable in a figure editor.
    with rc_context({"svg.fonttype": "none"}):
        _draw(plt, path, rows, recommendation, channel_names)
    return True


def _draw(plt: Any, path, rows, recommendation, channel_names) -> None:
    ran = [r for r in rows if not r.get("refused")]
    channels = plotted_channels(rows) or [0]
    panels = [p for p in PANELS if any(indicator(r, p[1], p[2]) is not None for r in ran)]
    panels = panels or list(PANELS[-1:])
    figure, axes = plt.subplots(
        len(channels),
        len(panels),
        figsize=(3.6 * len(panels), 2.7 * len(channels) + 1.3),
        squeeze=False,
        sharex=True,
    )
    lines = sorted({(r["blend"], r["overlap"]) for r in ran}, key=str)
    tiles = sorted({tuple(r["tile"]) for r in ran}, key=math.prod)
    limit = recommendation.get("limit")
    for row_axes, channel in zip(axes, channels):
        name = channel_name(channel, channel_names)
        for ax, (title, key, mode, with_limit) in zip(row_axes, panels):
            highest = limit if with_limit and limit is not None else 0.0
            for blend, overlap in lines:
                points = sorted(
                    (
                        (math.prod(r["tile"]), value, r)
                        for r in ran
                        if (r["blend"], r["overlap"]) == (blend, overlap)
                        and (value := indicator(r, key, mode, channel)) is not None
                    ),
                    key=lambda p: p[0],
                )
                highest = max([highest, *(p[1] for p in points)])
                if not points:
                    continue
                label = blend if overlap is None else f"{blend}, overlap {overlap:g}"
                (line,) = ax.plot(
                    [p[0] for p in points], [p[1] for p in points], marker="o", label=label
                )
                soft = [p for p in points if indicator_kind(p[2], key, mode, channel) == "soft"]
                if soft:
                    ax.plot(
                        [p[0] for p in soft], [p[1] for p in soft], marker="o", linestyle="none",
                        markerfacecolor="white", color=line.get_color(),
                        label="hollow: soft (too little foreground for hard)",
                    )  # fmt: skip
                for size, value, row in points:
                    if _is_recommended(row, recommendation):
                        ax.plot(
                            [size], [value], marker="*", markersize=17, color="black", zorder=5,
                            linestyle="none", label="recommended",
                        )  # fmt: skip
            if with_limit and limit is not None:
                ax.axhline(
                    limit, color="grey", linestyle="--", linewidth=1, label=f"limit {limit:g}"
                )
            ax.set_title(f"{title}\n{name}", fontsize="medium")
            ax.set_ylim(0, highest * 1.15 or 1.0)
            ax.grid(alpha=0.3)
            ax.set_xscale("log")
            ax.set_xticks([math.prod(t) for t in tiles])
            ax.set_xticklabels([_tile_label(list(t)) for t in tiles], rotation=30, ha="right")
            ax.minorticks_off()
        row_axes[0].set_ylabel("1 − Dice (hard where judged)")
    for ax in axes[-1]:
        ax.set_xlabel("tile (z×y×x voxels)")
    unique: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            unique.setdefault(label, handle)
    refused = [_tile_label(r["tile"]) + f" {r['blend']}" for r in rows if r.get("refused")]
    text = "recommendation: " + recommendation.get("text", "")
    if refused:
        text += f"\nrefused (not drawn): {', '.join(refused)}"
    wrapped = textwrap.wrap(text, width=int(34 * len(panels)))[:5]
    height = figure.get_figheight()
    figure.suptitle("\n".join(wrapped), fontsize="small", x=0.01, y=0.995, ha="left", va="top")
    figure.legend(
        unique.values(),
        unique.keys(),
        loc="lower center",
        ncol=min(len(unique), 5),
        fontsize="small",
        frameon=False,
    )
    # Room for the legend below (tight_layout leaves room for the text above itself).
    figure.tight_layout(rect=(0, 0.4 / height, 1, 1))
    figure.savefig(str(path), dpi=100)
    plt.close(figure)
