"""Folders an interrupted run leaves inside OUT.zarr, and their removal once the run is complete.

A distributed run records its finished blocks in ``OUT.zarr/.blocks``
(:mod:`~napari_normcheck.core.run.manifest`); a single-process run that resumes such an output and
completes it removes them, without knowing anything else of the cluster.
"""

from __future__ import annotations

import shutil
from pathlib import Path

BLOCKS_DIR = ".blocks"


def blocks_dir(store_path: str | Path) -> Path:
    """The folder of block records inside a store."""
    return Path(store_path) / BLOCKS_DIR


def remove_block_records(store_path: str | Path) -> None:
    """Drop the block records of a completed run."""
    shutil.rmtree(blocks_dir(store_path), ignore_errors=True)
