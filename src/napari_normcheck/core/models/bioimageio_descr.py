"""Read a bioimage.io model description with ``bioimageio.spec`` into what napari-normcheck uses.

``bioimageio.spec`` reads formats 0.4 and 0.5 offline (``perform_io_checks=False``) and fills in
every default the format defines (a space axis without ``id`` is ``x``, say). This module turns
either format's description into one :class:`PackageSpec`: axes as letters, the sizes an input
takes (``min + n * step``), the output halo, channel names, processing steps and the weights in the
order they are tried.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models.shape_search import AxisSizes

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
SPATIAL = ("z", "y", "x")
# Tried in this order: the state_dict (usually the original) with its architecture, then
# TorchScript, which runs no package code.
WEIGHT_PRIORITY = ("pytorch_state_dict", "torchscript")
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4


@dataclass
class TensorSpec:
    """One input or output tensor.

    Attributes
    ----------
    axes : str
        Letters: ``b`` batch, ``c`` channel, ``z``/``y``/``x`` space, ``t`` time, ``i`` index.
    channel_names : list of str or None
        Declared channel names.
    n_channels : int or None
        Channels (1 without a channel axis).
    sizes : AxisSizes or None
        Per spatial axis, ``min`` and ``step`` of an input (step 0: fixed); None when unknown.
    halo : tuple of int or None
        Per spatial axis of an output.
    steps : list of dict
        Pre- or postprocessing ``{"name": ..., "kwargs": ...}`` in order.
    test_tensor : str or None
        The test tensor's file (relative to the package) or URL.
    """

    axes: str
    channel_names: list[str] | None = None
    n_channels: int | None = None
    sizes: AxisSizes | None = None
    halo: tuple[int, ...] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    test_tensor: str | None = None


@dataclass
class WeightsSpec:
    """One weights entry: ``format``, file ``source``, ``sha256`` and for a state_dict its architecture.

    ``arch_source`` is a file in the package (runs package code), ``arch_import`` an installed
    module; ``callable`` and ``kwargs`` build the network.
    """

    format: str
    source: str
    sha256: str | None = None
    arch_source: str | None = None
    arch_sha256: str | None = None
    arch_import: str | None = None
    callable: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PackageSpec:
    """A model description read by ``bioimageio.spec``, in either format."""

    format_version: str
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights: list[WeightsSpec]
    tolerance: tuple[float, float, float] = (DEFAULT_RTOL, DEFAULT_ATOL, 0.0)


def read_description(root: Path, source: Path) -> PackageSpec:
    """Read the rdf in ``root`` with ``bioimageio.spec`` (offline), in format 0.4 or 0.5.

    Raises
    ------
    NormcheckError
        When there is no rdf, it is invalid, or it does not describe a model.
    """
    rdf = next((root / name for name in RDF_NAMES if (root / name).is_file()), None)
    if rdf is None:
        raise NormcheckError(f"{source} holds no rdf.yaml or bioimageio.yaml at its top level")
    from bioimageio.spec import InvalidDescr, load_description

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        descr = load_description(rdf, perform_io_checks=False)
    if isinstance(descr, InvalidDescr):
        raise NormcheckError(
            f"{source} is not a valid bioimage.io description: {_first_error(descr)}"
        )
    if getattr(descr, "type", None) != "model":
        raise NormcheckError(f"{rdf} does not describe a model (type: model)")
    v05 = str(descr.format_version).startswith("0.5")
    inputs = [_tensor(t, v05, "pre") for t in descr.inputs]
    outputs = [_tensor(t, v05, "post") for t in descr.outputs]
    if not v05:
        for tensor, file in zip(inputs, descr.test_inputs):
            tensor.test_tensor = str(file)
        for tensor, file in zip(outputs, descr.test_outputs):
            tensor.test_tensor = str(file)
    weights = [
        _weights(name, getattr(descr.weights, name), v05)
        for name in WEIGHT_PRIORITY
        if getattr(descr.weights, name, None) is not None
    ]
    return PackageSpec(
        str(descr.format_version), str(descr.name), inputs, outputs, weights, _tolerance(descr, v05)
    )


def _first_error(descr: Any) -> str:
    for detail in descr.validation_summary.details:
        for error in detail.errors:
            where = ".".join(str(part) for part in error.loc)
            return f"{where}: {error.msg}".splitlines()[0]
    return "unknown error"


def _steps(steps: Any) -> list[dict[str, Any]]:
    found = []
    for step in steps or []:
        name = getattr(step, "id", None) or getattr(step, "name", None)
        kwargs = getattr(step, "kwargs", None)
        found.append(
            {
                "name": str(name),
                "kwargs": kwargs.model_dump(mode="json") if kwargs is not None else {},
            }
        )
    return found


def _tensor(tensor: Any, v05: bool, kind: str) -> TensorSpec:
    steps = _steps(tensor.preprocessing if kind == "pre" else tensor.postprocessing)
    if not v05:
        return _tensor_04(tensor, steps)
    letters, names, minimum, step, halo = [], None, [], [], []
    sized = True
    for axis in tensor.axes:
        kind_ = str(axis.type)
        if kind_ == "batch":
            letters.append("b")
        elif kind_ == "channel":
            letters.append("c")
            names = [str(n) for n in axis.channel_names]
        elif kind_ == "space":
            letters.append(str(axis.id).lower())
            size = axis.size
            if isinstance(size, int):
                minimum.append(size)
                step.append(0)
            elif hasattr(size, "min") and hasattr(size, "step"):
                minimum.append(int(size.min))
                step.append(int(size.step))
            else:
                sized = False
            halo.append(int(getattr(axis, "halo", 0) or 0))
        else:
            letters.append(kind_[:1])
    test = getattr(tensor, "test_tensor", None)
    return TensorSpec(
        axes="".join(letters),
        channel_names=names,
        n_channels=len(names) if names is not None else 1,
        sizes=AxisSizes(tuple(minimum), tuple(step)) if sized and minimum else None,
        halo=tuple(halo) if any(halo) else None,
        steps=steps,
        test_tensor=str(test.source) if test is not None else None,
    )


def _tensor_04(tensor: Any, steps: list[dict[str, Any]]) -> TensorSpec:
    axes = str(tensor.axes).lower()
    shape = tensor.shape
    spatial = [i for i, a in enumerate(axes) if a in SPATIAL]
    sizes, n_channels = None, 1
    if isinstance(shape, list | tuple):
        sizes = AxisSizes(tuple(int(shape[i]) for i in spatial), (0,) * len(spatial))
        n_channels = int(shape[axes.index("c")]) if "c" in axes else 1
    elif hasattr(shape, "min") and hasattr(shape, "step"):
        sizes = AxisSizes(
            tuple(int(shape.min[i]) for i in spatial), tuple(int(shape.step[i]) for i in spatial)
        )
        n_channels = int(shape.min[axes.index("c")]) if "c" in axes else 1
    elif "c" in axes:
        n_channels = None
    halo = getattr(tensor, "halo", None)
    return TensorSpec(
        axes=axes,
        n_channels=n_channels,
        sizes=sizes,
        halo=tuple(int(halo[i]) for i in spatial) if halo and any(halo) else None,
        steps=steps,
    )


def _weights(name: str, entry: Any, v05: bool) -> WeightsSpec:
    spec = WeightsSpec(name, str(entry.source), _sha(entry.sha256))
    arch = getattr(entry, "architecture", None)
    if arch is None:
        return spec
    if v05:
        spec.callable = str(arch.callable)
        spec.kwargs = dict(arch.kwargs or {})
        if getattr(arch, "import_from", None):
            spec.arch_import = str(arch.import_from)
        else:
            spec.arch_source, spec.arch_sha256 = str(arch.source), _sha(arch.sha256)
        return spec
    spec.kwargs = dict(entry.kwargs or {})
    spec.callable = str(arch.callable_name)
    if hasattr(arch, "source_file"):
        spec.arch_source = str(arch.source_file)
        spec.arch_sha256 = _sha(getattr(entry, "architecture_sha256", None))
    else:
        spec.arch_import = str(arch.module_name)
    return spec


def _sha(value: Any) -> str | None:
    return None if value is None else str(value).lower()


def _tolerance(descr: Any, v05: bool) -> tuple[float, float, float]:
    if v05:
        config = descr.config.bioimageio
        # The format fills in tolerances of its own; only declared ones override ours.
        if "reproducibility_tolerance" not in config.model_fields_set:
            return DEFAULT_RTOL, DEFAULT_ATOL, 0.0
        entries = list(config.reproducibility_tolerance or [])
        if not entries:
            return DEFAULT_RTOL, DEFAULT_ATOL, 0.0
        entry = entries[0]
        return (
            float(entry.relative_tolerance),
            float(entry.absolute_tolerance),
            float(entry.mismatched_elements_per_million),
        )
    config = ((descr.config or {}).get("bioimageio") or {}).get("reproducibility_tolerance")
    entry = config[0] if isinstance(config, list) and config else config or {}
    return (
        float(entry.get("relative_tolerance", DEFAULT_RTOL)),
        float(entry.get("absolute_tolerance", DEFAULT_ATOL)),
        float(entry.get("mismatched_elements_per_million", 0)),
    )
