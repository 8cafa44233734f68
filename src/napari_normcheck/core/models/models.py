"""Load the model formats users have and probe them.

Formats: a state_dict with its architecture (plain, nested under ``state_dict``/``model``/``net``
keys, with ``module.``/``model.``/``net.``/``_orig_mod.`` prefixes, a PyTorch Lightning ``.ckpt``, a
``.safetensors`` file), TorchScript (scripted or traced), a pickled module (only with
``trust_pickle``) and bioimage.io packages (folder or zip). Every failure a user can cause is a
:class:`~napari_normcheck.core.base.errors.NormcheckError` naming the problem and the fix. Loading and
probing never change the model: the probe runs in eval mode under ``torch.inference_mode()`` and
restores training flags and buffers.

A weights file is loaded by :mod:`~napari_normcheck.core.models.model_file`, a package by
:mod:`~napari_normcheck.core.models.bioimageio`. Reading files lives in
:mod:`~napari_normcheck.core.models.weights_io`, finding architectures in
:mod:`~napari_normcheck.core.models.arch`, switchability in :mod:`~napari_normcheck.core.models.switchable`;
their public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models import bioimageio
from napari_normcheck.core.models.arch import parse_kwargs, resolve_callable  # noqa: F401 (re-exported)
from napari_normcheck.core.models.model_file import LoadedModel, file_sha256, load_file  # noqa: F401
from napari_normcheck.core.models.probe import ModelInfo, probe_model, probe_with_notes  # noqa: F401
from napari_normcheck.core.models.shape_search import AxisSizes


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    output_index: int | None = None,
    output_key: str | None = None,
    allow_probe_failure: bool = False,
    sizes: AxisSizes | None = None,
) -> LoadedModel:
    """Load a model file of any supported format onto the CPU and probe it.

    Parameters
    ----------
    path : str or Path
        A state_dict checkpoint (plain, nested under ``state_dict``/``model``/... keys, prefixed,
        a Lightning ``.ckpt`` or ``.safetensors``), a TorchScript archive, a pickled ``nn.Module``,
        or a bioimage.io package (a folder or ``.zip``; see
        :mod:`napari_normcheck.core.models.bioimageio`).
    arch : str, optional
        The architecture for a state_dict (see :func:`resolve_callable`); required there.
    arch_kwargs : str, dict or None
        Keyword arguments for ``arch`` (see :func:`parse_kwargs`).
    trust_pickle : bool
        Allow loading pickled Python objects (and a package's architecture source), which runs
        code from the file.
    spatial_dims, in_channels : int, optional
        Override what the probe reads from the first convolution.
    output_index, output_key : int or str, optional
        Which output of a tuple/list or dict is the prediction (default: the first full-resolution
        tensor).
    allow_probe_failure : bool
        Return the model with ``info.probe_error`` set instead of raising when no probe forward
        works (``inspect`` still lists the layers; a run then tries its own tile).
    sizes : AxisSizes, optional
        Declared input sizes to start the probe from (bioimage.io packages).

    Returns
    -------
    LoadedModel
        The module in eval mode with its probe results and notes.

    Raises
    ------
    NormcheckError
        For a missing or corrupt file, an untrusted pickle, a missing or ill-fitting architecture.
    """
    path = Path(path)
    if not path.exists():
        raise NormcheckError(f"model file {path} not found; check the path")
    if bioimageio.is_package(path):
        package = bioimageio.load_package(
            path,
            trust_pickle=trust_pickle,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            output_index=output_index,
            output_key=output_key,
            allow_probe_failure=allow_probe_failure,
        )
        if arch is not None or arch_kwargs is not None:
            package.notes.append("--arch/--arch-kwargs ignored: the package names its architecture")
        return package
    if path.is_dir():
        raise NormcheckError(
            f"{path} is a folder without rdf.yaml or bioimageio.yaml: pass the weights file "
            "(TorchScript, or a state_dict with --arch) or a bioimage.io package"
        )
    return load_file(
        path,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        output_index=output_index,
        output_key=output_key,
        allow_probe_failure=allow_probe_failure,
        sizes=sizes,
    )
