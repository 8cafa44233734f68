"""How often a run saves its progress: every few seconds, less often where saving itself is slow.

A save writes every tile's record so far (about 2 KB a tile), so its cost grows with the run: a
volume of 11,000 tiles writes some 20 MB of JSON per save. Saved at a fixed interval, a long run
would spend a growing share of its writer thread on the same records again and again. The interval
therefore grows with the last save's cost, so that saving takes at most :data:`SAVE_SHARE` of the
run; a short run still saves every :data:`SAVE_INTERVAL_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Seconds between two progress saves at least.
SAVE_INTERVAL_S = 2.0
#: The share of the run's time that saving progress may take at most.
SAVE_SHARE = 0.05


class SavePacing:
    """Whether the next periodic progress save is due.

    :meth:`save` takes a snapshot on the calling thread and hands its writing to another (the
    run's writer thread), timing both parts; a caller with other parts marks each save with
    :meth:`saved` and runs its parts through :meth:`timed`.
    """

    def __init__(self, interval: float = SAVE_INTERVAL_S, share: float = SAVE_SHARE) -> None:
        self.interval = interval
        self.share = share
        self._last = time.perf_counter()
        self._costs: dict[str, float] = {}

    def due(self) -> bool:
        """Whether the time since the last save exceeds the interval the last save's cost allows."""
        cost = sum(self._costs.values())
        return time.perf_counter() - self._last > max(self.interval, cost / self.share)

    def saved(self) -> None:
        """A save was made (or queued) now."""
        self._last = time.perf_counter()

    def took(self, part: str, seconds: float) -> None:
        """The last save's ``part`` (``"snapshot"``, ``"write"``) took ``seconds``."""
        self._costs[part] = seconds

    def save(
        self,
        snapshot: Callable[[], T],
        write: Callable[[T], None],
        submit: Callable[[Callable[[], None]], None],
    ) -> None:
        """Take ``snapshot()`` now and ``submit`` a job that writes it (``write(snapshot)``)."""
        taken = self.timed("snapshot", snapshot)
        submit(lambda: self.timed("write", lambda: write(taken)))
        self.saved()

    def timed(self, part: str, job: Callable[[], T]) -> T:
        """``job()``, its seconds kept as the cost of the save's ``part``."""
        t0 = time.perf_counter()
        try:
            return job()
        finally:
            self.took(part, time.perf_counter() - t0)
