"""The CPU threads torch uses during a run (``--threads``), and the process setting restored after.

torch's intra-op thread count is a process-wide setting; a run sets it for its tile loop only, so
a napari session or a script calling the engine keeps its own. By default (``0``) the run leaves
it alone: torch then uses what ``OMP_NUM_THREADS`` said at start-up, or all cores. Loops running
at once in one process (threads of a dask worker) share one setting: the first to start saves the
process value and the last to finish restores it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_lock = threading.Lock()
_active = 0  # loops inside intra_op_threads now
_saved = 0  # the process setting before the first of them


@contextlib.contextmanager
def intra_op_threads(n_threads: int) -> Iterator[int]:
    """Use ``n_threads`` intra-op threads in torch inside the block; restore the setting after.

    Parameters
    ----------
    n_threads : int
        Threads for torch's CPU operations (forwards, blending, metrics); ``0`` keeps the
        current setting (torch's default follows ``OMP_NUM_THREADS``).

    Yields
    ------
    int
        The number of threads in effect.
    """
    global _active, _saved
    if n_threads < 0:
        raise ValueError(f"threads must be 0 (keep torch's setting) or more, not {n_threads}")
    if n_threads == 0:
        yield torch.get_num_threads()
        return
    with _lock:
        if _active == 0:
            _saved = torch.get_num_threads()
        _active += 1
        torch.set_num_threads(n_threads)
    try:
        yield n_threads
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                torch.set_num_threads(_saved)
