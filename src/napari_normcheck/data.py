"""Synthetic EM-like sample volume and the two packaged sample models.

One module feeds the napari sample-data contribution, the tests, the demo and the training script
(``scripts/train_sample_models.py``), so all of them see the same kind of data.

The volume imitates a block of serial-section EM: a packed network of cells (3D Voronoi cells of
varied size from seeds of varying density) whose membranes are thin dark sheets, dark organelles
(mitochondria-like ellipsoids) inside some cells, and large bright featureless regions of embedding
resin (a half-space at one side and a lumen inside the tissue). The resin makes tiles differ
strongly in their intensity statistics, which is exactly what makes BatchNorm's batch statistics
and running statistics disagree.

Importing this module does not import torch; only :meth:`SampleModel.load` does.
"""

from __future__ import annotations

import importlib
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

DEFAULT_SHAPE: tuple[int, int, int] = (48, 192, 192)

# Sections are thicker than the in-plane pixel, as in serial-section EM: z distances count more.
_Z_ANISOTROPY = 1.5
# Block size of the nearest-seed search: keeps (block voxels x candidate seeds) small.
_BLOCK = (16, 32, 32)
_MEMBRANE_HALF_WIDTH = 1.0
_RESIN_LEVEL = 212.0
_CYTOPLASM_LEVEL = 150.0
_MEMBRANE_DEPTH = 100.0
_ORGANELLE_LEVEL = 85.0

_MODEL_DIR = pathlib.Path(__file__).parent / "models"
_UNET_FEATURES = (8, 8, 16, 16, 32, 8)


def make_synthetic_em(
    shape: tuple[int, int, int] = DEFAULT_SHAPE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate an EM-like volume with membrane and organelle labels.

    Parameters
    ----------
    shape : tuple of int
        ``(z, y, x)`` size in voxels. Any size works; the default takes about a second.
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same seed and shape give identical arrays.

    Returns
    -------
    raw : numpy.ndarray
        ``uint8`` array of ``shape``: bright resin, mid-grey cytoplasm, dark membranes and
        organelles, noise and a slight intensity drift along z.
    labels : numpy.ndarray
        ``uint8`` array of shape ``(2, *shape)`` holding 0/1: channel 0 is the cell boundary
        (membrane), channel 1 the organelles.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (z, y, x), not {shape!r}")
    rng = np.random.default_rng(seed)
    zz, yy, xx = _physical_axes(shape)

    tissue, edge_distance = _tissue_region(shape, zz, yy, xx, rng)
    seeds = _place_seeds(shape, tissue, rng)
    cell_id, membrane_distance = _voronoi(seeds, zz, yy, xx)
    # The membrane that lines the tissue sits just inside it, as thick as the others.
    membrane_distance = np.minimum(membrane_distance, np.abs(edge_distance - _MEMBRANE_HALF_WIDTH))

    membrane = tissue & (membrane_distance < _MEMBRANE_HALF_WIDTH)
    organelle, organelle_rim = _organelles(shape, seeds, cell_id, membrane_distance, tissue, rng)

    cytoplasm = _CYTOPLASM_LEVEL + rng.normal(0.0, 9.0, len(seeds))[cell_id]
    cytoplasm += _smooth_noise(shape, rng, scale=4, amplitude=8.0)
    intensity = np.where(tissue, cytoplasm, np.float32(_RESIN_LEVEL)).astype(np.float32)
    intensity[organelle] = _ORGANELLE_LEVEL + 0.5 * (cytoplasm[organelle] - _CYTOPLASM_LEVEL)
    intensity[organelle_rim] -= 35.0
    # A soft membrane profile, not a step: the label is the core of a smooth dark sheet.
    darkening = _MEMBRANE_DEPTH * np.exp(-((membrane_distance / 1.3) ** 2))
    intensity -= np.where(tissue, darkening, 0.0).astype(np.float32)
    intensity = _blur_inplane(intensity)

    # Embedding resin is cleaner than stained tissue; noise follows the (blurred) tissue mask.
    noise_sigma = 3.0 + 7.0 * _blur_inplane(tissue.astype(np.float32))
    intensity += noise_sigma * rng.standard_normal(shape, dtype=np.float32)
    # Section thickness and staining drift slowly through a stack.
    drift = 1.0 + 0.12 * (np.arange(shape[0], dtype=np.float32) / max(shape[0] - 1, 1) - 0.5)
    intensity *= drift[:, None, None]

    raw = np.clip(np.rint(intensity), 0, 255).astype(np.uint8)
    labels = np.stack([membrane, organelle]).astype(np.uint8)
    return raw, labels


def sample_volume(shape: tuple[int, int, int] = DEFAULT_SHAPE, seed: int = 0) -> np.ndarray:
    """Return only the raw image of :func:`make_synthetic_em` (the napari sample data).

    Parameters
    ----------
    shape : tuple of int
        ``(z, y, x)`` size in voxels.
    seed : int
        Random seed.

    Returns
    -------
    numpy.ndarray
        ``uint8`` raw volume.
    """
    return make_synthetic_em(shape, seed)[0]


@dataclass(frozen=True)
class SampleModel:
    """A tiny pretrained network shipped with the package, and how to run it.

    Parameters
    ----------
    name : str
        Key in :data:`SAMPLE_MODELS`.
    arch : str
        Import path of the network class.
    arch_kwargs : dict
        Keyword arguments that build the network.
    path : pathlib.Path
        The ``state_dict`` saved with :func:`torch.save`, inside the package.
    normalize : str
        Intensity normalization the model was trained with (``"minmax:0,255"`` maps 0..255 to
        0..1).
    activation : str
        Output activation that turns logits into probabilities.
    tile : tuple of int
        Suggested ``(z, y, x)`` tile; every side is a multiple of 16 (four 2x poolings).
    description : str
        One line for the user.
    """

    name: str
    arch: str
    arch_kwargs: dict[str, Any] = field(hash=False)
    path: pathlib.Path
    normalize: str
    activation: str
    tile: tuple[int, int, int]
    description: str

    def build(self) -> nn.Module:
        """Instantiate the untrained network from :attr:`arch` and :attr:`arch_kwargs`."""
        module_name, _, class_name = self.arch.rpartition(".")
        network_class = getattr(importlib.import_module(module_name), class_name)
        return network_class(**self.arch_kwargs)

    def load(self) -> nn.Module:
        """Build the network and load the packaged weights; returned in eval mode on the CPU."""
        import torch

        network = self.build()
        network.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        return network.eval()


def _unet_kwargs(norm: str | tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "features": _UNET_FEATURES,
        "norm": norm,
        "dropout": 0.0,
    }


SAMPLE_MODELS: dict[str, SampleModel] = {
    "batchnorm": SampleModel(
        name="batchnorm",
        arch="monai.networks.nets.BasicUNet",
        arch_kwargs=_unet_kwargs("batch"),
        path=_MODEL_DIR / "batchnorm_unet.pt",
        normalize="minmax:0,255",
        activation="sigmoid",
        tile=(48, 64, 64),
        description=(
            "Tiny 3D U-Net with BatchNorm trained with batch size 1: its running statistics fit "
            "few tiles, so train-mode and eval-mode predictions differ."
        ),
    ),
    "groupnorm": SampleModel(
        name="groupnorm",
        arch="monai.networks.nets.BasicUNet",
        arch_kwargs=_unet_kwargs(("group", {"num_groups": 4})),
        path=_MODEL_DIR / "groupnorm_unet.pt",
        normalize="minmax:0,255",
        activation="sigmoid",
        tile=(48, 64, 64),
        description=(
            "The same U-Net with GroupNorm: no running statistics, so train and eval mode agree."
        ),
    ),
}


def sample_model(name: str) -> SampleModel:
    """Look up a packaged sample model.

    Parameters
    ----------
    name : str
        ``"batchnorm"`` or ``"groupnorm"``.

    Returns
    -------
    SampleModel
        Its description; :meth:`SampleModel.load` gives the network.
    """
    try:
        return SAMPLE_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(SAMPLE_MODELS))
        raise KeyError(f"no sample model {name!r}; choose one of: {known}") from None


def _physical_axes(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates along z, y, x in in-plane pixel units (z stretched)."""
    z = np.arange(shape[0], dtype=np.float32) * np.float32(_Z_ANISOTROPY)
    return z, np.arange(shape[1], dtype=np.float32), np.arange(shape[2], dtype=np.float32)


def _tissue_region(
    shape: tuple[int, int, int],
    zz: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue mask and each voxel's distance to the tissue/resin interface.

    Resin fills a half-space beyond a wavy plane at high x (about the last third of the block) and
    an ellipsoidal lumen inside the tissue. Distances are approximations good near the interface,
    the only place they matter (the membrane that lines the tissue).
    """
    nz, ny, nx = shape
    z3, y3, x3 = zz[:, None, None], yy[None, :, None], xx[None, None, :]
    phase = rng.uniform(0, 2 * np.pi, 2)
    edge_x = nx * rng.uniform(0.6, 0.68) + 0.06 * nx * (
        np.sin(2 * np.pi * y3 / max(ny, 1) * 1.3 + phase[0])
        + 0.5 * np.sin(2 * np.pi * z3 / max(nz * _Z_ANISOTROPY, 1) + phase[1])
    )
    half_space_distance = edge_x - x3  # positive inside the tissue

    centre = np.array(
        [
            rng.uniform(0.3, 0.7) * nz * _Z_ANISOTROPY,
            rng.uniform(0.25, 0.75) * ny,
            rng.uniform(0.15, 0.35) * nx,
        ],
        dtype=np.float32,
    )
    radii = np.array(
        [0.45 * nz * _Z_ANISOTROPY, 0.13 * ny, 0.11 * nx], dtype=np.float32
    ) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    scaled = np.sqrt(
        ((z3 - centre[0]) / radii[0]) ** 2
        + ((y3 - centre[1]) / radii[1]) ** 2
        + ((x3 - centre[2]) / radii[2]) ** 2
    )
    lumen_distance = (scaled - 1.0) * radii[1:].min()  # positive outside the lumen

    tissue = (half_space_distance > 0) & (lumen_distance > 0)
    edge_distance = np.minimum(np.abs(half_space_distance), np.abs(lumen_distance))
    return tissue, edge_distance.astype(np.float32)


def _place_seeds(
    shape: tuple[int, int, int], tissue: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Cell centres in physical units: dense clusters of small cells among sparse large ones.

    Dart throwing with a spacing that shrinks where a smooth density bump is high, so cell diameters
    range from about 10 to 30 pixels.
    """
    extent = np.array(shape, dtype=np.float32) * np.array([_Z_ANISOTROPY, 1, 1], np.float32)
    bumps = rng.uniform(0, 1, (3, 3)) * extent
    bump_width = 0.25 * extent[1:].mean()

    def spacing(points: np.ndarray) -> np.ndarray:
        density = np.exp(
            -(((points[:, None, :] - bumps[None]) ** 2).sum(-1)) / (2 * bump_width**2)
        ).max(1)
        return 24.0 - 13.0 * density

    accepted = np.empty((0, 3), dtype=np.float32)
    accepted_spacing = np.empty(0, dtype=np.float32)
    failures = 0
    # Stop after many consecutive rejections: the block is then full at the local spacing.
    while failures < 300:
        candidates = (rng.uniform(0, 1, (64, 3)) * extent).astype(np.float32)
        voxel = np.minimum((candidates / [_Z_ANISOTROPY, 1, 1]).astype(int), np.array(shape) - 1)
        in_tissue = tissue[voxel[:, 0], voxel[:, 1], voxel[:, 2]]
        failures += int((~in_tissue).sum())
        candidates = candidates[in_tissue]
        for point, min_gap in zip(candidates, spacing(candidates), strict=True):
            gaps = np.sqrt(((accepted - point) ** 2).sum(1))
            if np.all(gaps > 0.5 * (min_gap + accepted_spacing)):
                accepted = np.vstack([accepted, point])
                accepted_spacing = np.append(accepted_spacing, min_gap)
                failures = 0
            else:
                failures += 1
    if len(accepted) < 2:  # a tiny or all-resin block still needs two cells for a boundary
        accepted = (rng.uniform(0, 1, (2, 3)) * extent).astype(np.float32)
    return accepted


def _voronoi(
    seeds: np.ndarray, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-seed index and exact distance to the nearest Voronoi face, block by block.

    For each block only seeds that can be the first or second nearest of some voxel are tested:
    a seed whose closest approach to the block is farther than the second-smallest farthest
    approach of any seed can be neither. This keeps the cost near (voxels x a few dozen seeds).
    """
    shape = (len(zz), len(yy), len(xx))
    cell_id = np.empty(shape, dtype=np.int32)
    face_distance = np.empty(shape, dtype=np.float32)
    for z0 in range(0, shape[0], _BLOCK[0]):
        for y0 in range(0, shape[1], _BLOCK[1]):
            for x0 in range(0, shape[2], _BLOCK[2]):
                block = (
                    slice(z0, z0 + _BLOCK[0]),
                    slice(y0, y0 + _BLOCK[1]),
                    slice(x0, x0 + _BLOCK[2]),
                )
                axes = (zz[block[0]], yy[block[1]], xx[block[2]])
                ids, distance = _voronoi_block(seeds, axes)
                cell_id[block] = ids
                face_distance[block] = distance
    return cell_id, face_distance


def _voronoi_block(
    seeds: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    low = np.array([a[0] for a in axes], dtype=np.float32)
    high = np.array([a[-1] for a in axes], dtype=np.float32)
    nearest_gap = np.clip(seeds, low, high) - seeds
    farthest_gap = np.maximum(np.abs(seeds - low), np.abs(seeds - high))
    min_reach = (nearest_gap**2).sum(1)
    max_reach = (farthest_gap**2).sum(1)
    bound = np.partition(max_reach, 1)[1]
    candidates = seeds[min_reach <= bound]
    candidate_ids = np.flatnonzero(min_reach <= bound)

    squared = (
        (axes[0][:, None, None, None] - candidates[:, 0]) ** 2
        + (axes[1][None, :, None, None] - candidates[:, 1]) ** 2
        + (axes[2][None, None, :, None] - candidates[:, 2]) ** 2
    )
    two = np.argpartition(squared, 1, axis=-1)[..., :2]
    d_two = np.take_along_axis(squared, two, axis=-1)
    order = np.argsort(d_two, axis=-1)
    two = np.take_along_axis(two, order, axis=-1)
    d_two = np.take_along_axis(d_two, order, axis=-1)
    separation = np.sqrt(((candidates[two[..., 0]] - candidates[two[..., 1]]) ** 2).sum(-1))
    # Distance from a point to the bisecting plane of its two nearest seeds.
    face = (d_two[..., 1] - d_two[..., 0]) / (2.0 * np.maximum(separation, 1e-6))
    return candidate_ids[two[..., 0]], face


def _organelles(
    shape: tuple[int, int, int],
    seeds: np.ndarray,
    cell_id: np.ndarray,
    membrane_distance: np.ndarray,
    tissue: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Elongated ellipsoids near some cell centres, clipped to stay inside their cell.

    Returns the organelle mask (the label) and its one-voxel inner rim (drawn darker, like the
    double membrane of a mitochondrion).
    """
    organelle = np.zeros(shape, dtype=bool)
    rim = np.zeros(shape, dtype=bool)
    scale = np.array([_Z_ANISOTROPY, 1, 1], dtype=np.float32)
    for index, seed_point in enumerate(seeds):
        if rng.uniform() > 0.7:
            continue
        for _ in range(rng.integers(1, 3)):
            centre = seed_point + rng.normal(0, 2.0, 3).astype(np.float32)
            half_length = rng.uniform(5.0, 10.0)
            half_width = rng.uniform(3.0, 4.5)
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            reach = half_length + 1
            low = np.maximum(np.floor((centre - reach) / scale).astype(int), 0)
            high = np.minimum(np.ceil((centre + reach) / scale).astype(int) + 1, shape)
            if np.any(high <= low):
                continue
            box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
            grid = (
                np.stack(
                    np.meshgrid(
                        *(np.arange(lo, hi) for lo, hi in zip(low, high, strict=True)),
                        indexing="ij",
                    ),
                    axis=-1,
                ).astype(np.float32)
                * scale
                - centre
            )
            along = grid @ axis.astype(np.float32)
            across = np.sqrt(np.maximum((grid**2).sum(-1) - along**2, 0))
            radius = np.sqrt((along / half_length) ** 2 + (across / half_width) ** 2)
            inside = (
                (radius < 1.0)
                & (cell_id[box] == index)
                & (membrane_distance[box] > 2.0)
                & tissue[box]
            )
            organelle[box] |= inside
            rim[box] |= inside & (radius > 1.0 - 1.2 / half_width)
    return organelle, rim


def _smooth_noise(
    shape: tuple[int, int, int], rng: np.random.Generator, scale: int, amplitude: float
) -> np.ndarray:
    """Low-frequency texture: coarse Gaussian noise repeated up by ``scale`` and blurred."""
    coarse_shape = tuple(-(-s // scale) for s in shape)
    coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
    fine = (
        coarse.repeat(scale, 0)
        .repeat(scale, 1)
        .repeat(scale, 2)[: shape[0], : shape[1], : shape[2]]
    )
    for _ in range(2):
        fine = _blur_inplane(fine)
    return amplitude * fine / max(float(fine.std()), 1e-6)


def _blur_inplane(volume: np.ndarray) -> np.ndarray:
    """Smooth by [1, 2, 1] / 4 along y and x (edges repeated), a cheap stand-in for the PSF."""
    out = volume.astype(np.float32, copy=True)
    for axis in (1, 2):
        padded = np.concatenate(
            [np.take(out, [0], axis=axis), out, np.take(out, [-1], axis=axis)], axis=axis
        )
        n = out.shape[axis]
        out = 0.25 * (
            np.take(padded, np.arange(0, n), axis=axis)
            + 2 * np.take(padded, np.arange(1, n + 1), axis=axis)
            + np.take(padded, np.arange(2, n + 2), axis=axis)
        )
    return out
