"""The sweep's plot: each indicator against tile size, one line per overlap and blending.

Drawn with matplotlib when it is installed (it is optional); the recommended setting is marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_normcheck.core.run.sweep import indicator

#: ``(title, row key, mode)``: what each panel shows (soft 1 - Dice of the first channel).
PANELS = (
    ("grid shift (eval)", "grid_shift", "eval"),
    ("grid shift (train)", "grid_shift", "train"),
    ("tile mismatch (eval)", "mismatch_eval", None),
    ("train/eval disparity", "disparity", None),
)


def plot_sweep(
    path: str | Path, rows: list[dict[str, Any]], recommendation: dict[str, Any]
) -> bool:
    """Write the plot to ``path`` (PNG or SVG); ``False`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ran = [r for r in rows if not r.get("refused")]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.5), squeeze=False)
    lines = sorted({(r["blend"], r["overlap"]) for r in ran}, key=str)
    for ax, (title, key, mode) in zip(axes[0], PANELS):
        for blend, overlap in lines:
            points = sorted(
                (r["tile"][-1], indicator(r, key, mode), r)
                for r in ran
                if (r["blend"], r["overlap"]) == (blend, overlap)
                and indicator(r, key, mode) is not None
            )
            if not points:
                continue
            label = blend if overlap is None else f"{blend}, overlap {overlap:g}"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            for side, value, row in points:
                if recommendation.get("tile") and all(
                    row[k] == recommendation[k] for k in ("tile", "overlap", "blend")
                ):
                    ax.plot([side], [value], marker="*", markersize=16, color="black")
        ax.set_title(title)
        ax.set_xlabel("tile side (x, voxels)")
        ax.set_ylabel("1 - Dice (soft)")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(str(path))
    plt.close(figure)
    return True
