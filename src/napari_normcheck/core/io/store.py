"""The OUT.zarr layout: OME-Zarr 0.5 image groups beside run metadata, written safely.

``OUT.zarr/`` (a zarr v3 group) holds one OME-Zarr image group per output (``pred_eval``, ``pred_train``,
later metrics), each with level ``0`` of shape ``(channel, z, y, x)`` and the input's voxel size and the
ROI's translation, so napari overlays it on the input. The root's ``normcheck`` attribute holds the run
parameters. A run is complete only when the root's ``normcheck_summary`` attribute (the run summary,
the completion marker) exists; it is written last.

Nothing but zarr nodes stays in a finished OUT, so zarr and OME-Zarr readers list it without warnings
("Object at ... is not recognized as a component of a Zarr hierarchy"): while a run writes, its
progress and an error log live in ``.normcheck/``, removed when the run completes. Stores written
before (``COMPLETE.json`` and ``progress.json`` at the root) are still read and resumed.

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

from napari_normcheck.core.base.errors import NormcheckError, OutputWriteError, first_line
from napari_normcheck.core.io.lock import OutLock
from napari_normcheck.core.io.pyramid import Pyramid, level_transform

SUMMARY_ATTR = "normcheck_summary"
RECORDS_DIR = ".normcheck"
PROGRESS_FILE = "progress.json"
ERROR_LOG = "error.log"
# Where stores written by earlier versions keep their marker and progress (still read).
OLD_COMPLETE_MARKER = "COMPLETE.json"
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


def _root_attrs(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


def is_complete(path: str | Path) -> bool:
    """Whether the run that wrote ``path`` finished (its completion marker exists)."""
    return SUMMARY_ATTR in _root_attrs(path) or (Path(path) / OLD_COMPLETE_MARKER).is_file()


def read_marker(path: str | Path) -> dict[str, Any]:
    """The completion marker's content (the run summary)."""
    summary = _root_attrs(path).get(SUMMARY_ATTR)
    if summary is not None:
        return summary
    return json.loads((Path(path) / OLD_COMPLETE_MARKER).read_text())


def records_dir(store_path: str | Path) -> Path:
    """The folder of an unfinished run's progress and error log inside its store."""
    return Path(store_path) / RECORDS_DIR


def read_progress(store_path: str | Path) -> dict[str, Any]:
    """What an interrupted run finished (empty when it saved nothing), new layout or old."""
    for path in (records_dir(store_path) / PROGRESS_FILE, Path(store_path) / PROGRESS_FILE):
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file.

    ``indent=None`` writes one line: Python's C encoder then does the work, several times faster
    than the indenting one (for files only programs read, such as the progress).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=indent, default=_json_default))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the previous file, and no half one
        raise


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
        # The run's lock on OUT (see :mod:`~napari_normcheck.core.io.lock`), when it holds one.
        self.lock: OutLock | None = None

    def release_lock(self) -> None:
        """Let other runs write OUT again (nothing when this store holds no lock)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
        try:
            if work != target and work.exists():
                shutil.rmtree(work)
            zarr.open_group(str(work), mode="w", zarr_format=3)
            store = cls(target, work)
            store.root.attrs["normcheck"] = {"kind": STORE_KIND, **attrs}
        except OSError as error:
            raise OutputWriteError(
                f"cannot create {target} ({error.strerror or first_line(error)}): its filesystem does not take "
                "files (read-only, full, or a pseudo-filesystem such as /proc); choose an --out "
                "on a writable disk"
            ) from error
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
        return read_progress(self.path)

    def write_progress(self, progress: dict[str, Any]) -> None:
        """Save what is finished, atomically (a crash leaves the previous complete file)."""
        folder = records_dir(self.path)
        folder.mkdir(exist_ok=True)
        write_json_atomic(folder / PROGRESS_FILE, progress, indent=None)

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
        """Write the completion marker last; swap the new OUT in place of an old one. Returns OUT.

        The marker is the root's ``normcheck_summary`` attribute (zarr writes ``zarr.json``
        atomically); the run's records (progress, an old error log) are removed after it.
        """
        self.root.attrs[SUMMARY_ATTR] = json.loads(json.dumps(summary, default=_json_default))
        shutil.rmtree(records_dir(self.path), ignore_errors=True)
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)  # an older version's, resumed
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
    if "://" in str(target):
        raise NormcheckError(
            f"cannot write {target}: OUT must be a folder on a filesystem (remote writes are not "
            "supported); write it locally and copy it"
        )
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
        raise NormcheckError(
            f"cannot write {target}: folder {parent} is not writable (a read-only disk, or no "
            "permission); make it writable or choose another --out"
        )
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


def saved_work(target: str | Path) -> str | None:
    """What an interrupted run left for ``--resume`` in OUT ``target``, in words; ``None`` if nothing.

    Counts the output chunks a single-process run listed as finished, or the blocks a distributed
    run recorded (``.blocks/``).
    """
    target = Path(target)
    inprogress = target.with_name(target.name + ".inprogress")
    work = inprogress if inprogress.exists() else target
    if not is_normcheck_store(work) or is_complete(work):
        return None
    plan = _root_attrs(work).get("normcheck", {}).get("plan", {})
    roi = [b - a for a, b in zip(plan.get("roi_start", []), plan.get("roi_stop", []))]
    grid = [-(-n // c) for n, c in zip(roi, plan.get("chunk_shape", []))]
    blocks = work / ".blocks"
    if (blocks / "manifest.json").is_file():
        per_block = json.loads((blocks / "manifest.json").read_text())["block_chunks"]
        n_blocks = int(np.prod([-(-g // b) for g, b in zip(grid, per_block)]))
        n_done = len(list(blocks.glob("block_*.json")))
        return f"{n_done} of {n_blocks} blocks"
    n_done = len(read_progress(work).get("done_chunks", []))
    return f"{n_done} of {int(np.prod(grid))} output chunks"
