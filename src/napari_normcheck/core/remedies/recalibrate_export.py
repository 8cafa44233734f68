"""Export a recalibrated model: a state_dict, its provenance, TorchScript for TorchScript input.

Nothing existing is ever replaced: every target is checked first, and each file is written to a
temporary name and hard-linked into place, which fails instead of overwriting a file that appeared
meanwhile. The user's own model file therefore can never be touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.remedies.recalibrate import RecalibrationResult


def export_paths(path: str | Path, scripted: bool) -> dict[str, Path]:
    """Files :func:`export_recalibrated` writes for ``path``: state_dict, provenance, TorchScript."""
    path = Path(path)
    paths = {"state_dict": path, "provenance": path.with_name(path.name + ".json")}
    if scripted:
        paths["torchscript"] = path.with_name(f"{path.stem}.scripted{path.suffix or '.pt'}")
    return paths


def export_recalibrated(
    result: RecalibrationResult, path: str | Path, *, input_path: str | Path | None = None
) -> dict[str, Path]:
    """Save the recalibrated model; existing files are never overwritten.

    A state_dict goes to ``path``, its provenance beside it (``path + ".json"``), and a scripted
    TorchScript copy (with the provenance inside) when the model is TorchScript.

    Parameters
    ----------
    result : RecalibrationResult
        From :func:`recalibrate`.
    path : path-like
        The state_dict file (``torch.load(path, weights_only=True)`` reads it back).
    input_path : path-like, optional
        The user's model file, named in the error when ``path`` is that file.

    Returns
    -------
    dict
        ``{"state_dict": Path, "provenance": Path(, "torchscript": Path)}``.

    Raises
    ------
    NormcheckError
        When any target exists, or its folder is missing or not writable.
    """
    scripted = isinstance(result.model, torch.jit.ScriptModule)
    paths = export_paths(path, scripted)
    if input_path is not None and Path(path).resolve() == Path(input_path).resolve():
        raise NormcheckError(
            f"{path} is the input model; choose another --out-model (the input is never replaced)"
        )
    for target in paths.values():
        if target.exists():
            raise NormcheckError(
                f"{target} already exists and is never overwritten; choose another --out-model"
            )
        parent = target.resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise NormcheckError(f"cannot write {target}: folder {parent} is missing or read-only")
    provenance = dict(
        result.provenance, holdout=result.holdout, files={k: str(v) for k, v in paths.items()}
    )
    state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
    text = json.dumps(provenance, indent=2)
    write_new_file(paths["provenance"], lambda f: f.write(text.encode()))
    write_new_file(paths["state_dict"], lambda f: torch.save(state, f))
    if scripted:
        extra = {"normcheck_recalibration.json": text}
        write_new_file(
            paths["torchscript"], lambda f: torch.jit.save(result.model, f, _extra_files=extra)
        )
    return paths


def write_new_file(path: Path, write) -> None:
    """Write through a temporary file, then hard-link it into place: fails rather than replace a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as stream:
            write(stream)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise NormcheckError(
                f"{path} appeared while exporting and is not overwritten; choose another name"
            ) from None
    finally:
        tmp.unlink(missing_ok=True)
