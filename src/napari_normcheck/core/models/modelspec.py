"""How workers of a distributed run get the model: a file and its loader options, not a pickle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from napari_normcheck.core.base.errors import NormcheckError


@dataclass(frozen=True)
class ModelSpec:
    """How a worker gets the model: the file and loader options the user gave, checked by hash.

    Attributes
    ----------
    path : str or None
        The model file or bioimage.io package (readable by every worker).
    arch, arch_kwargs : str or None, dict or None
        Architecture of a state_dict (see :func:`~napari_normcheck.core.models.models.load_model`).
    trust_pickle : bool
        The user allowed pickled objects in this file.
    spatial_dims, in_channels : int or None
        The layout the client used (workers skip guessing it).
    sha256 : str or None
        The file's hash as loaded by the client; a worker reading a different file refuses to run.
    output_index, output_key : int or str or None
        The output chosen as the prediction (``--output-index`` / ``--output-key``).
    module_bytes : bytes or None
        A model held only in memory, serialized with cloudpickle by :meth:`from_module`; used only
        when the caller asks for it explicitly.
    """

    path: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    trust_pickle: bool = False
    spatial_dims: int | None = None
    in_channels: int | None = None
    sha256: str | None = None
    module_bytes: bytes | None = None
    output_index: int | None = None
    output_key: str | None = None

    @classmethod
    def from_loaded(cls, loaded: Any, *, trust_pickle: bool = False) -> ModelSpec:
        """The spec of a :class:`~napari_normcheck.core.models.models.LoadedModel` (what the CLI loaded).

        A pickled model was already trusted by the user to be loaded, so workers may load it too.
        """
        return cls(
            # Absolute: workers need not share the client's working directory.
            path=str(Path(loaded.path).resolve()),
            arch=loaded.arch,
            arch_kwargs=loaded.arch_kwargs,
            trust_pickle=trust_pickle or loaded.format == "pickle",
            spatial_dims=loaded.info.spatial_dims,
            in_channels=loaded.info.in_channels,
            sha256=loaded.sha256,
            output_index=loaded.output_choice.index,
            output_key=loaded.output_choice.key,
        )

    @classmethod
    def from_module(cls, module: nn.Module) -> ModelSpec:
        """Ship an in-memory model with cloudpickle (workers need the same packages installed)."""
        import cloudpickle

        return cls(module_bytes=cloudpickle.dumps(module))

    def load(self) -> nn.Module:
        """Load the model on this worker, on the CPU and in eval mode."""
        if self.module_bytes is not None:
            import cloudpickle

            return cloudpickle.loads(self.module_bytes).eval()
        if self.path is None:
            raise NormcheckError("the model spec names no file and holds no model")
        from napari_normcheck.core.models.models import load_model

        loaded = load_model(
            self.path,
            arch=self.arch,
            arch_kwargs=self.arch_kwargs,
            trust_pickle=self.trust_pickle,
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            output_index=self.output_index,
            output_key=self.output_key,
            # The client probed the model and tried the run's window; a worker needs neither.
            allow_probe_failure=True,
        )
        if self.sha256 is not None and loaded.sha256 != self.sha256:
            raise NormcheckError(
                f"the model file {self.path} on a worker differs from the client's (sha256 "
                f"{loaded.sha256[:12]} vs {self.sha256[:12]}); give workers the same file"
            )
        return loaded.module
