"""The OUT.zarr layout: OME-Zarr 0.5 image groups beside run metadata, written safely.

``OUT.zarr/`` (a zarr v3 group) holds one OME-Zarr image group per output (``pred_eval``, ``pred_train``,
later metrics), each with level ``0`` of shape ``(channel, z, y, x)`` and the input's voxel size and the
ROI's translation, so napari overlays it on the input. The root's ``normcheck`` attribute holds the run
parameters. A run is complete only when the ``COMPLETE.json`` marker exists; it is written last.

An existing OUT is never written into without ``overwrite``; with it, the new run is built beside the old
one and swapped in only when complete, so a failed run never destroys an earlier complete result.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.pyramid import Pyramid, level_transform

COMPLETE_MARKER = "COMPLETE.json"
PROGRESS_FILE = "progress.json"
STORE_KIND = "napari-normcheck output"


def is_normcheck_store(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by napari-normcheck (complete or not)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("normcheck", {}).get("kind") == STORE_KIND


def is_complete(path: str | Path) -> bool:
    """Whether the run that wrote ``path`` finished (its completion marker exists)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def read_marker(path: str | Path) -> dict[str, Any]:
    """The completion marker's content (the run summary)."""
    return json.loads((Path(path) / COMPLETE_MARKER).read_text())


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def ome_image_attrs(
    name: str,
    scale: tuple[float, ...],
    translation: tuple[float, ...],
    axes: tuple[str, ...] = ("c", "z", "y", "x"),
    levels: int = 0,
) -> dict[str, Any]:
    """OME-Zarr 0.5 ``multiscales`` attributes of an image group with ``1 + levels`` levels.

    Parameters
    ----------
    name : str
        Image name.
    scale, translation : tuple of float
        Spatial voxel size and origin ``(z, y, x)``; leading non-spatial axes get scale 1, offset 0.
    axes : tuple of str
        Axis names; ``c`` is a channel axis, ``z``/``y``/``x`` are space.
    levels : int
        Downsampled levels ``1 .. levels`` beside ``0`` (y and x halved per level).

    Returns
    -------
    dict
        The ``ome`` attribute content.
    """
    n_extra = len(axes) - len(scale)
    kinds = {"c": "channel", "z": "space", "y": "space", "x": "space"}
    axis_meta = [{"name": a, "type": kinds[a]} if a in kinds else {"name": a} for a in axes]
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": axis_meta,
                "datasets": [
                    {
                        "path": str(level),
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0] * n_extra + level_scale},
                            {"type": "translation", "translation": [0.0] * n_extra + level_shift},
                        ],
                    }
                    for level in range(levels + 1)
                    for level_scale, level_shift in [level_transform(scale, translation, level)]
                ],
            }
        ],
    }


class OutputStore:
    """An OUT.zarr being written.

    Use :meth:`create` to start a run; :meth:`finish` writes the completion marker and, when an earlier
    complete OUT was being replaced, swaps the new one in.
    """

    def __init__(self, target: Path, work_path: Path) -> None:
        self.target = target
        self.path = work_path
        self.root = zarr.open_group(str(work_path), mode="a", zarr_format=3)

    @classmethod
    def create(cls, target: str | Path, *, overwrite: bool, attrs: dict[str, Any]) -> OutputStore:
        """Start a new output store at ``target``.

        Parameters
        ----------
        target : path-like
            Where the finished OUT.zarr must end up.
        overwrite : bool
            Replace an earlier napari-normcheck output at ``target`` (only once the new run completes).
        attrs : dict
            Run metadata stored under the root's ``normcheck`` attribute.

        Raises
        ------
        NormcheckError
            When ``target`` exists and ``overwrite`` is false, when it exists but is not a
            napari-normcheck output (never deleted), or when its folder is not writable.
        """
        target = Path(target)
        work = check_output_target(target, overwrite=overwrite, resume=False)
        if work != target and work.exists():
            shutil.rmtree(work)
        zarr.open_group(str(work), mode="w", zarr_format=3)
        store = cls(target, work)
        store.root.attrs["normcheck"] = {"kind": STORE_KIND, **attrs}
        return store

    @classmethod
    def reopen(
        cls, target: str | Path, attrs: dict[str, Any], same: tuple[str, ...]
    ) -> OutputStore:
        """Reopen an interrupted run's store to resume it.

        Parameters
        ----------
        target : path-like
            The OUT.zarr of the interrupted run (or its ``.inprogress`` sibling when it was replacing
            an earlier output).
        attrs : dict
            This run's metadata; the keys in ``same`` must equal the stored ones.
        same : tuple of str
            Metadata that must not change between the interrupted and the resumed run.

        Raises
        ------
        NormcheckError
            When there is nothing to resume, the run already finished, or parameters differ.
        """
        target = Path(target)
        store = cls(target, check_output_target(target, overwrite=False, resume=True))
        stored = json.loads(json.dumps(dict(store.root.attrs["normcheck"]), default=_json_default))
        fresh = json.loads(json.dumps(attrs, default=_json_default))
        for key in same:
            was, now = stored.get(key), fresh.get(key)
            if isinstance(was, dict) and isinstance(now, dict):
                # A parameter added after the interrupted run was stored is not compared.
                now = {k: v for k, v in now.items() if k in was}
            if was != now:
                raise NormcheckError(
                    f"cannot resume {target}: its {key} differ from this run's; use the interrupted "
                    "run's options, or start again with --overwrite"
                )
        return store

    def read_progress(self) -> dict[str, Any]:
        """What an interrupted run finished (empty when it saved nothing)."""
        path = self.path / PROGRESS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_progress(self, progress: dict[str, Any]) -> None:
        """Save what is finished, atomically (a crash leaves the previous complete file)."""
        write_json_atomic(self.path / PROGRESS_FILE, progress)

    def create_image(
        self,
        name: str,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: str,
        scale: tuple[float, ...],
        translation: tuple[float, ...],
        attrs: dict[str, Any] | None = None,
        axes: tuple[str, ...] = ("c", "z", "y", "x"),
        levels: int = 0,
    ) -> zarr.Array:
        """Create the OME-Zarr image group ``name`` and return its level ``0``.

        With ``levels``, levels ``1 .. levels`` are created too, y and x halved per level, their
        chunks the level-0 chunks halved likewise (see :mod:`~napari_normcheck.core.io.pyramid`).
        """
        group = self.root.create_group(name, overwrite=True)
        group.attrs["ome"] = ome_image_attrs(name, scale, translation, axes, levels)
        if attrs:
            group.attrs["normcheck"] = attrs
        fill = 0 if np.dtype(dtype).kind in "iu" else 0.0
        # LZ4 with byte shuffle: several times faster than zarr's default zstd on probabilities, so
        # compressing outputs does not slow the model down on few cores.
        compressor = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
        arrays = []
        for level in range(levels + 1):
            factor = 2**level
            arrays.append(
                group.create_array(
                    str(level),
                    shape=(*shape[:-2], *(-(-n // factor) for n in shape[-2:])),
                    chunks=(*chunks[:-2], *(c // factor for c in chunks[-2:])),
                    dtype=dtype,
                    fill_value=fill,
                    dimension_names=axes,
                    compressors=compressor,
                )
            )
        return arrays[0]

    def array(self, name: str) -> zarr.Array:
        """Level 0 of image ``name``."""
        return self.root[f"{name}/0"]

    def pyramid(self, name: str) -> Pyramid:
        """Every level of image ``name``, as its ``multiscales`` metadata lists them."""
        group = self.root[name]
        datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
        return Pyramid([group[d["path"]] for d in datasets])

    def finish(self, summary: dict[str, Any]) -> Path:
        """Write the completion marker last; swap the new OUT in place of an old one. Returns OUT."""
        write_json_atomic(self.path / COMPLETE_MARKER, summary)
        if self.path != self.target:
            old = self.target.with_name(self.target.name + f".old-{os.getpid()}")
            os.replace(self.target, old)
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)
            self.path = self.target
        return self.target


def check_output_target(target: str | Path, *, overwrite: bool, resume: bool) -> Path:
    """Check, writing nothing, that a run may write ``target``; return the folder it works in.

    Called before the store is created, and before any long work (the remedies' recalibration)
    that would otherwise end in the same error.

    Raises
    ------
    NormcheckError
        For a new run: ``target`` exists and ``overwrite`` is false, it exists but is not a
        napari-normcheck output (never deleted), or its folder is missing or not writable. For a
        resumed run: there is no interrupted napari-normcheck run there, or it already finished.
    """
    target = Path(target)
    if resume:
        work = target.with_name(target.name + ".inprogress")
        if not work.exists():
            work = target
        if not is_normcheck_store(work):
            raise NormcheckError(f"nothing to resume: {target} is not a napari-normcheck output")
        if is_complete(work):
            raise NormcheckError(f"{target} is already complete; nothing to resume")
        return work
    parent = target.resolve().parent
    if not parent.is_dir():
        raise NormcheckError(f"cannot write {target}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise NormcheckError(f"cannot write {target}: folder {parent} is not writable")
    if not target.exists():
        return target
    if not overwrite:
        raise NormcheckError(
            f"output {target} already exists; pass --overwrite to replace it, "
            "--resume to continue it, or choose another --out"
        )
    if not (is_normcheck_store(target) or (target.is_dir() and not any(target.iterdir()))):
        raise NormcheckError(
            f"output {target} exists and is not a napari-normcheck output; "
            "it is not overwritten: choose another --out"
        )
    return target.with_name(target.name + ".inprogress")
