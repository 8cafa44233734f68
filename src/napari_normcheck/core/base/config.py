"""One configuration object for the command line, the widget and the report."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import parse_roi

ACTIVATIONS = ("none", "sigmoid", "softmax")
OUTPUT_DTYPES = ("auto", "float32", "float16", "uint8")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


#: ``--cache-mb``'s default. Spilled chunks and slabs go to a file whose space is reused, so on a
#: 64x2048x2048 volume 64 MB ran as fast as 256 MB (61.5 against 61.7 s, tile 32x256x256) with
#: 0.3 GB less resident memory (1.02 against 1.33 GB): ``benchmarks/bench_pipeline.py --memory``.
#: On 64x1024x1024 it costs 0-10% (12.6-13.0 s against 11.2-12.7 s; 1.04-1.08 against 1.36-1.39 GB).
DEFAULT_CACHE_MB = 64


@dataclass(frozen=True)
class RunConfig:
    """How a two-mode check runs: tiling, batching, input normalization and outputs.

    Attributes
    ----------
    tile : tuple of int or None
        Tile shape ``(z, y, x)``; ``None`` picks one from the model and the volume. A 2D model uses
        ``z = 1``. In ``crop`` mode this is the inner block written per tile.
    overlap : float
        Overlap fraction between neighbouring tiles in blend modes, in ``[0, 1)``.
    blend : str
        ``"constant"`` or ``"gaussian"`` (as MONAI's sliding window) or ``"crop"`` (tile + halo,
        inner block written).
    halo : tuple of int
        Context on each side in ``crop`` mode.
    roi : tuple of (int, int) or None
        Region of interest ``((z0, z1), (y0, y1), (x0, x1))``; whole volume when ``None``.
    train_batch : int
        Tiles per train-mode forward; tiles in one batch share batch statistics (1 = typical training).
    eval_batch : int or None
        Tiles per eval-mode forward; ``None``: 1 on CPU, 4 on CUDA (halved on out-of-memory).
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    normalize : str
        Input intensity spec: ``none``, ``minmax:LO,HI``, ``meanstd:MEAN,STD``, ``percentile:P_LO,P_HI``.
    activation : str
        Applied after stitching: ``none``, ``sigmoid`` or ``softmax`` (over channels).
    output_dtype : str
        How predictions, disparity and seams are stored: ``uint8`` (probability x 255, rounded),
        ``float16`` or ``float32``. ``auto`` (the default) is ``uint8`` after a sigmoid or softmax
        and ``float32`` for logits (``activation="none"``); it is resolved when the config is made.
        Every metric is computed in float32 before any rounding.
    pyramid_side : int
        Voxel outputs get 2x-downsampled levels in y and x until a level fits this many voxels a
        side (one screen), so napari browses a whole result smoothly; 0 writes level 0 only.
    seams : bool
        Also store the voxel maps ``seams_eval`` and ``seams_train`` (largest disagreement of
        overlapping tiles per voxel). The tile mismatch numbers are computed either way.
    threshold : float
        Probability above which a voxel counts as foreground in hard Dice.
    min_foreground : tuple of (int, float)
        ``(voxels, fraction)``: a hard Dice (disparity, tile mismatch; global, per tile) is judged
        only where the two predictions together have at least this many foreground voxels and
        this fraction of the voxels compared; elsewhere it is "not judged" and the soft value
        speaks for it. Why 1000 voxels and 0.1 %: :mod:`napari_normcheck.core.measure.support`.
    spatial_dims : int or None
        Spatial dims of the model (2 or 3); probed when ``None``.
    cache_mb : int
        Memory for blending buffers of unfinished output chunks, and half as much again for the
        overlap slabs tiles keep for their later neighbours; beyond it both spill to disk, so
        memory does not grow with the width of the volume.
    prefetch : int
        Tiles read ahead by the reader thread.
    precision : str
        ``fp32`` (IEEE float32, the default), ``tf32`` (TF32 tensor cores on CUDA), ``bf16`` or
        ``fp16`` (autocast; normalization buffers stay float32). Reduced precision changes the
        predictions; the run measures by how much on a few tiles.
    fuse_train : bool
        On CUDA with ``train_batch == 1``: run the train pass several tiles per forward, each
        normalized by its own statistics (the batch-1 result, to float rounding).
    threads : int
        CPU threads torch uses for the forwards and the per-voxel work while tiles run (``0``,
        the default: leave torch's setting, which follows ``OMP_NUM_THREADS``); the process
        setting is restored after the run. Results do not depend on it.
    grid_shift : float
        ``F`` in ``(0, 1)``: also predict on a second grid whose tiles start ``round(F * step)``
        voxels later along each tiled axis, and report how much the stitched result changes
        (``1 - Dice`` of the two, :mod:`~napari_normcheck.core.run.grid_shift`). ``0`` (the
        default) turns it off. It costs one more set of forwards per prediction.
    """

    tile: tuple[int, int, int] | None = None
    overlap: float = 0.25
    blend: str = "gaussian"
    halo: tuple[int, int, int] = (0, 0, 0)
    roi: tuple[tuple[int, int], ...] | None = None
    train_batch: int = 1
    eval_batch: int | None = None
    device: str = "auto"
    normalize: str = "none"
    activation: str = "none"
    output_dtype: str = "auto"
    threshold: float = 0.5
    min_foreground: tuple[int, float] = (1000, 0.001)
    spatial_dims: int | None = None
    feature_layers: tuple[str, ...] = field(default_factory=tuple)
    cache_mb: int = DEFAULT_CACHE_MB
    prefetch: int = 2
    precision: str = "fp32"
    fuse_train: bool = True
    seams: bool = False
    pyramid_side: int = 1024
    grid_shift: float = 0.0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.blend not in ("constant", "gaussian", "crop"):
            raise NormcheckError(f"unknown blend {self.blend!r}; use constant, gaussian or crop")
        if not 0 <= self.overlap < 1:
            raise NormcheckError(f"overlap {self.overlap} is outside [0, 1); use e.g. 0.25")
        if self.activation not in ACTIVATIONS:
            raise NormcheckError(
                f"unknown activation {self.activation!r}; use {', '.join(ACTIVATIONS)}"
            )
        if self.output_dtype not in OUTPUT_DTYPES:
            raise NormcheckError(
                f"unknown output dtype {self.output_dtype!r}; use {', '.join(OUTPUT_DTYPES)}"
            )
        if self.output_dtype == "auto":
            stored = "float32" if self.activation == "none" else "uint8"
            object.__setattr__(self, "output_dtype", stored)
        elif self.output_dtype == "uint8" and self.activation == "none":
            raise NormcheckError(
                "uint8 outputs hold probabilities (0-255); with --activation none the logits "
                "need --output-dtype float32 or float16"
            )
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise NormcheckError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.train_batch < 1 or (self.eval_batch is not None and self.eval_batch < 1):
            raise NormcheckError("batch sizes must be at least 1")
        if self.threads < 0:
            raise NormcheckError(
                f"threads {self.threads} is negative; use 0 (torch's choice) or a count of threads"
            )
        if self.cache_mb < 0:
            raise NormcheckError(
                f"cache {self.cache_mb} MB is negative; give the memory for unfinished chunks in MB "
                f"(0 spills every chunk; default {DEFAULT_CACHE_MB})"
            )
        if self.spatial_dims not in (None, 2, 3):
            raise NormcheckError(f"spatial dims must be 2 or 3, not {self.spatial_dims}")
        if self.precision not in PRECISIONS:
            raise NormcheckError(
                f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}"
            )
        if not 0 <= self.grid_shift < 1:
            raise NormcheckError(
                f"grid shift {self.grid_shift} is outside (0, 1): give the fraction of a tile step "
                "to shift the second grid by (e.g. 0.5), or 0 for none"
            )
        if not 0 < self.threshold < 1:
            raise NormcheckError(f"threshold {self.threshold} must lie in (0, 1)")
        voxels, fraction = self.min_foreground
        if (
            isinstance(voxels, bool)
            or voxels != int(voxels)
            or voxels < 0
            or not 0 <= fraction <= 2
        ):
            raise NormcheckError(
                f"minimum foreground {voxels},{fraction}: give whole voxels >= 0 and a fraction "
                "of the region in [0, 2] (e.g. 1000,0.001)"
            )
        object.__setattr__(self, "min_foreground", (int(voxels), float(fraction)))

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (newer versions may add some)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("tile", "halo", "feature_layers", "min_foreground"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if values.get("roi") is not None:
            values["roi"] = tuple(tuple(pair) for pair in values["roi"])
        return cls(**values)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **defaults: Any) -> RunConfig:
        """Build the configuration from option values as a user gave them.

        The one way the command line, the demo and the widget make a configuration; a stored
        configuration is read back with :meth:`from_dict` instead.

        Parameters
        ----------
        options : mapping of str to Any
            Option values by field name, as typed or already parsed: ``tile`` and ``halo`` as
            ``"Z,Y,X"`` / ``"Y,X"`` or a sequence, ``roi`` as ``"z0:z1,y0:y1,x0:x1"`` or pairs,
            ``feature_layers`` comma separated or a sequence, numbers as numbers or text.
            ``None`` or blank text means "not given"; so does ``"auto"`` for ``tile`` and
            ``eval_batch``.
        **defaults
            Values used for options not given (e.g. a model package's ``normalize`` and
            ``activation``, the model's ``spatial_dims``), parsed the same way; the dataclass
            defaults apply to what neither gives.

        Returns
        -------
        RunConfig
            The validated configuration.

        Raises
        ------
        NormcheckError
            For an unknown option or a value that cannot be read, naming the option.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted((set(options) | set(defaults)) - set(names))
        if unknown:
            raise NormcheckError(
                f"unknown run option(s) {', '.join(unknown)}; known: {', '.join(names)}"
            )
        values = {}
        for name in names:
            value = options.get(name)
            if not _given(name, value):
                value = defaults.get(name)
            if _given(name, value):
                values[name] = _OPTION_PARSERS.get(name, _text)(value, name)
        return cls(**values)


def _given(name: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        text = value.strip()
        return bool(text) and not (text == "auto" and name in ("tile", "eval_batch"))
    return True


def _text(value: Any, name: str) -> str:
    return str(value).strip()


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NormcheckError(f"cannot read {name} {value!r}; give a number") from None


def _whole_number(value: Any, name: str) -> int:
    try:
        # operator.index refuses floats and bools, which int() would silently truncate.
        if isinstance(value, bool):
            raise TypeError
        return int(value.strip()) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        raise NormcheckError(f"cannot read {name} {value!r}; give a whole number") from None


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise NormcheckError(f"cannot read {name} {value!r}; give true or false")


def _tile(value: Any, name: str) -> tuple[int, int, int]:
    tile = _int_triple(value, name)
    if min(tile) < 1:
        raise NormcheckError(f"tile {tile} has a side below one voxel; give positive sides")
    return tile


def _halo(value: Any, name: str) -> tuple[int, int, int]:
    halo = _int_triple(value, name)
    if min(halo) < 0:
        raise NormcheckError(f"halo {halo} is negative; give sides >= 0")
    return halo


def _int_triple(value: Any, name: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        return parse_int_triple(value.strip(), name)
    if not isinstance(value, Sequence):
        raise NormcheckError(f"cannot read {name} {value!r}; write Z,Y,X (e.g. 32,128,128)")
    return _pad_triple(tuple(_whole_number(v, name) for v in value), name, value)


def _roi(value: Any, name: str) -> tuple[tuple[int, int], ...]:
    if isinstance(value, str):
        return parse_roi(value.strip())
    try:
        pairs = tuple((_whole_number(a, name), _whole_number(b, name)) for a, b in value)
    except (TypeError, ValueError):
        raise NormcheckError(
            f"cannot read {name} {value!r}; give start:stop pairs, e.g. 0:32,100:356,100:356"
        ) from None
    return pairs


def _min_foreground(value: Any, name: str) -> tuple[int, float]:
    # "VOXELS" or "VOXELS,FRACTION" (the fraction keeps its default when left out).
    parts = value.split(",") if isinstance(value, str) else list(value)
    if not 1 <= len(parts) <= 2:
        raise NormcheckError(
            f"cannot read {name} {value!r}; write VOXELS[,FRACTION], e.g. 1000,0.001"
        )
    voxels = _whole_number(parts[0], name)
    fraction = _number(parts[1], name) if len(parts) == 2 else RunConfig.min_foreground[1]
    return voxels, fraction


def _names(value: Any, name: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


#: How each option is read; fields not named here are text.
_OPTION_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "tile": _tile,
    "halo": _halo,
    "roi": _roi,
    "overlap": _number,
    "grid_shift": _number,
    "threshold": _number,
    "min_foreground": _min_foreground,
    "train_batch": _whole_number,
    "eval_batch": _whole_number,
    "spatial_dims": _whole_number,
    "cache_mb": _whole_number,
    "prefetch": _whole_number,
    "pyramid_side": _whole_number,
    "threads": _whole_number,
    "feature_layers": _names,
    "seams": _flag,
    "fuse_train": _flag,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def parse_int_triple(text: str, what: str) -> tuple[int, int, int]:
    """Parse ``"Z,Y,X"`` (or ``"Y,X"``, giving ``Z = 1``) into three ints.

    Parameters
    ----------
    text : str
        Comma-separated sizes.
    what : str
        Name for the error message (``"tile"``, ``"halo"``).

    Returns
    -------
    tuple of int
        ``(z, y, x)``.
    """
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise NormcheckError(
            f"cannot read {what} {text!r}; write Z,Y,X (e.g. 32,128,128)"
        ) from None
    return _pad_triple(values, what, text)


def _pad_triple(values: tuple[int, ...], what: str, given: Any) -> tuple[int, int, int]:
    # Two values are Y,X of a 2D model: one slice of tile, no halo in z.
    if len(values) == 2:
        values = (1, *values) if what == "tile" else (0, *values)
    if len(values) != 3:
        raise NormcheckError(f"{what} {given!r} needs 3 values Z,Y,X (or Y,X for a 2D model)")
    return values  # type: ignore[return-value]
