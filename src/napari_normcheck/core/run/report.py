"""The run report: a JSON contract for scripts, a per-tile CSV, and a short human summary.

The JSON's top-level keys ``disparity``, ``mismatch_eval``, ``mismatch_train`` (each
``{"hard": [per channel], "soft": [per channel]}``), ``tiles``, ``norm_layers``, ``params``,
``model_sha256``, ``versions`` and ``timing`` are a contract: keys may be added, never renamed.
Each tile's keys and the CSV's columns are ``index``, ``start``, ``stop``, the registered tile
metrics (:data:`~napari_normcheck.core.run.registry.TILE_METRICS`) and ``feature_z``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
from collections.abc import Container
from pathlib import Path
from typing import Any

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.run import registry


def tile_metric_keys(present: Container[str]) -> tuple[str, ...]:
    """The registered tile metrics' keys a report's tile carries, in registry order.

    ``present``: the keys of the tile's record (or of all records, for the CSV's columns).

    A metric with a grid has a value for every tile, so its key is always there (``null`` where the
    run did not compute it); one without (``disparity_argmax``) only where the record has it.
    """
    return tuple(m.key for m in registry.TILE_METRICS if m.grid is not None or m.key in present)


def tile_columns(tiles: list[dict[str, Any]]) -> tuple[str, ...]:
    """The per-tile CSV's columns: ``index``, ``start``, ``stop``, the tile metrics, ``feature_z``."""
    present = {key for tile in tiles for key in tile}
    return ("index", "start", "stop", *tile_metric_keys(present), "feature_z")


def software_versions() -> dict[str, str]:
    """Versions of the software that produced the numbers."""
    import dask
    import monai
    import numpy
    import torch
    import zarr

    from napari_normcheck import __version__

    return {
        "napari-normcheck": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
    }


def build_report(summary: dict[str, Any], store_attrs: dict[str, Any]) -> dict[str, Any]:
    """Assemble the report from a run's summary and its OUT.zarr ``normcheck`` attributes."""
    tiles = []
    for t in summary.get("tiles", []):
        columns = ("index", "start", "stop", *tile_metric_keys(t), "feature_z")
        tiles.append({**{key: t.get(key) for key in columns}, **t})
    model = store_attrs.get("model", {})
    return {
        "disparity": summary["disparity"],
        "mismatch_eval": summary["mismatch_eval"],
        "mismatch_train": summary["mismatch_train"],
        "tiles": tiles,
        "norm_layers": store_attrs.get("norm_layers"),
        "params": store_attrs.get("params"),
        "plan": store_attrs.get("plan"),
        "intensity": store_attrs.get("intensity"),
        "model_sha256": model.get("sha256"),
        "model": model,
        "source": store_attrs.get("source"),
        "out": summary.get("out"),
        "versions": software_versions(),
        "timing": summary.get("timing"),
        "precision_effect": summary.get("precision_effect"),
        "distributed": summary.get("distributed"),
        "verdict": verdict(summary),
    }


def write_report(path: str | Path, report: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``report`` as JSON (``.json``) or one CSV row per tile (``.csv``), atomically."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".csv"):
        raise NormcheckError(f"report {path} must end in .json or .csv")
    if path.exists() and not overwrite:
        raise NormcheckError(
            f"report {path} already exists; pass --overwrite or choose another name"
        )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps(report, indent=2))
        else:
            with tmp.open("w", newline="") as handle:
                writer = csv.writer(handle)
                columns = tile_columns(report["tiles"])
                writer.writerow(columns)
                for tile in report["tiles"]:
                    writer.writerow([_csv_value(tile.get(c)) for c in columns])
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise NormcheckError(f"cannot write report {path}: {error.strerror}") from None
    return path


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(_csv_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def verdict(summary: dict[str, Any]) -> str:
    """One line a biologist can act on."""
    disparity = max(summary["disparity"]["hard"], default=0.0)
    seams = max(summary["mismatch_eval"]["hard"], default=0.0)
    if disparity >= 0.1:
        text = (
            f"HIGH train/eval disparity ({disparity:.2f}): eval-mode predictions differ from what the "
            "network does with batch statistics; its running statistics do not fit this data."
        )
    elif disparity >= 0.02:
        text = f"moderate train/eval disparity ({disparity:.2f}): check the worst tiles."
    else:
        text = f"low train/eval disparity ({disparity:.3f})."
    if seams >= 0.05:
        text += f" Tiles disagree where they overlap (eval mismatch {seams:.2f}): expect seams."
    return text


def format_summary(report: dict[str, Any], worst: int = 5) -> str:
    """The short summary printed at the end of ``run``."""

    def per_channel(values: list[float]) -> str:
        return ", ".join(f"ch{c} {v:.3f}" for c, v in enumerate(values))

    lines = [
        f"train/eval disparity (hard): {per_channel(report['disparity']['hard'])}",
        f"train/eval disparity (soft): {per_channel(report['disparity']['soft'])}",
        f"tile mismatch eval  (hard):  {per_channel(report['mismatch_eval']['hard'])}",
        f"tile mismatch train (hard):  {per_channel(report['mismatch_train']['hard'])}",
    ]
    ranked = sorted(report["tiles"], key=lambda t: max(t["disparity_hard"]), reverse=True)[:worst]
    if ranked:
        lines.append(f"worst {len(ranked)} tiles by disparity:")
        for tile in ranked:
            box = " ".join(f"{a}:{b}" for a, b in zip(tile["start"], tile["stop"]))
            lines.append(
                f"  tile {tile['index']:>4} at z,y,x {box}: disparity {max(tile['disparity_hard']):.3f}"
            )
    effect = report.get("precision_effect")
    if effect:
        lines.append(
            f"{effect['precision']} against fp32 on {len(effect['tiles'])} tiles (1 - Dice, hard): "
            f"eval {per_channel(effect['eval']['hard'])}; train {per_channel(effect['train']['hard'])}"
        )
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)
