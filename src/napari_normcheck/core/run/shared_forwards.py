"""Forwards shared between tile loops through a folder: a tile that several loops need is predicted once.

A distributed block runs every tile whose prediction touches its chunks, so a tile on a block border
is needed by each block it touches. Rather than predicting it in each, the loops share its forwards:
the first loop to reach the tile claims it (a file created exclusively) and predicts it; it then
publishes the tile's predictions and feature statistics (one ``.npz`` file, written under another
name and renamed, so a reader never sees part of it). The others load them instead of predicting:
on the CPU the same bits as their own forwards (a forward's result does not depend on the process
that runs it), so outputs and sums stay equal to a single-process run. On a GPU a tile predicted in
another block's eval batch may differ from its own by cuDNN's rounding in that batch. Whoever gets
to a tile first predicts it: usually the block above the cut, where the tile comes first in scan
order (it comes last in the lower block's); the default blocks are cut where that evens out the
forwards (:func:`~napari_normcheck.core.run.blocks.predicted_per_block`).

Nothing here can wait forever: a claim whose publication does not come within
:data:`WAIT_SECONDS` (or twenty times the longest forward this loop has seen), because its loop
died or was stopped, is given up and the tile predicted here; its claimant is then not waited for
again. A retried block takes over its own earlier claims. The last loop to read a published tile
deletes it, leaving a marker, so the folder holds only the border tiles still to be read.

Only where each tile's forward is its own (train batches of one tile): tiles of a larger train batch
share batch statistics and are predicted together in each block.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from napari_normcheck.core.run.tile_io import TileWork

#: Seconds a loop waits at least for a claimed tile's predictions before predicting it itself.
WAIT_SECONDS = 60.0

#: Publications being written at most (each holds a tile's predictions); then publishing waits.
WRITES_IN_FLIGHT = 2

_OUT, _FEATURE = "o|", "f|"


class SharedForwards:
    """One loop's side of the forwards shared through ``folder``.

    Parameters
    ----------
    folder : path-like
        Shared by every loop of the run (on a file system all of them see).
    loop : int
        This loop's number (a block's index): written into its claims.
    needed_by : mapping of int to sequence of int
        For every tile that more than one loop runs, the loops that run it. Tiles not listed are
        this loop's alone and are neither claimed nor published.
    device : torch.device
        Where received predictions go (the run's device).
    names : sequence of str
        The predictions every tile gets (``eval``, ``train``, ...).
    stopped : callable, optional
        Says when the run was stopped: a wait for another loop's tile then ends at once.
    """

    def __init__(
        self,
        folder: str | Path,
        loop: int,
        needed_by: Mapping[int, Sequence[int]],
        device: torch.device,
        names: Sequence[str],
        stopped: Callable[[], bool] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.loop = loop
        self.needed_by = needed_by
        self.device = device
        self.names = tuple(names)
        self.stopped = stopped or (lambda: False)
        self.published = 0
        self.received = 0
        self.predicted_after_wait = 0
        self.waited = 0.0
        self.longest_forward = 0.0
        self._mine: set[int] = set()
        self._others: dict[int, int] = {}  # tile -> the loop that claimed it
        self._given_up: set[int] = set()  # loops whose claims were not kept: not waited for again
        # Publications are written on a thread of their own: the loop goes on predicting (on a
        # GPU a tile's forwards take about as long as writing its predictions).
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="normcheck-share")
        self._writes: deque[Future] = deque()

    def claim(self, tile: int) -> bool:
        """Whether this loop predicts ``tile``: not shared, claimed now, or claimed by it before.

        ``False``: another loop has claimed it; :meth:`receive` its predictions.
        """
        if tile not in self.needed_by or tile in self._mine:
            return True
        path = self._path("claim", tile)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_int(path)
            # A retried block takes over its earlier attempt's claims (that attempt is gone).
            if owner is None or owner == self.loop or owner in self._given_up:
                self._mine.add(tile)
                return True
            self._others[tile] = owner
            return False
        with os.fdopen(fd, "w") as file:
            file.write(str(self.loop))
        self._mine.add(tile)
        return True

    def publish(self, work: TileWork) -> None:
        """Share a claimed shared tile's predictions and feature statistics with the other loops.

        Written in the background (:meth:`flush` waits); an earlier write's error is raised here.
        """
        tile = work.tile.index
        if tile not in self.needed_by or tile not in self._mine:
            return
        while self._writes and (self._writes[0].done() or len(self._writes) >= WRITES_IN_FLIGHT):
            self._writes.popleft().result()
        outputs, features = dict(work.outputs), dict(work.features)
        self._writes.append(self._writer.submit(self._write, tile, outputs, features))

    def _write(self, tile: int, outputs: dict, features: dict) -> None:
        arrays = {_OUT + n: _to_numpy(outputs[n]) for n in self.names}
        arrays |= {_FEATURE + k: np.asarray(v) for k, v in features.items()}
        final = self._path("tile", tile)
        partial = final.with_name(f"{final.name}.{self.loop}.partial")
        with open(partial, "wb") as file:
            np.savez(file, **arrays)
        os.replace(partial, final)
        self.published += 1

    def flush(self) -> None:
        """Wait until every publication is written; raise a failed one's error."""
        while self._writes:
            self._writes.popleft().result()

    def close(self) -> None:
        """Finish the publications and stop their thread."""
        try:
            self.flush()
        finally:
            self._writer.shutdown(wait=True)

    def ready(self, work: TileWork) -> bool:
        """Whether ``work``'s predictions have been published (never waits)."""
        return self._path("tile", work.tile.index).exists()

    def receive(self, work: TileWork) -> bool:
        """Fill ``work`` with the claimed tile's published predictions, waiting for them.

        Returns
        -------
        bool
            ``False`` when they did not come (the claimant stopped or died, or the last reader
            already deleted them for an earlier attempt of this block): predict the tile here.
        """
        tile = work.tile.index
        owner = self._others.pop(tile)
        path = self._path("tile", tile)
        limit = max(WAIT_SECONDS, 20.0 * self.longest_forward)
        t0 = time.perf_counter()
        pause = 0.002
        while not path.exists():
            waited = time.perf_counter() - t0
            gone = self._path("gone", tile).exists()
            if gone or owner in self._given_up or waited > limit or self.stopped():
                if not gone:
                    self._given_up.add(owner)
                self.waited += waited
                self.predicted_after_wait += 1
                self._mine.add(tile)
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        self.waited += time.perf_counter() - t0
        with np.load(path, allow_pickle=False) as stored:
            outputs = {n: stored[_OUT + n] for n in self.names}
            features = {k[len(_FEATURE) :]: stored[k] for k in stored.files if k[:2] == _FEATURE}
        work.outputs = {n: torch.from_numpy(v).to(self.device) for n, v in outputs.items()}
        work.features = features
        self.received += 1
        self._read(tile, owner)
        return True

    def _read(self, tile: int, owner: int) -> None:
        # The last of the other loops to read a tile deletes it (a marker says it is gone).
        Path(self._path("read", tile, self.loop)).touch()
        readers = [b for b in self.needed_by[tile] if b != owner]
        if all(self._path("read", tile, b).exists() for b in readers):
            self._path("gone", tile).touch()
            with contextlib.suppress(FileNotFoundError):
                self._path("tile", tile).unlink()

    def _path(self, kind: str, tile: int, loop: int | None = None) -> Path:
        # "tile": the published predictions; "claim", "read" (one per reader) and "gone": markers.
        if kind == "tile":
            return self.folder / f"{tile}.npz"
        return self.folder / (f"{kind}-{tile}" if loop is None else f"{kind}-{tile}.{loop}")


def _to_numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


def _read_int(path: Path) -> int | None:
    # A claim just created may not hold its number yet: read it again a few times.
    for _ in range(50):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text()
            if text:
                return int(text)
        time.sleep(0.01)
    return None
