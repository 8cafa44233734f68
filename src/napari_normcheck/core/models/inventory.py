"""Which normalization layers a model has, and whether train and eval mode can differ at all.

Only layers that keep running statistics (BatchNorm, SyncBatchNorm, InstanceNorm with
``track_running_stats=True``) normalize differently in train and eval mode; GroupNorm, LayerNorm and
plain InstanceNorm normalize each input by its own statistics in both modes. The inventory says which
kind a model has, for eager modules and TorchScript alike, so a biologist knows what to expect before
running the check.
"""

from __future__ import annotations

import math
import re
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


# --- names a biologist reads ------------------------------------------------------------------

#: Module names of U-Net parts (lower case, without a trailing number), by the part they are.
_ENCODER_WORDS = frozenset(
    {"encoder", "encoders", "enc", "down", "downs", "downsample", "downsamples", "down_layers"}
    | {"contracting", "contract", "downconv", "down_blocks", "encoder_blocks"}
)
_DECODER_WORDS = frozenset(
    {"decoder", "decoders", "dec", "up", "ups", "upcat", "upsample", "upsamples", "up_layers"}
    | {"expanding", "expand", "upconv", "up_blocks", "decoder_blocks", "merge"}
)
_PLACE_WORDS = {
    "bottleneck": "bottleneck",
    "bottom": "bottleneck",
    "center": "bottleneck",
    "centre": "bottleneck",
    "bridge": "bottleneck",
    "middle": "bottleneck",
    "input_block": "input block",
    "inc": "input block",
    "stem": "input block",
    "output_block": "output block",
    "final_conv": "output block",
    "conv_final": "output block",
    "outc": "output block",
    "head": "output block",
    "seg_layers": "output block",
    "attention": "attention gate",
}
#: Containers between a part and its number (nnU-Net's ``encoder.stages.2``).
_CONTAINER_WORDS = frozenset({"stages", "layers", "blocks", "levels", "block", "stage"})
#: The last names of a normalization module itself (``adn.N``, ``norm``, ``bn1``, ``groupnorm``).
_NORM_LEAF = re.compile(
    r"^(n|adn|norm|bn|gn|ln|batchnorm|groupnorm|instancenorm|layernorm|norm_layer)_?\d*$",
    re.IGNORECASE,
)
_WORD_NUMBER = re.compile(r"^(?P<word>[A-Za-z][A-Za-z_]*?)_?(?P<number>\d+)?$")
#: A convolution of a block: ``conv_0``, ``conv1``, ``unit0`` (MONAI), ``SingleConv1`` (3D U-Net).
_CONV = re.compile(r"^(conv|unit|singleconv|conv_block)_?(?P<number>\d+)$", re.IGNORECASE)
#: A numbered norm (``norm1`` of DynUNet and SegResNet) says which convolution it follows.
_NUMBERED_NORM = re.compile(r"^(norm|bn|gn)_?(?P<number>\d+)$", re.IGNORECASE)


def readable_layer_name(module_path: str, module: nn.Module | str | None = None) -> str:
    """A normalization layer as its type and place in the network, for people, not for code.

    ``down_1.convs.conv_0.adn.N`` (a MONAI BasicUNet BatchNorm) reads
    ``"BatchNorm3d, encoder 1, conv 0"``. U-Net parts are recognised by their module names in MONAI
    (BasicUNet, UNet, AttentionUnet, DynUNet, SegResNet), nnU-Net (``encoder.stages.0.0.convs.1.norm``)
    and pytorch-3dunet (``encoders.1.basic_module.SingleConv1.groupnorm``); the numbers are those of
    the module path, so the path (shown beside it, e.g. in a tooltip) finds the same layer. Other
    networks read as the type and the path without the norm's own name (``"BatchNorm2d in
    features.3"``).

    Parameters
    ----------
    module_path : str
        Qualified module name, as in ``model.named_modules()`` (``""`` for the model itself).
    module : torch.nn.Module or str, optional
        The module, or its type name (``"BatchNorm3d"``); ``"norm layer"`` when not given.

    Returns
    -------
    str
        E.g. ``"BatchNorm3d, decoder 4, conv 1"`` or ``"GroupNorm, bottleneck, conv 2"``.
    """
    if module is None:
        kind = "norm layer"
    elif isinstance(module, str):
        kind = module
    elif isinstance(module, torch.jit.ScriptModule):
        kind = module.original_name
    else:
        kind = type(module).__name__
    tokens = [token for token in module_path.split(".") if token]
    if not tokens:
        return f"{kind} (the model)"
    place, rest = _monai_unet_place(tokens) or _named_place(tokens) or (None, tokens)
    if place is None:
        kept = list(tokens)
        while len(kept) > 1 and _NORM_LEAF.match(kept[-1]):
            kept.pop()
        return f"{kind} in {'.'.join(kept)}"
    return ", ".join([kind, place, *_block_parts(rest)])


def _monai_unet_place(tokens: list[str]) -> tuple[str, list[str]] | None:
    """MONAI UNet / AttentionUnet: ``model.1.submodule.1.submodule.0...`` nests one level per skip.

    At each level the Sequential holds the encoder block (0), the deeper levels (1) and the
    decoder block (2); the innermost ``submodule`` is the bottleneck.
    """
    if len(tokens) < 3 or tokens[0] != "model" or not tokens[1].isdigit():
        return None
    depth, i = 0, 1
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token == "submodule":
            depth += 1
            if not following.isdigit() and following not in ("attention", "upconv", "merge"):
                return "bottleneck", tokens[i + 1 :]
            i += 1
        elif token.isdigit() and following in ("submodule", "attention", "upconv", "merge"):
            i += 1  # the skip connection (or attention layer) holding the deeper levels
        elif token.isdigit():
            part = {0: "encoder", 2: "decoder"}.get(int(token))
            return (f"{part} {depth}", tokens[i + 1 :]) if part else None
        elif token == "attention":
            return f"attention gate {depth}", tokens[i + 1 :]
        elif token in ("upconv", "merge"):
            return f"decoder {depth}", tokens[i + 1 :]
        else:
            return None
    return None


def _named_place(tokens: list[str]) -> tuple[str, list[str]] | None:
    """Encoder / decoder / bottleneck from names (``down_1``, ``encoder.stages.0``, ``upsamples.2``)."""
    if tokens[0].lower() == "conv_0" and len(tokens) > 1:  # BasicUNet's first level
        return "encoder 0", tokens[1:]
    for i, token in enumerate(tokens):
        match = _WORD_NUMBER.match(token)
        if match is None:
            continue
        word, number = match["word"].lower(), match["number"]
        if word in _PLACE_WORDS or token.lower() in _PLACE_WORDS:
            return _PLACE_WORDS.get(token.lower(), _PLACE_WORDS.get(word)), tokens[i + 1 :]
        if word not in _ENCODER_WORDS and word not in _DECODER_WORDS:
            continue
        part = "encoder" if word in _ENCODER_WORDS else "decoder"
        rest = tokens[i + 1 :]
        if number is None:
            if rest and rest[0].lower() in _PLACE_WORDS:  # nnU-Net's ``encoder.stem``
                return _PLACE_WORDS[rest[0].lower()], rest[1:]
            if rest and rest[0].lower() in _CONTAINER_WORDS:
                rest = rest[1:]
            if rest and rest[0].isdigit():
                number, rest = rest[0], rest[1:]
        return (f"{part} {number}" if number is not None else part), rest
    return None


def _block_parts(rest: list[str]) -> list[str]:
    """``block N`` and ``conv N`` from what follows the part (the norm's own name dropped)."""
    parts: list[str] = []
    block = conv = None
    for i, token in enumerate(rest):
        following = rest[i + 1] if i + 1 < len(rest) else ""
        if token.isdigit() and conv is None and i > 0 and rest[i - 1].lower() in ("convs", "conv"):
            conv = token  # the n-th convolution of a Sequential of them
        elif token.isdigit() and block is None and conv is None and following:
            block = token  # (a last number is the norm's own place in a Sequential: no block)
        elif (match := _CONV.match(token)) and conv is None:
            conv = match["number"]
        elif (match := _NUMBERED_NORM.match(token)) and conv is None:
            conv = match["number"]
    if block is not None:
        parts.append(f"block {block}")
    if conv is not None:
        parts.append(f"conv {conv}")
    return parts
