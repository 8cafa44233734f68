"""Offline bioimage.io model packages: read with ``bioimageio.spec``, load the weights, verify.

A package is a folder, or a ``.zip`` of one, holding ``rdf.yaml`` (or ``bioimageio.yaml``) in
format 0.4 or 0.5, weights, and a test input and output. Nothing is downloaded. Zips are extracted
by :mod:`napari_normcheck.core.models.package_zip` (zip slip and zip bombs refused), then read by
``bioimageio.spec`` (:mod:`napari_normcheck.core.models.bioimageio_descr`). Weights are tried in the order
``pytorch_state_dict`` (with its architecture), ``torchscript``. An architecture that is Python
source in the package runs that file, which needs the same explicit trust as a pickle
(``trust_pickle=True`` / ``--trust-pickle``); without it the TorchScript weights, which run no
package code, are used when the package has them.

The package's preprocessing is mapped to one intensity spec of
:mod:`napari_normcheck.core.io.intensity` (statistics computed once over the whole volume, never
per tile); ``notes`` say where the mapping is not exact.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import normalization_mode
from napari_normcheck.core.models.bioimageio_descr import (  # noqa: F401 (re-exported)
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    RDF_NAMES,
    SPATIAL,
    PackageSpec,
    TensorSpec,
    WeightsSpec,
    read_description,
)
from napari_normcheck.core.models.bioimageio_processing import (  # noqa: F401 (re-exported)
    apply_postprocessing,
    apply_preprocessing,
    map_postprocessing,
    map_preprocessing,
)
from napari_normcheck.core.models.model_file import LoadedModel, file_sha256, load_file
from napari_normcheck.core.models.outputs import first_tensor
from napari_normcheck.core.models.package_zip import extract_package


@dataclass
class Package:
    """A bioimage.io package on disk: where it is and what ``bioimageio.spec`` read from it."""

    source: Path
    root: Path
    spec: PackageSpec


def is_package(path: str | Path) -> bool:
    """True when ``path`` is a folder with an rdf or a zip holding one at its top level."""
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in RDF_NAMES)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name in RDF_NAMES for name in archive.namelist())
    return False


def open_package(path: str | Path) -> Package:
    """Read a package folder or zip (a zip is extracted safely first)."""
    source = Path(path)
    root = extract_package(source) if source.is_file() else source
    return Package(source, root, read_description(root, source))


def _local_file(package: Package, name: str | None, sha256: str | None, what: str) -> Path:
    """A file named by the description, which must lie in the package and match its sha256."""
    if not name:
        raise NormcheckError(f"{package.source}: the description names no file for {what}")
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
    if sha256 and file_sha256(file) != sha256:
        raise NormcheckError(
            f"{package.source}: {what} {name!r} does not match the sha256 in the description; "
            "the package is damaged or was edited"
        )
    return file


def _architecture(package: Package, weights: WeightsSpec, trust_pickle: bool) -> str:
    """The ``--arch`` spec of a state_dict entry; package source needs trust."""
    if weights.arch_import:
        return f"{weights.arch_import}:{weights.callable}"
    file = _local_file(package, weights.arch_source, weights.arch_sha256, "the architecture source")
    if not trust_pickle:
        raise NormcheckError(
            f"{package.source} has state_dict weights whose architecture is Python source in the "
            f"package ({file.name}); loading them runs that code. Pass --trust-pickle "
            "(trust_pickle=True) if you trust the package's source"
        )
    return f"{file}:{weights.callable}"


def _check_layout(package: Package, tensor: TensorSpec, what: str) -> None:
    letters = "".join(a for a in tensor.axes if a != "b")
    expected = "c" + "".join(a for a in letters if a in SPATIAL)
    if letters != expected:
        raise NormcheckError(
            f"{package.source}: the {what} axes are {tensor.axes!r}; napari-normcheck feeds batch, "
            "channel, then z, y, x (a package with other axes is not supported)"
        )


def load_package(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    output_index: int | None = None,
    output_key: str | None = None,
    allow_probe_failure: bool = False,
) -> LoadedModel:
    """Load a bioimage.io package (folder or zip) offline.

    Parameters
    ----------
    path : str or Path
        Package folder or zip.
    trust_pickle : bool
        Allow running the package's architecture source.
    spatial_dims, in_channels : int, optional
        Overrides; by default read from the input's axes.
    output_index, output_key : int or str, optional
        As for :func:`~napari_normcheck.core.models.models.load_model`.
    allow_probe_failure : bool
        As for :func:`~napari_normcheck.core.models.models.load_model`.

    Returns
    -------
    LoadedModel
        ``format="bioimageio"``, with ``preprocessing`` ``{"normalize": spec or None, "raw":
        steps}``, ``postprocessing`` ``{"activation": ..., "raw": steps}``, the channel names and
        the output halo.

    Raises
    ------
    NormcheckError
        For invalid descriptions, missing files, no supported weights, or untrusted source.
    """
    package = open_package(path)
    spec = package.spec
    if len(spec.inputs) != 1:
        raise NormcheckError(
            f"{package.source}: models with {len(spec.inputs)} inputs are not supported"
        )
    tensor_in, tensor_out = spec.inputs[0], spec.outputs[0]
    _check_layout(package, tensor_in, "input")
    dims = spatial_dims or (sum(a in SPATIAL for a in tensor_in.axes) or None)
    channels = in_channels or tensor_in.n_channels
    options = {
        "spatial_dims": dims,
        "in_channels": channels,
        "output_index": output_index,
        "output_key": output_key,
        "allow_probe_failure": allow_probe_failure,
        # The declared sizes start the probe, unless --spatial-dims says otherwise.
        "sizes": tensor_in.sizes
        if tensor_in.sizes is not None and len(tensor_in.sizes.minimum) == dims
        else None,
    }
    notes: list[str] = []
    loaded, arch, arch_kwargs = None, None, None
    by_format = {w.format: w for w in spec.weights}
    state = by_format.get("pytorch_state_dict")
    script = by_format.get("torchscript")
    if state is not None and (trust_pickle or state.arch_import or script is None):
        arch = _architecture(package, state, trust_pickle)
        arch_kwargs = state.kwargs
        file = _local_file(package, state.source, state.sha256, "the pytorch_state_dict weights")
        loaded = load_file(file, arch=arch, arch_kwargs=arch_kwargs, **options)
        notes.append("pytorch_state_dict weights used")
    elif script is not None:
        file = _local_file(package, script.source, script.sha256, "the torchscript weights")
        loaded = load_file(file, **options)
        notes.append("torchscript weights used (no package code runs)")
        if state is not None:
            fixed = (
                ""
                if loaded.switchable
                else " (the torchscript weights have a fixed normalization mode)"
            )
            notes.append(
                f"pass --trust-pickle to use the package's pytorch_state_dict weights{fixed}; "
                "that runs its Python source"
            )
    else:
        found = ", ".join(w.format for w in spec.weights) or "none"
        raise NormcheckError(
            f"{package.source} has no torchscript or pytorch_state_dict weights (found: {found})"
        )
    normalize, pre_notes = map_preprocessing(tensor_in.steps)
    activation, post_notes = map_postprocessing(tensor_out.steps)
    if normalize is not None:
        notes.append(f"the package's preprocessing is --normalize {normalize}")
    notes.append(f"the package's postprocessing is --activation {activation}")
    if tensor_out.halo is not None:
        notes.append(
            f"the package declares an output halo of {tensor_out.halo}: --blend crop --halo "
            f"{','.join(str(h) for h in tensor_out.halo)} discards it"
        )
    return dataclasses.replace(
        loaded,
        format="bioimageio",
        path=str(package.source),
        notes=[*notes, *loaded.notes, *pre_notes, *post_notes],
        arch=arch,
        arch_kwargs=arch_kwargs,
        preprocessing={"normalize": normalize, "raw": tensor_in.steps},
        postprocessing={"activation": activation, "raw": tensor_out.steps},
        input_channel_names=tensor_in.channel_names,
        output_channel_names=tensor_out.channel_names,
        halo=tensor_out.halo,
    )


# --- verification ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of reproducing a package's test output.

    Attributes
    ----------
    passed : bool
        True when every element (but the allowed mismatches per million) is within
        ``atol + rtol * |expected|``.
    max_abs_diff : float
        Largest absolute difference.
    rtol, atol : float
        Tolerances used.
    """

    passed: bool
    max_abs_diff: float
    rtol: float
    atol: float


def _to_bc_spatial(array: np.ndarray, axes: str) -> np.ndarray:
    """Transpose to batch, channel, spatial order (adding missing b / c axes)."""
    if len(axes) != array.ndim:
        raise NormcheckError(f"test tensor of shape {array.shape} does not match axes {axes!r}")
    for letter in "cb":
        if letter not in axes:
            array, axes = array[np.newaxis], letter + axes
    order = [axes.index("b"), axes.index("c")] + [axes.index(a) for a in axes if a in SPATIAL]
    return np.transpose(array, order)


def verify_package(
    path: str | Path, *, loaded: LoadedModel | None = None, trust_pickle: bool = False
) -> VerifyResult:
    """Run the package's test input through our own forward (eval mode) and compare with its output.

    The preprocessing is applied to the whole test input, the postprocessing to the prediction
    (the output chosen as for a run). The tolerance is the package's
    ``config.bioimageio.reproducibility_tolerance``, else ``rtol = atol = 1e-4``: an element
    passes when ``|actual - expected| <= atol + rtol * |expected|``.

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
    tensor_in, tensor_out = package.spec.inputs[0], package.spec.outputs[0]
    raw_in = np.load(_local_file(package, tensor_in.test_tensor, None, "the test input"))
    expected = np.load(_local_file(package, tensor_out.test_tensor, None, "the test output"))
    image = apply_preprocessing(tensor_in.steps, _to_bc_spatial(raw_in, tensor_in.axes))
    expected = _to_bc_spatial(expected, tensor_out.axes)
    module = loaded.module
    batch = torch.from_numpy(np.ascontiguousarray(image))
    with normalization_mode(module, "eval"), torch.inference_mode():
        output = first_tensor(module(batch), module, tuple(batch.shape[2:]))
    actual = apply_postprocessing(tensor_out.steps, output.float().numpy())
    if actual.shape != expected.shape:
        raise NormcheckError(
            f"the model's output {actual.shape} does not match the test output {expected.shape}"
        )
    rtol, atol, per_million = package.spec.tolerance
    diff = np.abs(actual - expected.astype(np.float32))
    bad = int(np.count_nonzero(diff > atol + rtol * np.abs(expected)))
    passed = bad <= per_million * diff.size / 1e6
    return VerifyResult(passed, float(diff.max(initial=0.0)), rtol, atol)
