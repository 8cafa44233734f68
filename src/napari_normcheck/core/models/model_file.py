"""A model file that is not a package: read it, build it, probe it (see :func:`load_file`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from napari_normcheck.core.models.arch import parse_kwargs
from napari_normcheck.core.models.outputs import OutputChoice, attach_choice
from napari_normcheck.core.models.probe import ModelInfo, probe_with_notes
from napari_normcheck.core.models.shape_search import AxisSizes
from napari_normcheck.core.models.switchable import not_switchable_reason
from napari_normcheck.core.models.weights_io import load_module


@dataclass
class LoadedModel:
    """A model ready for the two-mode check, with where it came from and what to tell the user.

    Attributes
    ----------
    module : torch.nn.Module
        On CPU, in eval mode.
    format : str
        ``"state_dict"``, ``"torchscript"``, ``"pickle"`` or ``"bioimageio"``.
    path : str
        The model file.
    sha256 : str
        Hex digest of the model file (for a folder package: of its weights file).
    info : ModelInfo
        Result of :func:`probe_model`.
    switchable : bool
        False when the normalization mode cannot be switched (e.g. traced TorchScript).
    not_switchable_reason : str or None
        Why not, and how to export the model so that it can be switched.
    notes : list of str
        Things the user should know (stripped key prefixes, ignored arguments, ...).
    arch, arch_kwargs : str or None, dict or None
        The architecture used to rebuild a state_dict.
    preprocessing, postprocessing : dict or None
        Declared processing steps (bioimage.io packages); None when the format has none.
    output_choice : OutputChoice
        The output used as the prediction (``--output-index`` / ``--output-key``).
    input_channel_names, output_channel_names : list of str or None
        Channel names a bioimage.io package declares (None otherwise): the widget can name
        layers and table columns with them.
    halo : tuple of int or None
        The output halo a bioimage.io package declares per spatial axis (for ``--blend crop``).
    """

    module: nn.Module
    format: str
    path: str
    sha256: str
    info: ModelInfo
    switchable: bool = True
    not_switchable_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    preprocessing: dict[str, Any] | None = None
    postprocessing: dict[str, Any] | None = None
    output_choice: OutputChoice = field(default_factory=OutputChoice)
    input_channel_names: list[str] | None = None
    output_channel_names: list[str] | None = None
    halo: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the module, for reports and store metadata."""
        return {
            "format": self.format,
            "path": self.path,
            "sha256": self.sha256,
            "info": self.info.to_dict(),
            "switchable": self.switchable,
            "not_switchable_reason": self.not_switchable_reason,
            "notes": list(self.notes),
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "preprocessing": self.preprocessing,
            "postprocessing": self.postprocessing,
            "output_index": self.output_choice.index,
            "output_key": self.output_choice.key,
            "input_channel_names": self.input_channel_names,
            "output_channel_names": self.output_channel_names,
            "halo": None if self.halo is None else list(self.halo),
        }


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_file(
    path: Path,
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
    """Load a weights file (not a package) onto the CPU and probe it.

    Parameters are those of :func:`~napari_normcheck.core.models.models.load_model`.
    """
    choice = OutputChoice(output_index, output_key)
    kwargs = parse_kwargs(arch_kwargs)
    notes: list[str] = []
    module, model_format = load_module(path, arch, kwargs, trust_pickle, notes)
    if model_format != "state_dict" and arch is not None:
        notes.append(f"--arch {arch!r} ignored: the file holds a whole {model_format} model")
    module.eval()
    # Read the graph before any forward: once TorchScript has run a model without optimization,
    # its inlined_graph keeps prim::CallMethod nodes that hide the norm ops.
    reason = not_switchable_reason(module)
    module = attach_choice(module, choice)
    info, probe_notes = probe_with_notes(
        module,
        spatial_dims,
        in_channels,
        choice=choice,
        sizes=sizes,
        allow_failure=allow_probe_failure,
    )
    notes.extend(probe_notes)
    return LoadedModel(
        module=module,
        format=model_format,
        path=str(path),
        sha256=file_sha256(path),
        info=info,
        switchable=reason is None,
        not_switchable_reason=reason,
        notes=notes,
        arch=arch if model_format == "state_dict" else None,
        arch_kwargs=kwargs if model_format == "state_dict" else None,
        output_choice=choice,
    )
