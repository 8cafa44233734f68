"""Which normalization layers a model has, and whether train and eval mode can differ at all.

Only layers that keep running statistics (BatchNorm, SyncBatchNorm, InstanceNorm with
``track_running_stats=True``) normalize differently in train and eval mode; GroupNorm, LayerNorm and
plain InstanceNorm normalize each input by its own statistics in both modes. The inventory says which
kind a model has, for eager modules and TorchScript alike, so a biologist knows what to expect before
running the check.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from napari_normcheck.core.base.modes import has_running_stats
from napari_normcheck.core.models.models import LoadedModel

# TorchScript keeps the class name in ``original_name``; a traced module keeps nothing else.
_SCRIPT_NORM_TYPES = frozenset(
    {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "GroupNorm",
        "LayerNorm",
        "RMSNorm",
    }
)
_SCRIPT_DROPOUT_TYPES = frozenset(
    {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}
)
_PER_SAMPLE_NORMS: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


@dataclass(frozen=True)
class NormLayer:
    """One normalization layer.

    Attributes
    ----------
    name : str
        Qualified module name (``""`` for the model itself).
    type : str
        Class name, e.g. ``"BatchNorm3d"``, ``"InstanceNorm3d"``, ``"GroupNorm"``.
    running_stats : bool
        Whether eval mode uses remembered running statistics (the layer switches with the mode).
    momentum : float or None
        Running-average momentum (None: cumulative average, or unknown for traced TorchScript).
    eps : float or None
        Variance epsilon (None when unknown: traced TorchScript keeps no attributes).
    affine : bool
        Whether the layer has a learned scale and shift.
    num_batches_tracked : int or None
        Training batches the running statistics have seen, when recorded.
    num_features : int or None
        Channels (GroupNorm: ``num_channels``; LayerNorm: elements of ``normalized_shape``).
    """

    name: str
    type: str
    running_stats: bool
    momentum: float | None
    eps: float | None
    affine: bool
    num_batches_tracked: int | None
    num_features: int | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dictionary."""
        return asdict(self)


@dataclass(frozen=True)
class Inventory:
    """The normalization and dropout layers of a model.

    Attributes
    ----------
    layers : list of NormLayer
        In module order.
    dropout : list of str
        Qualified names of all dropout layers.
    active_dropout : list of str
        The dropout layers with ``p > 0`` (or unknown ``p``).
    """

    layers: list[NormLayer]
    dropout: list[str] = field(default_factory=list)
    active_dropout: list[str] = field(default_factory=list)

    @property
    def n_switching(self) -> int:
        """Number of layers with running statistics, which behave differently in train and eval."""
        return sum(layer.running_stats for layer in self.layers)

    @property
    def verdict(self) -> str:
        """What the inventory means for the check, in a sentence or two a biologist can read."""
        n = self.n_switching
        if n:
            text = (
                f"{n} layer{'s' if n != 1 else ''} use{'' if n != 1 else 's'} running statistics "
                "in eval: train/eval disparity is possible."
            )
        elif self.layers:
            text = (
                "No layer keeps running statistics: disparity is zero by construction, but "
                "per-tile normalization can leave seams; check tile mismatch."
            )
        else:
            text = "No normalization layers: train and eval passes are identical by construction."
        if self.active_dropout:
            k = len(self.active_dropout)
            text += (
                f" {k} dropout layer{'s' if k != 1 else ''} with p > 0 stay{'s' if k == 1 else ''} "
                "off in both passes: only normalization is compared."
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dictionary, verdict included."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "dropout": list(self.dropout),
            "active_dropout": list(self.active_dropout),
            "n_switching": self.n_switching,
            "verdict": self.verdict,
        }

    def format_table(self) -> str:
        """A plain-text aligned table of the layers followed by the verdict.

        Returns
        -------
        str
            Lines ready to print (``napari-normcheck inspect``).
        """
        header = ("name", "type", "running stats", "momentum", "eps", "affine", "batches tracked")
        rows = [
            (
                layer.name or "(model)",
                layer.type,
                "yes" if layer.running_stats else "no",
                _cell(layer.momentum),
                _cell(layer.eps),
                "yes" if layer.affine else "no",
                _cell(layer.num_batches_tracked),
            )
            for layer in self.layers
        ]
        if not rows:
            return f"(no normalization layers)\n\n{self.verdict}"
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines) + f"\n\n{self.verdict}"


def _cell(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def norm_inventory(model: nn.Module | LoadedModel) -> Inventory:
    """List the normalization and dropout layers of a model.

    Parameters
    ----------
    model : torch.nn.Module or LoadedModel
        An eager model, or a scripted or traced TorchScript model.

    Returns
    -------
    Inventory
        The layers in module order, with the verdict.
    """
    if isinstance(model, LoadedModel):
        model = model.module
    layers, dropout, active = [], [], []
    for name, module in model.named_modules():
        layer = _norm_layer(name, module)
        if layer is not None:
            layers.append(layer)
            continue
        p = _dropout_p(module)
        if p is not False:
            dropout.append(name)
            if p is None or p > 0:
                active.append(name)
    return Inventory(layers, dropout, active)


def _norm_layer(name: str, module: nn.Module) -> NormLayer | None:
    if isinstance(module, torch.jit.ScriptModule):
        return _script_norm_layer(name, module)
    if isinstance(module, _NormBase):
        counter = getattr(module, "num_batches_tracked", None)
        return NormLayer(
            name=name,
            type=type(module).__name__,
            running_stats=has_running_stats(module),
            momentum=module.momentum,
            eps=float(module.eps),
            affine=bool(module.affine),
            num_batches_tracked=int(counter) if counter is not None else None,
            num_features=int(module.num_features),
        )
    if isinstance(module, nn.GroupNorm):
        return NormLayer(
            name,
            type(module).__name__,
            False,
            None,
            float(module.eps),
            bool(module.affine),
            None,
            int(module.num_channels),
        )
    if isinstance(module, _PER_SAMPLE_NORMS):
        eps = getattr(module, "eps", None)
        return NormLayer(
            name,
            type(module).__name__,
            False,
            None,
            None if eps is None else float(eps),
            bool(module.elementwise_affine),
            None,
            math.prod(module.normalized_shape),
        )
    return None


def _script_norm_layer(name: str, module: torch.jit.ScriptModule) -> NormLayer | None:
    buffers = dict(module.named_buffers(recurse=False))
    parameters = dict(module.named_parameters(recurse=False))
    kind = module.original_name
    if kind not in _SCRIPT_NORM_TYPES and "running_mean" not in buffers:
        return None
    # Scripted modules keep their attributes; traced ones keep only parameters and buffers.
    running = "running_mean" in buffers and bool(getattr(module, "track_running_stats", True))
    counter = buffers.get("num_batches_tracked")
    reference = buffers.get("running_mean", parameters.get("weight"))
    features = getattr(module, "num_features", getattr(module, "num_channels", None))
    if features is None and reference is not None:
        features = reference.numel() if kind in ("LayerNorm", "RMSNorm") else reference.shape[0]
    affine = getattr(
        module, "affine", getattr(module, "elementwise_affine", "weight" in parameters)
    )
    momentum = getattr(module, "momentum", None)
    eps = getattr(module, "eps", None)
    return NormLayer(
        name=name,
        type=kind,
        running_stats=running,
        momentum=None if momentum is None else float(momentum),
        eps=None if eps is None else float(eps),
        affine=bool(affine),
        num_batches_tracked=None if counter is None else int(counter),
        num_features=None if features is None else int(features),
    )


def _dropout_p(module: nn.Module) -> float | None | bool:
    """``p`` of a dropout layer (None when unknown), or False when ``module`` is no dropout."""
    if isinstance(module, _DropoutNd):
        return float(module.p)
    if isinstance(module, torch.jit.ScriptModule) and module.original_name in _SCRIPT_DROPOUT_TYPES:
        p = getattr(module, "p", None)
        return None if p is None else float(p)
    return False
