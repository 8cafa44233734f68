"""Reads of the store in a thread of our own, each result handed over to the GUI thread.

The GUI thread must never wait on the store (a zarr read waits on the GIL the engine holds): the
result layers read it here, and get what was read back on the GUI thread through a queued signal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qtpy.QtCore import QObject, Signal  # noqa: TID253 (the Qt layer)

logger = logging.getLogger(__name__)


class _Delivery(QObject):
    """Carries a reader-thread result to the GUI thread (a signal emitted from another thread)."""

    delivered = Signal(object)


class ReaderThread(QObject):
    """Runs reads in a thread of its own; their results are handed over on the GUI thread.

    Create it on the GUI thread.

    Parameters
    ----------
    delivered : callable
        Called on the GUI thread after each read was handed over (or dropped).

    Attributes
    ----------
    run_id : int
        The current run: results of reads started under another one are dropped.
    in_flight : int
        Reads submitted and not handed over yet.
    """

    def __init__(self, delivered: Callable[[], None]) -> None:
        super().__init__()
        self.run_id = 0
        self.in_flight = 0
        self._after_delivery = delivered
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="normcheck-reader")
        self._delivery = _Delivery()  # lives on the GUI thread: its signal is queued to it
        self._delivery.delivered.connect(self._deliver)

    def submit(
        self,
        function: Callable[[], Any],
        done: Callable[[Any], None],
        finished: Callable[[], None] | None = None,
    ) -> None:
        """Run ``function`` in the reader thread; ``done(result)`` runs on the GUI thread after.

        Results of a run that was replaced meanwhile (or of a failed read) are dropped;
        ``finished`` is called on the GUI thread in every case, after ``done``. The reader is a
        thread of our own, not napari's worker pool: the run's worker holds a thread of that pool
        (which has one per CPU) and waits for layers whose preparation needs a reader.
        """
        run_id = self.run_id

        def guarded() -> None:
            try:
                result = function()
            except Exception:  # a store being swapped: the next read sees the new one
                logger.debug("reading the store failed", exc_info=True)
                result = None
            self._delivery.delivered.emit((run_id, result, done, finished))

        self.in_flight += 1
        self._reader.submit(guarded)

    def _deliver(self, item: tuple) -> None:
        """On the GUI thread: hand a read's result over (queued by Qt from the reader thread)."""
        run_id, result, done, finished = item
        self.in_flight -= 1
        if result is not None and run_id == self.run_id:
            done(result)
        if finished is not None:
            finished()
        self._after_delivery()
