"""Blend tile predictions into output chunks, holding only unfinished chunks in memory.

The accumulator follows MONAI's ``sliding_window_inference`` arithmetic exactly: each tile's prediction
is multiplied by the importance map, added to a running sum in tile order, the importance map is added to
a weight sum, and the output is ``sum / weight`` in float32. Instead of one buffer for the whole volume,
sums live per output chunk; a chunk is handed to ``on_chunk_done`` as soon as the last tile that touches
it (known from the plan) has been added, then dropped. Its weight sum depends on the plan alone, so it
is summed (in the same tile order) when the chunk finishes, not held beside it. Unfinished chunks beyond
``max_bytes`` spill to a raw file in a scratch folder (the one needed last first; its space reused,
:class:`~napari_normcheck.core.io.spill.SpillFile`), so memory depends on tile size, not on volume size.

The sums are torch tensors on the run's device, where the predictions are made: on a GPU no tile
crosses to the host to be blended, and on the CPU each multiply and add uses the cores torch is given.
Element-wise float32 multiplies, adds and divides round the same on every device and in NumPy, so the
blend is bit for bit the one NumPy (and MONAI on the CPU) computes.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_normcheck.core.base.scratch import ScratchBuffer
from napari_normcheck.core.base.tiling import Tile, TilePlan
from napari_normcheck.core.io.spill import SpillFile

ChunkIndex = tuple[int, int, int]
#: Memory for the weight sums of chunks placed alike in the tile grid (reused, not recomputed).
WEIGHT_CACHE_BYTES = 32 * 2**20
ChunkCallback = Callable[[ChunkIndex, tuple[slice, slice, slice], torch.Tensor], None]


def importance_map(window_shape: tuple[int, ...], mode: str, spatial_dims: int = 3) -> np.ndarray:
    """The blending weight of a tile: MONAI's own ``compute_importance_map``.

    Parameters
    ----------
    window_shape : tuple of int
        Tile shape ``(z, y, x)``.
    mode : {"constant", "gaussian", "crop"}
        ``crop`` writes inner blocks unweighted (ones).
    spatial_dims : int
        2 for a 2D model: the map is computed on ``(y, x)`` (as a per-plane MONAI call would) and
        broadcast over the single z-plane.

    Returns
    -------
    numpy.ndarray
        float32 weights of shape ``window_shape``.
    """
    if mode == "crop":
        return np.ones(window_shape, dtype=np.float32)
    shape = tuple(window_shape[-spatial_dims:])
    return gaussian_or_constant_map(shape, mode).reshape(window_shape)


def gaussian_or_constant_map(patch_size: tuple[int, ...], mode: str) -> np.ndarray:
    """MONAI's ``compute_importance_map`` (sigma scale 0.125), op for op in torch float32.

    Written out here so that a run does not import MONAI (seconds of start-up); a test holds it
    bitwise equal to MONAI's function.
    """
    if mode == "constant":
        weights = torch.ones(patch_size, dtype=torch.float)
    elif mode == "gaussian":
        sigmas = [size * 0.125 for size in patch_size]
        for i, size in enumerate(patch_size):
            x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float)
            x = torch.exp(x**2 / (-2 * sigmas[i] ** 2))
            weights = weights.unsqueeze(-1) * x[(None,) * i] if i > 0 else x
    else:
        raise ValueError(f"unknown blend mode {mode!r}")
    floor = max(torch.min(weights).item(), 1e-3)
    weights = torch.clamp_(weights.to(torch.float), min=floor)
    return weights.numpy().astype(np.float32)


class ChunkAccumulator:
    """Weighted sums of tile predictions per output chunk.

    Parameters
    ----------
    plan : TilePlan
        The run's plan (chunk grid and contributing tiles).
    n_values : int
        Leading size of every prediction handed to :meth:`add` (modes x channels).
    weights : numpy.ndarray or torch.Tensor
        Importance map of one window (``plan.window_shape``).
    on_chunk_done : callable
        ``on_chunk_done(chunk_index, roi_slices, values)`` with ``values`` a float32 tensor
        ``(n_values, cz, cy, cx)`` on ``device`` = blended output; called once per chunk, in
        completion order. The tensor is the caller's from then on.
    scratch_dir : path-like
        Folder for spilled chunks (created on demand, removed by :meth:`close`).
    max_bytes : int
        Memory for unfinished chunks; beyond it, those needed last spill to disk.
    done_chunks : set of ChunkIndex, optional
        Chunks already finished in an earlier, interrupted run: their contributions are skipped.
    chunk_box : pair of tuple of int, optional
        Chunk index range ``([z0, y0, x0], [z1, y1, x1])`` to accumulate (a distributed block);
        contributions to chunks outside it are skipped. All chunks when ``None``.
    tiles : list of int, optional
        The tiles that will be added (a block's task); chunks are finished after the last of them.
        All tiles of the plan when ``None``.
    device : torch.device or str
        Where the sums are held and added (the run's device); spilled chunks go through the host.
    """

    def __init__(
        self,
        plan: TilePlan,
        n_values: int,
        weights: np.ndarray,
        on_chunk_done: ChunkCallback,
        scratch_dir: str | Path,
        max_bytes: int = 512 * 2**20,
        done_chunks: set[ChunkIndex] | None = None,
        chunk_box: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
        tiles: list[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.plan = plan
        self.n_values = n_values
        self.device = torch.device(device)
        self.weights = torch.as_tensor(
            weights, dtype=torch.float32, device=self.device
        ).contiguous()
        self.on_chunk_done = on_chunk_done
        self.scratch_dir = Path(scratch_dir)
        self.max_bytes = max_bytes
        self.remaining = plan.chunk_contributors(tiles)
        self.chunk_box = chunk_box
        # Per chunk, the tiles still to add to it, in run order: what to spill is the chunk needed
        # last (Belady's choice). Least recently used spilled every pending chunk of a z-layer of
        # tiles once the layer outgrew the budget (the scan comes back to the oldest first).
        self._users: dict[ChunkIndex, deque[int]] = {}
        for index in range(plan.n_tiles) if tiles is None else sorted(tiles):
            for chunk in self.tile_chunks(plan.get_tile(index)):
                self._users.setdefault(chunk, deque()).append(index)
        # A chunk's summed weights depend on the plan only: computed when it finishes, not kept
        # beside its sums (a fifth less memory and spill with two modes of two channels).
        self._contributors = {chunk: tuple(users) for chunk, users in self._users.items()}
        self._weight_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._scratch = ScratchBuffer()  # a tile's weighted part of a chunk, before it is added
        self.done_chunks: set[ChunkIndex] = set(done_chunks or ())
        self._buffers: OrderedDict[ChunkIndex, _Partial] = OrderedDict()
        self._spilled = SpillFile(self.scratch_dir / "chunks.f32")
        self._spilled_origins: dict[ChunkIndex, tuple[int, ...]] = {}
        self._bytes = 0
        self.spill_count = 0
        self.spill_seconds = 0.0  # writing and reading spilled chunks

    def chunk_slices(self, chunk: ChunkIndex) -> tuple[slice, slice, slice]:
        """ROI-relative voxel slices of ``chunk``."""
        return tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(chunk, self.plan.chunk_shape, self.plan.roi_shape)
        )  # type: ignore[return-value]

    def tile_chunks(self, tile: Tile) -> list[ChunkIndex]:
        """Chunks that ``tile`` writes into (inside :attr:`chunk_box`)."""
        ranges = self.plan.chunk_range(tile)
        if self.chunk_box is not None:
            ranges = tuple(
                (max(a, lo), min(b, hi)) for (a, b), lo, hi in zip(ranges, *self.chunk_box)
            )
        return list(itertools.product(*(range(a, b) for a, b in ranges)))

    def needs(self, tile: Tile) -> bool:
        """Whether ``tile`` still contributes to an unfinished chunk (resume skips it otherwise)."""
        return any(c not in self.done_chunks for c in self.tile_chunks(tile))

    def add(
        self,
        tile: Tile,
        prediction: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    ) -> list[ChunkIndex]:
        """Add the prediction of ``tile``; return the chunks finished by it.

        ``prediction`` is ``(n_values, *window_shape)``, or a sequence of them whose leading sizes
        add up to ``n_values`` (the modes, without concatenating them first); tensors on
        :attr:`device` are used where they are, arrays are moved there.
        """
        single = isinstance(prediction, (torch.Tensor, np.ndarray))
        parts = [
            torch.as_tensor(part, dtype=torch.float32, device=self.device)
            for part in ([prediction] if single else prediction)
        ]
        finished = []
        for chunk in self.tile_chunks(tile):
            if chunk in self.done_chunks:
                continue
            in_tile, in_chunk = self._overlap(tile, chunk)
            partial = self._buffer(chunk, in_chunk)
            in_partial = partial.local(in_chunk)
            w = self.weights[in_tile]
            # The same float32 operations, in the same order, as MONAI: sum += pred * w (and
            # count += w, in the same tile order, when the chunk finishes).
            first = 0
            scratch = None
            for part in parts:
                view = partial.values[(slice(first, first + len(part)), *in_partial)]
                if scratch is None or scratch.shape != view.shape:
                    scratch = self._scratch.empty(tuple(view.shape), self.device)
                torch.mul(part[(slice(None), *in_tile)], w, out=scratch)
                view.add_(scratch)
                first += len(part)
            self.remaining[chunk] -= 1
            users = self._users.get(chunk)
            while users and users[0] <= tile.index:
                users.popleft()
            if self.remaining[chunk] == 0:
                self._finish(chunk)
                finished.append(chunk)
        return finished

    def _overlap(
        self, tile: Tile, chunk: ChunkIndex
    ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Where ``tile``'s write box meets ``chunk``: slices in the window and in the chunk."""
        roi_start = self.plan.roi_start
        chunk_slices = self.chunk_slices(chunk)
        lo = [max(a, r + s.start) for a, r, s in zip(tile.write_start, roi_start, chunk_slices)]
        hi = [min(b, r + s.stop) for b, r, s in zip(tile.write_stop, roi_start, chunk_slices)]
        in_tile = tuple(slice(a - w, b - w) for a, b, w in zip(lo, hi, tile.window_start))
        in_chunk = tuple(
            slice(a - r - s.start, b - r - s.start)
            for a, b, r, s in zip(lo, hi, roi_start, chunk_slices)
        )
        return in_tile, in_chunk

    def chunk_weight(self, chunk: ChunkIndex) -> torch.Tensor:
        """The summed importance weights of ``chunk``: ``count += w`` over its tiles, in run order.

        Chunks placed alike in the tile grid have the same sum: it is computed once for them.
        """
        shape = tuple(s.stop - s.start for s in self.chunk_slices(chunk))
        parts = [self._overlap(self.plan.get_tile(i), chunk) for i in self._contributors[chunk]]
        key = (shape, tuple(tuple((s.start, s.stop) for s in a + b) for a, b in parts))
        weight = self._weight_cache.get(key)
        if weight is None:
            weight = torch.zeros(shape, dtype=torch.float32, device=self.device)
            for in_tile, in_chunk in parts:
                weight[in_chunk] += self.weights[in_tile]
            self._weight_cache[key] = weight
            # Bounded apart from the chunk budget: a few placements cover a regular grid.
            while len(self._weight_cache) > 1 and (
                sum(_nbytes(w) for w in self._weight_cache.values()) > WEIGHT_CACHE_BYTES
            ):
                self._weight_cache.popitem(last=False)
        return weight

    def _finish(self, chunk: ChunkIndex) -> None:
        partial = self._buffers.pop(chunk)
        self._bytes -= _nbytes(partial.values)
        shape = tuple(s.stop - s.start for s in self.chunk_slices(chunk))
        # The tiles' write boxes cover every voxel, so the box is the whole chunk by now.
        total = self._grown(partial, (0,) * len(shape), shape).values
        total.div_(self.chunk_weight(chunk))
        self.done_chunks.add(chunk)
        self.on_chunk_done(chunk, self.chunk_slices(chunk), total)

    def _buffer(self, chunk: ChunkIndex, need: tuple[slice, ...]) -> _Partial:
        """The chunk's sums, covering at least the chunk-local box ``need``.

        Only the planes the chunk's tiles have added to so far are held (and spilled): a z-layer
        of chunks waits for the next layer of tiles with only the first tiles' overlap added (8 of
        24 planes at tile 32, overlap 0.25), the rest zeros that need no memory or disk.
        """
        partial = self._buffers.pop(chunk, None)
        if partial is not None:
            self._bytes -= _nbytes(partial.values)
        elif chunk in self._spilled:
            t0 = time.perf_counter()
            # Raw float32: read back bit for bit, no archive or checksum to build (``np.savez``
            # took most of the stitching time on a volume 4x the cache).
            values = torch.from_numpy(self._spilled.read(chunk)).to(self.device)
            partial = _Partial(self._spilled_origins.pop(chunk), values)
            self.spill_seconds += time.perf_counter() - t0
        # Partial in z only: a box grown in y and x as a row's tiles pass cost a copy per tile
        # (2D tiles: 1x512x512 stitched 40% slower) and is whole again one tile later.
        sides = [s.stop - s.start for s in self.chunk_slices(chunk)]
        start = (need[0].start, *(0 for _ in sides[1:]))
        stop = (need[0].stop, *sides[1:])
        if partial is None:
            shape = tuple(b - a for a, b in zip(start, stop))
            partial = _Partial(start, self._zeros((self.n_values, *shape)))
        else:
            origin = tuple(min(a, o) for a, o in zip(start, partial.origin))
            end = tuple(max(b, o + n) for b, o, n in zip(stop, partial.origin, partial.shape))
            partial = self._grown(partial, origin, tuple(b - a for a, b in zip(origin, end)))
        self._buffers[chunk] = partial
        self._bytes += _nbytes(partial.values)
        self._evict()
        return partial

    def _grown(
        self, partial: _Partial, origin: tuple[int, ...], shape: tuple[int, ...]
    ) -> _Partial:
        """``partial`` placed in a box of zeros at ``origin`` (itself where that is its box)."""
        if partial.origin == origin and partial.shape == shape:
            return partial
        grown = _Partial(origin, self._zeros((self.n_values, *shape)))
        grown.values[(slice(None), *grown.local(partial.box))] = partial.values
        return grown

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type == "cpu":
            # NumPy's zeros: calloc hands out zeroed pages without a pass that writes them.
            return torch.from_numpy(np.zeros(shape, dtype=np.float32))
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _next_use(self, chunk: ChunkIndex) -> float:
        users = self._users.get(chunk)
        return users[0] if users else float("inf")

    def _evict(self) -> None:
        # Keep the newest chunk in memory even when one chunk alone exceeds the budget; spill the
        # one whose next tile comes last (ties: the least recently used).
        while self._bytes > self.max_bytes and len(self._buffers) > 1:
            order = list(self._buffers)[:-1]  # least recently used first
            _, chunk = max(enumerate(order), key=lambda item: (self._next_use(item[1]), -item[0]))
            partial = self._buffers.pop(chunk)
            self._bytes -= _nbytes(partial.values)
            t0 = time.perf_counter()
            self._spilled.write(chunk, partial.values.cpu().numpy())
            self._spilled_origins[chunk] = partial.origin
            self.spill_seconds += time.perf_counter() - t0
            self.spill_count += 1

    @property
    def held_bytes(self) -> int:
        """Bytes of unfinished chunk sums in memory (spilled ones not counted)."""
        return self._bytes

    @property
    def complete(self) -> bool:
        """Whether every chunk (of :attr:`chunk_box`) has been finished."""
        if self.chunk_box is not None:
            n_chunks = int(np.prod([b - a for a, b in zip(*self.chunk_box)]))
            return len(self.done_chunks) == n_chunks
        return len(self.done_chunks) == int(np.prod(self.plan.chunk_grid))

    def close(self) -> None:
        """Remove spilled partial chunks (an interrupted run recomputes their tiles on resume)."""
        self._spilled.close()
        self._spilled_origins.clear()
        if self.scratch_dir.exists():
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
        self._buffers.clear()
        self._bytes = 0
        self._scratch.release()


@dataclass
class _Partial:
    """A chunk's sums over the box its tiles have added to: ``values[:, 0, 0, 0]`` at ``origin``."""

    origin: tuple[int, ...]
    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[1:])

    @property
    def box(self) -> tuple[slice, ...]:
        """Chunk-local slices of the box."""
        return tuple(slice(o, o + n) for o, n in zip(self.origin, self.shape))

    def local(self, in_chunk: tuple[slice, ...]) -> tuple[slice, ...]:
        """Chunk-local slices (inside the box) as slices of :attr:`values`' spatial axes."""
        return tuple(slice(s.start - o, s.stop - o) for s, o in zip(in_chunk, self.origin))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
