"""Read tiles: the model input window of each tile, normalized and padded, in a reader thread."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from napari_normcheck.core.base.errors import InputReadError, NormcheckError, first_line
from napari_normcheck.core.base.tiling import Tile, TilePlan
from napari_normcheck.core.io.block_cache import BlockCache
from napari_normcheck.core.io.intensity import IntensityTransform
from napari_normcheck.core.io.lazy_array import (
    SYNCHRONOUS,
    describe_box,
    failing_box,
    stored_chunk_box,
)
from napari_normcheck.core.io.volume import Volume

if TYPE_CHECKING:
    import torch


@dataclass
class TileWork:
    """A tile in flight: its input window, then its predictions per mode and feature statistics.

    The predictions are float32 tensors ``(C, z, y, x)`` on the run's device, as the model made
    them.
    """

    tile: Tile
    image: np.ndarray
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    #: Predicted by another loop, which shares them (:mod:`~napari_normcheck.core.run.shared_forwards`).
    external: bool = False
    #: Its predictions were published for the other loops that run it.
    published: bool = False


class ForwardExchange(Protocol):
    """Where tile loops that run the same tiles share those tiles' forwards (each predicted once).

    The tile loop needs only this; distributed blocks hand it their
    :class:`~napari_normcheck.core.run.shared_forwards.SharedForwards`, so the loop does not
    import the cluster's modules.
    """

    #: Seconds of this loop's longest forward (how long a wait for another loop may last).
    longest_forward: float

    def claim(self, tile: int) -> bool:
        """Whether this loop predicts ``tile`` (it claimed it, or nobody else shares it)."""

    def publish(self, work: TileWork) -> None:
        """Hand a claimed tile's predictions and feature statistics to the other loops."""

    def ready(self, work: TileWork) -> bool:
        """Whether another loop's predictions of ``work`` can be received without waiting."""

    def receive(self, work: TileWork) -> bool:
        """Fill ``work`` with another loop's predictions, waiting for them.

        ``False`` when they did not come: this loop then predicts the tile itself.
        """


class TileReader:
    """A thread that reads, normalizes and pads the next tiles while the model works."""

    def __init__(
        self,
        volume: Volume,
        plan: TilePlan,
        tiles: list[Tile],
        transform: IntensityTransform,
        depth: int,
    ) -> None:
        self.volume = volume
        self.plan = plan
        self.tiles = tiles
        self.transform = transform
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="normcheck-reader", daemon=True)
        # Windows overlap and cut across stored chunks: each chunk decoded once while in use.
        self.blocks = BlockCache.for_volume(volume.data)
        self.seconds = 0.0
        # Time the consumer spent blocked on an empty queue: the model waiting for the disk.
        self.waited = 0.0

    def start(self) -> None:
        """Start reading ahead."""
        self.thread.start()

    def stop(self) -> None:
        """Stop the thread and drop tiles read ahead."""
        self.stopped.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join(timeout=10)

    def __iter__(self) -> Iterator[TileWork]:
        for _ in self.tiles:
            t0 = time.perf_counter()
            item = self.queue.get()
            self.waited += time.perf_counter() - t0
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self) -> None:
        try:
            for tile in self.tiles:
                if self.stopped.is_set():
                    return
                t0 = time.perf_counter()
                image = self._read(tile)
                self.seconds += time.perf_counter() - t0
                while not self.stopped.is_set():
                    try:
                        self.queue.put(TileWork(tile, image), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the consumer, which raises it
            self.queue.put(error)

    def _read(self, tile: Tile) -> np.ndarray:
        # Named here, where the region is known: a damaged chunk, a file or a server gone.
        try:
            return read_window(self.volume, self.plan, tile, self.transform, self.blocks)
        except NormcheckError:
            raise
        except Exception as error:
            lo, hi = window_box(self.plan, tile)
            region = self.volume.data[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            # The damaged stored chunk when it can be told apart, else the tile's whole box.
            box = failing_box(region, origin=(0, *lo))
            if box is not None:
                where = f" in the chunk {describe_box(stored_chunk_box(self.volume.data, box))}"
            else:
                where = f" in the box {describe_box([(0, 0), *zip(lo, hi)])}"
            raise InputReadError(
                f"cannot read the input {self.volume.source}{where} (read for tile "
                f"{tile.index}): {first_line(error)}; a chunk there is damaged or out of reach: "
                "repair or copy it again (or leave it out with --roi), then rerun with --resume"
            ) from error


def read_window(
    volume: Volume,
    plan: TilePlan,
    tile: Tile,
    transform: IntensityTransform,
    blocks: BlockCache | None = None,
) -> np.ndarray:
    """Read the model input window of ``tile``: normalized float32 ``(C, *window_shape)``.

    Blend modes see only the region of interest, zero-padded outside it in normalized space (as MONAI
    pads its input). Crop mode sees real context from the whole volume, reflect-padded only beyond the
    volume border. ``blocks``: the volume's decoded blocks (a reader's cache), else read from the
    store.
    """
    start = tile.window_start
    stop = tuple(s + w for s, w in zip(start, plan.window_shape))
    index = _window_index(plan, tile) if plan.blend == "crop" else []
    lo, hi = window_box(plan, tile)
    if blocks is not None:
        block = blocks.read((slice(0, volume.n_channels), *map(slice, lo, hi)))
    else:
        block = volume.data[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        block = np.asarray(
            block.compute(scheduler=SYNCHRONOUS) if hasattr(block, "compute") else block
        )
    image = transform.apply(block)
    n_bad = image.size - int(np.count_nonzero(np.isfinite(image)))
    if n_bad:
        raise NormcheckError(
            f"the volume holds {n_bad} NaN or Inf value(s) in the box z {lo[0]}:{hi[0]}, "
            f"y {lo[1]}:{hi[1]}, x {lo[2]}:{hi[2]}; fill or mask them before running"
        )
    if plan.blend == "crop":
        if image.shape[1:] != plan.window_shape or any(a != s for a, s in zip(lo, start)):
            image = image[np.ix_(range(image.shape[0]), *[i - a for i, a in zip(index, lo)])]
    else:
        pad = [(0, 0)] + [(a - s, e - b) for s, a, b, e in zip(start, lo, hi, stop)]
        if any(p != (0, 0) for p in pad):
            image = np.pad(image, pad, mode="constant", constant_values=0.0)
    return np.ascontiguousarray(image, dtype=np.float32)


def _window_index(plan: TilePlan, tile: Tile) -> list[np.ndarray]:
    # Crop mode reflects about the volume border (numpy's "reflect" of the whole volume).
    start = tile.window_start
    stop = tuple(s + w for s, w in zip(start, plan.window_shape))
    return [_reflect_index(np.arange(a, b), n) for a, b, n in zip(start, stop, plan.volume_shape)]


def window_box(plan: TilePlan, tile: Tile) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box ``(lo, hi)`` of the volume that the input window of ``tile`` reads."""
    start = tile.window_start
    if plan.blend == "crop":
        index = _window_index(plan, tile)
        return tuple(int(i.min()) for i in index), tuple(int(i.max()) + 1 for i in index)
    stop = tuple(s + w for s, w in zip(start, plan.window_shape))
    lo = tuple(max(s, a) for s, a in zip(start, plan.roi_start))
    hi = tuple(min(s, b) for s, b in zip(stop, plan.roi_stop))
    return lo, hi


def _reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map coordinates outside ``[0, size)`` to their mirror image (no edge repeat), periodically."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)
