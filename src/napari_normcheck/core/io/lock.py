"""The lock a run holds on OUT while it writes: ``OUT.zarr.lock`` beside it (pid, host, start).

It sits beside OUT, not in it, so that it also guards a replacement being built in
``OUT.zarr.inprogress`` and leaves a finished OUT with nothing but zarr nodes. A second run that
would write OUT is refused while the holder lives; the lock of a process that died on this host
(killed with -9, a crash) is taken over. A cluster run's workers write under their driver's lock.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from napari_normcheck.core.base.errors import (
    NormcheckNotice,
    OutputLocked,
    OutputWriteError,
    first_line,
)


def lock_path(target: str | Path) -> Path:
    """Where the lock of OUT ``target`` is."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


@dataclass
class OutLock:
    """A held lock on OUT; :meth:`release` it when the run stops writing."""

    path: Path
    pid: int
    host: str
    started: str

    @classmethod
    def acquire(cls, target: str | Path) -> OutLock:
        """Lock OUT ``target`` for this process.

        Raises
        ------
        OutputLocked
            When a live process (or one on another host, which cannot be checked) holds it.
        """
        path = lock_path(target)
        me = cls(
            path,
            os.getpid(),
            socket.gethostname(),
            datetime.datetime.now().isoformat(timespec="seconds"),
        )
        content = json.dumps({"pid": me.pid, "host": me.host, "started": me.started})
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(path)
                if holder is None:  # released (or being written) meanwhile: try again
                    continue
                if holder.get("host") != me.host or _alive(int(holder.get("pid", -1))):
                    raise OutputLocked(
                        f"{target} is being written by process {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('started')}); wait for it to "
                        f"finish or stop it (if that run is gone, remove {path})"
                    ) from None
                # The holder died on this host: its lock is replaced atomically by ours.
                tmp = path.with_name(f".{path.name}.{me.pid}")
                tmp.write_text(content)
                os.replace(tmp, path)
                warnings.warn(
                    NormcheckNotice(
                        f"took over the lock on {target} of process {holder.get('pid')} "
                        f"(started {holder.get('started')}), which is no longer running"
                    ),
                    stacklevel=2,
                )
                return me
            except OSError as error:
                raise OutputWriteError(
                    f"cannot create {target} ({error.strerror or first_line(error)}): its filesystem does not take "
                    "files (read-only, full, or a pseudo-filesystem such as /proc); choose an "
                    "--out on a writable disk"
                ) from error
            with os.fdopen(fd, "w") as file:
                file.write(content)
            return me
        raise OutputLocked(f"cannot lock {target}: {path} keeps changing; is another run starting?")

    def release(self) -> None:
        """Remove the lock, if it is still this process's."""
        holder = _read_holder(self.path)
        if holder is not None and holder.get("pid") == self.pid and holder.get("host") == self.host:
            self.path.unlink(missing_ok=True)


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half written by a starting run, or damaged: treated as held by a dead one


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
