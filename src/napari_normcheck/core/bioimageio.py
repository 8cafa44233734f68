"""Offline bioimage.io model packages: read ``rdf.yaml``, load the weights, map the processing.

A package is a folder, or a ``.zip`` of one, holding ``rdf.yaml`` (or ``bioimageio.yaml``) in
format 0.4 or 0.5, weights, and a test input and output. Nothing is downloaded. TorchScript
weights are preferred because loading them runs no Python code; a ``pytorch_state_dict`` whose
architecture is a source file in the package runs that file, which needs the same explicit trust
as a pickle (``trust_pickle=True`` / ``--trust-pickle``).

The package's preprocessing is mapped to one intensity spec of
:mod:`napari_normcheck.core.intensity` (statistics computed once over the whole volume, never
per tile); ``notes`` say where the mapping is not exact.

Zip extraction lives in :mod:`napari_normcheck.core.package_zip` and the processing mapping in
:mod:`napari_normcheck.core.bioimageio_processing`; their public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_normcheck.core.bioimageio_processing import (
    apply_postprocessing,
    apply_preprocessing,
    map_postprocessing,
    map_preprocessing,
)
from napari_normcheck.core.errors import NormcheckError
from napari_normcheck.core.models import LoadedModel, file_sha256, load_model
from napari_normcheck.core.modes import normalization_mode
from napari_normcheck.core.package_zip import extract_package

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
# Tolerance of --verify when a package names none (bioimage.io's core uses the same defaults).
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4
_SPATIAL = ("z", "y", "x")


@dataclass
class Package:
    """A bioimage.io package read from disk.

    Attributes
    ----------
    source : Path
        The folder or zip the user gave.
    root : Path
        The folder holding the rdf (the extraction folder for a zip).
    rdf : dict
        The parsed rdf.
    format_version : str
        ``format_version`` of the rdf.
    """

    source: Path
    root: Path
    rdf: dict[str, Any]
    format_version: str

    @property
    def is_v05(self) -> bool:
        """True for format 0.5 field names."""
        return self.format_version.startswith("0.5")


def is_package(path: str | Path) -> bool:
    """True when ``path`` is a folder with an rdf or a zip holding one at its top level."""
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in RDF_NAMES)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name in RDF_NAMES for name in archive.namelist())
    return False


# --- reading the rdf ----------------------------------------------------------------------------


def open_package(path: str | Path) -> Package:
    """Read a package folder or zip (extracted with :func:`extract_package`).

    Raises
    ------
    NormcheckError
        When there is no rdf, it is not valid YAML, or it is not a model description.
    """
    import yaml

    source = Path(path)
    root = extract_package(source) if source.is_file() else source
    rdf_path = next((root / n for n in RDF_NAMES if (root / n).is_file()), None)
    if rdf_path is None:
        raise NormcheckError(f"{source} holds no rdf.yaml or bioimageio.yaml at its top level")
    try:
        rdf = yaml.safe_load(rdf_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise NormcheckError(f"{rdf_path} is not valid YAML ({error})") from error
    if not isinstance(rdf, dict) or rdf.get("type", "model") != "model":
        raise NormcheckError(f"{rdf_path} does not describe a model (type: model)")
    return Package(source, root, rdf, str(rdf.get("format_version", "0.4")))


def _local_file(package: Package, entry: Any, what: str) -> Path:
    """A file named by the rdf (a string or ``{source: ...}``), which must lie in the package."""
    name = entry.get("source") if isinstance(entry, dict) else entry
    if not isinstance(name, str) or not name:
        raise NormcheckError(f"{package.source}: the rdf names no file for {what}")
    if "://" in name:
        raise NormcheckError(
            f"{package.source}: {what} is a URL ({name}); napari-normcheck works offline, "
            "download the full package (with its files) first"
        )
    file = (package.root / name).resolve()
    if not file.is_relative_to(package.root.resolve()):
        raise NormcheckError(f"{package.source}: {what} {name!r} lies outside the package")
    if not file.is_file():
        raise NormcheckError(f"{package.source}: {what} {name!r} is missing from the package")
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    if expected and file_sha256(file) != str(expected).lower():
        raise NormcheckError(
            f"{package.source}: {what} {name!r} does not match the sha256 in the rdf; "
            "the package is damaged or was edited"
        )
    return file


def _axes_letters(tensor: dict[str, Any]) -> str:
    """Axes as letters (b, c, z, y, x, ...) for 0.4 strings and 0.5 axis lists."""
    axes = tensor.get("axes", "")
    if isinstance(axes, str):
        return axes.lower()
    letters = []
    for axis in axes:
        kind = axis.get("type", "")
        ident = str(axis.get("id", "")).lower()
        if kind == "batch":
            letters.append("b")
        elif kind == "channel":
            letters.append("c")
        elif kind == "space" and ident in _SPATIAL:
            letters.append(ident)
        else:
            letters.append(ident[:1] or kind[:1] or "?")
    return "".join(letters)


def _n_channels(tensor: dict[str, Any]) -> int | None:
    axes = tensor.get("axes", "")
    if not isinstance(axes, str):
        for axis in axes:
            if axis.get("type") == "channel":
                names = axis.get("channel_names")
                return len(names) if isinstance(names, list) else None
        return 1
    if "c" not in axes:
        return 1
    shape = tensor.get("shape")
    index = axes.index("c")
    if isinstance(shape, list) and index < len(shape):
        return int(shape[index])
    if isinstance(shape, dict):
        minimum, step = shape.get("min", []), shape.get("step", [])
        if index < len(minimum) and (index >= len(step) or step[index] == 0):
            return int(minimum[index])
    return None


def _steps(tensor: dict[str, Any], key: str) -> list[dict[str, Any]]:
    steps = []
    for step in tensor.get(key) or []:
        name = step.get("id", step.get("name"))
        steps.append({"name": str(name), "kwargs": dict(step.get("kwargs") or {})})
    return steps


# --- loading ------------------------------------------------------------------------------------


def _architecture(package: Package, weights: dict[str, Any], trust_pickle: bool):
    """``(arch spec for resolve_callable, kwargs)`` of a pytorch_state_dict entry."""
    arch = weights.get("architecture")
    kwargs = weights.get("kwargs") or {}
    if isinstance(arch, dict):
        kwargs = arch.get("kwargs") or {}
        callable_name = arch.get("callable")
        if arch.get("import_from"):
            return f"{arch['import_from']}:{callable_name}", kwargs
        source = {"source": arch.get("source"), "sha256": arch.get("sha256")}
    elif isinstance(arch, str) and arch.rpartition(":")[0].endswith(".py"):
        file_name, _, callable_name = arch.rpartition(":")
        source = {"source": file_name, "sha256": weights.get("architecture_sha256")}
    elif isinstance(arch, str) and arch:
        # 0.4 "package.module.Name" / "package.module:Name": an installed package, no file to run.
        return arch, kwargs
    else:
        raise NormcheckError(f"{package.source}: pytorch_state_dict names no architecture")
    file = _local_file(package, source, "the architecture source")
    if not trust_pickle:
        raise NormcheckError(
            f"{package.source} has state_dict weights whose architecture is Python source in the "
            f"package ({file.name}); loading them runs that code. Pass --trust-pickle "
            "(trust_pickle=True) if you trust the package's source"
        )
    return f"{file}:{callable_name}", kwargs


def load_package(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
) -> LoadedModel:
    """Load a bioimage.io package (folder or zip) offline.

    Parameters
    ----------
    path : str or Path
        Package folder or zip.
    trust_pickle : bool
        Allow running the package's architecture source (only needed without TorchScript weights).
    spatial_dims, in_channels : int, optional
        Overrides; by default read from the input's axes.

    Returns
    -------
    LoadedModel
        ``format="bioimageio"``, with ``preprocessing`` ``{"normalize": spec or None, "raw":
        steps}`` and ``postprocessing`` ``{"activation": ..., "raw": steps}``.

    Raises
    ------
    NormcheckError
        For missing files, no supported weights, or untrusted architecture source.
    """
    package = open_package(path)
    rdf = package.rdf
    inputs, outputs = rdf.get("inputs") or [{}], rdf.get("outputs") or [{}]
    if len(inputs) != 1:
        raise NormcheckError(
            f"{package.source}: models with {len(inputs)} inputs are not supported"
        )
    axes = _axes_letters(inputs[0])
    dims = spatial_dims or (sum(a in _SPATIAL for a in axes) or None)
    channels = in_channels or _n_channels(inputs[0])
    weights = rdf.get("weights") or {}
    notes: list[str] = []
    loaded = None
    if "torchscript" in weights:
        file = _local_file(package, weights["torchscript"], "the torchscript weights")
        loaded = load_model(file, spatial_dims=dims, in_channels=channels)
        arch, arch_kwargs = None, None
        notes.append("torchscript weights used (no package code runs)")
        if not loaded.switchable and "pytorch_state_dict" in weights:
            if trust_pickle:
                notes.append(
                    "the torchscript weights have a fixed normalization mode; the "
                    "pytorch_state_dict weights are used instead"
                )
                loaded = None
            else:
                notes.append(
                    "the torchscript weights have a fixed normalization mode; pass --trust-pickle "
                    "to use the package's pytorch_state_dict weights (runs its Python source)"
                )
    if loaded is None and "pytorch_state_dict" in weights:
        entry = weights["pytorch_state_dict"]
        file = _local_file(package, entry, "the pytorch_state_dict weights")
        arch, arch_kwargs = _architecture(package, entry, trust_pickle)
        loaded = load_model(
            file, arch=arch, arch_kwargs=arch_kwargs, spatial_dims=dims, in_channels=channels
        )
    elif loaded is None:
        found = ", ".join(weights) or "none"
        raise NormcheckError(
            f"{package.source} has no torchscript or pytorch_state_dict weights (found: {found})"
        )
    normalize, pre_notes = map_preprocessing(_steps(inputs[0], "preprocessing"))
    activation, post_notes = map_postprocessing(_steps(outputs[0], "postprocessing"))
    if normalize is not None:
        notes.append(f"the package's preprocessing is --normalize {normalize}")
    notes.append(f"the package's postprocessing is --activation {activation}")
    return dataclasses.replace(
        loaded,
        format="bioimageio",
        path=str(package.source),
        notes=[*notes, *loaded.notes, *pre_notes, *post_notes],
        arch=arch,
        arch_kwargs=arch_kwargs,
        preprocessing={"normalize": normalize, "raw": _steps(inputs[0], "preprocessing")},
        postprocessing={"activation": activation, "raw": _steps(outputs[0], "postprocessing")},
    )


# --- verification ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of reproducing a package's test output.

    Attributes
    ----------
    passed : bool
        True when every element is within ``atol + rtol * |expected|``.
    max_abs_diff : float
        Largest absolute difference.
    rtol, atol : float
        Tolerances used.
    """

    passed: bool
    max_abs_diff: float
    rtol: float
    atol: float


def _test_tensor(package: Package, tensor: dict[str, Any], legacy_key: str, what: str) -> Path:
    if package.is_v05 or "test_tensor" in tensor:
        return _local_file(package, tensor.get("test_tensor"), what)
    names = package.rdf.get(legacy_key) or []
    return _local_file(package, names[0] if names else None, what)


def _to_bc_spatial(array: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """Transpose to batch, channel, spatial order (adding missing b / c axes)."""
    if len(axes) != array.ndim:
        raise NormcheckError(f"test tensor of shape {array.shape} does not match axes {axes!r}")
    for letter in "cb":
        if letter not in axes:
            array, axes = array[np.newaxis], letter + axes
    order = [axes.index("b"), axes.index("c")] + [axes.index(a) for a in axes if a in _SPATIAL]
    return np.transpose(array, order), "bc" + "".join(a for a in axes if a in _SPATIAL)


def _tolerance(rdf: dict[str, Any]) -> tuple[float, float, float]:
    config = ((rdf.get("config") or {}).get("bioimageio") or {}).get("reproducibility_tolerance")
    entry = config[0] if isinstance(config, list) and config else config or {}
    return (
        float(entry.get("relative_tolerance", DEFAULT_RTOL)),
        float(entry.get("absolute_tolerance", DEFAULT_ATOL)),
        float(entry.get("mismatched_elements_per_million", 0)),
    )


def verify_package(
    path: str | Path, *, loaded: LoadedModel | None = None, trust_pickle: bool = False
) -> VerifyResult:
    """Run the package's test input through the model in eval mode and compare with its output.

    The preprocessing is applied to the whole test input (statistics over all of it), the
    postprocessing to the prediction. The tolerance is the package's
    ``config.bioimageio.reproducibility_tolerance`` (0.5), else ``rtol = atol = 1e-4``:
    an element passes when ``|actual - expected| <= atol + rtol * |expected|``.

    Parameters
    ----------
    path : str or Path
        Package folder or zip.
    loaded : LoadedModel, optional
        The package already loaded with :func:`load_package` (loaded again otherwise).
    trust_pickle : bool
        As for :func:`load_package`.

    Returns
    -------
    VerifyResult
        Whether it passed and the largest difference.
    """
    package = open_package(path)
    loaded = loaded or load_package(path, trust_pickle=trust_pickle)
    tensor_in = (package.rdf.get("inputs") or [{}])[0]
    tensor_out = (package.rdf.get("outputs") or [{}])[0]
    raw_in = np.load(_test_tensor(package, tensor_in, "test_inputs", "the test input"))
    expected = np.load(_test_tensor(package, tensor_out, "test_outputs", "the test output"))
    image, _ = _to_bc_spatial(raw_in, _axes_letters(tensor_in))
    expected, _ = _to_bc_spatial(expected, _axes_letters(tensor_out))
    image = apply_preprocessing(_steps(tensor_in, "preprocessing"), image)
    module = loaded.module
    with normalization_mode(module, "eval"), torch.inference_mode():
        output = module(torch.from_numpy(np.ascontiguousarray(image)))
    if not torch.is_tensor(output):
        output = output[0] if isinstance(output, tuple | list) else next(iter(output.values()))
    actual = apply_postprocessing(_steps(tensor_out, "postprocessing"), output.float().numpy())
    if actual.shape != expected.shape:
        raise NormcheckError(
            f"the model's output {actual.shape} does not match the test output {expected.shape}"
        )
    rtol, atol, per_million = _tolerance(package.rdf)
    diff = np.abs(actual - expected.astype(np.float32))
    bad = int(np.count_nonzero(diff > atol + rtol * np.abs(expected)))
    passed = bad <= per_million * diff.size / 1e6
    return VerifyResult(passed, float(diff.max(initial=0.0)), rtol, atol)
