"""GUI work cut in steps, one per event-loop turn, so the viewer draws and answers input between.

napari does everything on the GUI thread when a layer is added or re-sliced; a run's results need
many such changes. Queued as steps, each one is followed by a turn of the event loop.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, QTimer, Signal  # noqa: TID253 (the Qt layer)

#: Pause between two GUI steps (ms): the event loop draws and handles input in between.
STEP_MS = 30


def step(name: str, function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``function(*args)`` as a queued step named ``name`` (the name shows in timings)."""
    call = functools.partial(function, *args)
    call.step_name = name  # type: ignore[attr-defined]
    return call


class StepQueue(QObject):
    """Callables run on the GUI thread one per event-loop turn, in order.

    Signals
    -------
    drained
        Emitted when the last queued step has run.

    Attributes
    ----------
    timings : list or None
        When a list, ``(step name, start, end)`` (``time.perf_counter()`` seconds) of every step run
        (the widget benchmark sets it).
    """

    drained = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._steps: deque[Callable[[], None]] = deque()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(STEP_MS)
        self._timer.timeout.connect(self._run_next)
        self.timings: list[tuple[str, float, float]] | None = None

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, *steps: Callable[[], None]) -> None:
        """Queue ``steps`` after those already queued."""
        self._steps.extend(steps)
        if not self._timer.isActive():
            self._timer.start()

    def add_first(self, *steps: Callable[[], None]) -> None:
        """Queue ``steps`` before those already queued (they run in the next turns, in order)."""
        self._steps.extendleft(reversed(steps))
        if not self._timer.isActive():
            self._timer.start()

    def clear(self) -> None:
        """Drop the queued steps (a new run replaces the old one's)."""
        self._steps.clear()
        self._timer.stop()

    def run_all(self) -> None:
        """Run every queued step now (for callers that need the result synchronously)."""
        self._timer.stop()
        while self._steps:
            self._steps.popleft()()
        self.drained.emit()

    def _run_next(self) -> None:
        if self._steps:
            step = self._steps.popleft()
            start = time.perf_counter()
            try:
                step()
            finally:
                if self.timings is not None:
                    name = getattr(step, "step_name", getattr(step, "__qualname__", "step"))
                    self.timings.append((name, start, time.perf_counter()))
                if self._steps:
                    self._timer.start()
                else:
                    self.drained.emit()
