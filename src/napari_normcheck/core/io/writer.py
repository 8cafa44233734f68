"""A background thread that compresses and writes finished output chunks while the model works."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class BackgroundWriter:
    """Run write jobs in submission order on one thread; errors surface in the caller's thread.

    Parameters
    ----------
    max_pending : int
        Jobs queued before :meth:`submit` blocks, which bounds the memory held by pending writes.
    """

    def __init__(self, max_pending: int = 6) -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="normcheck-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[..., Any], *args: Any) -> float:
        """Queue ``job(*args)``; raises an earlier job's error, if any.

        Returns
        -------
        float
            Seconds spent waiting for room in the queue (the writer behind the run).
        """
        self._raise()
        t0 = time.perf_counter()
        self._jobs.put((job, args))
        return time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every queued job has run; raises an error a job raised."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        """Finish the queued jobs and stop the thread."""
        self._jobs.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, drop the rest: the run is failing
                    job, args = item
                    job(*args)
            except BaseException as error:  # handed to the caller's thread
                self._error = error
            finally:
                self._jobs.task_done()
