"""The record of finished blocks of a distributed run, for resume: one atomic JSON file per block.

``OUT.zarr/.blocks/manifest.json`` holds the hash of the run configuration and the block shape; each
finished block writes ``block_NNNNNN.json`` (its metric sums and tile records) atomically, after its
chunks are on disk and tagged with the same hash. A block counts as finished only through its file,
never because its chunks exist (zarr v3 does not store chunks equal to the fill value). Files with
another hash (an earlier run with other settings) are ignored. The folder is removed once the run is
complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from napari_normcheck.core.io.store import write_json_atomic
from napari_normcheck.core.run.leftovers import blocks_dir

MANIFEST_FILE = "manifest.json"
# Run metadata that decides every number a block computes; a resumed run must match all of it.
HASHED_ATTRS = ("version", "params", "plan", "intensity", "source", "spatial_dims")


def config_hash(attrs: dict[str, Any], block_chunks: tuple[int, ...]) -> str:
    """SHA-256 of the run configuration (store metadata, model hash and block shape).

    Parameters
    ----------
    attrs : dict
        The store's ``normcheck`` metadata (:func:`~napari_normcheck.core.run.runsteps.run_attrs`).
    block_chunks : tuple of int
        Chunks per block.

    Returns
    -------
    str
        Hex digest.
    """
    content = {key: attrs.get(key) for key in HASHED_ATTRS}
    content["model_sha256"] = (attrs.get("model") or {}).get("sha256")
    content["block_chunks"] = [int(b) for b in block_chunks]
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(store_path: str | Path, digest: str, block_chunks: tuple[int, ...]) -> None:
    """Start a fresh record: drop earlier block files and write the manifest."""
    folder = blocks_dir(store_path)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_json_atomic(
        folder / MANIFEST_FILE,
        {"config_hash": digest, "block_chunks": [int(b) for b in block_chunks]},
    )


def read_manifest(store_path: str | Path) -> dict[str, Any] | None:
    """The manifest of an interrupted distributed run, or ``None`` when there is none."""
    path = blocks_dir(store_path) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def block_file(store_path: str | Path, index: int) -> Path:
    """Where block ``index`` records its result."""
    return blocks_dir(store_path) / f"block_{index:06d}.json"


def write_block_record(store_path: str | Path, record: dict[str, Any]) -> None:
    """Record a finished block (call it after the block's chunks are written)."""
    write_json_atomic(block_file(store_path, record["block"]), record)


def read_block_records(store_path: str | Path, digest: str) -> dict[int, dict[str, Any]]:
    """Finished blocks of the run with configuration hash ``digest``, by block index."""
    records = {}
    for path in sorted(blocks_dir(store_path).glob("block_*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:  # cannot happen with atomic writes; a foreign file is skipped
            continue
        if record.get("config_hash") == digest:
            records[int(record["block"])] = record
    return records
