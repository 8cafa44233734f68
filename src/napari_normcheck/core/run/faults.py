"""Turn what goes wrong during a run into one line for the user and a traceback in a log file.

A failure of reading the input is named where the region is known (the reader thread:
:class:`~napari_normcheck.core.base.errors.InputReadError`); a failure of writing OUT surfaces as an
``OSError`` from the writer thread, the spill folder or the progress file, and is named here, where
OUT is known. Either way the run's finished chunks stay listed in its progress, so ``--resume``
continues it once the cause is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from napari_normcheck.core.base.errors import (
    InputReadError,
    NormcheckError,
    OutputWriteError,
    RunFault,
    first_line,
)
from napari_normcheck.core.io.store import ERROR_LOG, records_dir

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_fault_log(store_path: str | Path, error: BaseException) -> Path | None:
    """Append ``error``'s full traceback to OUT's error log; a temporary file when OUT takes none.

    Returns
    -------
    Path or None
        Where the traceback is (``None`` when no file could be written at all).
    """
    text = (
        f"--- {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}\n"
        + "".join(traceback.format_exception(error))
    )
    candidates = [records_dir(store_path) / ERROR_LOG]
    candidates.append(Path(tempfile.gettempdir()) / f"napari-normcheck-error-{os.getpid()}.log")
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as log:
                log.write(text)
            return path
        except OSError:  # a full or read-only OUT: the next place
            continue
    return None


@contextlib.contextmanager
def input_named(source: str) -> Iterator[None]:
    """Name the input in an :class:`InputReadError` raised where only its data was known."""
    try:
        yield
    except InputReadError as error:
        text = str(error)
        if source not in text:
            text = text.replace("the input", f"the input {source}", 1)
        raise InputReadError(text) from error


def run_fault(
    error: BaseException,
    *,
    out: str | Path,
    store_path: str | Path,
    remaining_bytes: int | None = None,
    resumable: bool = True,
) -> NormcheckError:
    """The one-line error a run ends with, its traceback logged (see :func:`write_fault_log`).

    Parameters
    ----------
    error : BaseException
        What stopped the run.
    out : path-like
        The OUT the user named.
    store_path : path-like
        The folder the run writes (OUT, or its ``.inprogress`` sibling).
    remaining_bytes : int, optional
        At most how many bytes the outputs not yet written take (said when the disk is full).
    resumable : bool
        Whether ``--resume`` continues the run (the fix the line names).

    Returns
    -------
    NormcheckError
        A :class:`RunFault` naming cause, place and fix, and where the traceback is; a plain
        ``NormcheckError`` (bad input, said before) is returned as it is.
    """
    if isinstance(error, NormcheckError) and not isinstance(error, RunFault):
        return error
    resume = " and rerun with --resume (finished chunks are kept)" if resumable else ""
    if isinstance(error, RunFault):
        message = str(error)
        kind = type(error)
    elif isinstance(error, OSError) and error.errno in _NO_SPACE:
        free = _free_bytes(store_path)
        needs = (
            f"; the rest of the run needs at most {_mb(remaining_bytes)} more"
            if remaining_bytes is not None
            else ""
        )
        message = (
            f"no space left on the device of {out} ({_mb(free)} free{needs}): free space"
            f"{resume or ', then run again'}"
        )
        kind = OutputWriteError
    elif isinstance(error, OSError) and error.errno in _NOT_WRITABLE:
        message = f"cannot write {out} any more ({first_line(error)}): make it writable{resume}"
        kind = OutputWriteError
    elif isinstance(error, OSError):
        message = (
            f"writing {out} failed ({first_line(error)}): check the disk and that nothing "
            f"removed files in it{resume}"
        )
        kind = OutputWriteError
    elif where_out := _out_of_memory(error):
        # The forwards halve their batch on their own: this ran out elsewhere (blending, metrics,
        # writing) or on the host.
        gpu = where_out == "GPU"
        again = "rerun with --resume (the same settings), or " if resumable else ""
        smaller = "--eval-batch or --cache-mb" if gpu else "--cache-mb or --tile"
        message = (
            f"the {'GPU' if gpu else 'computer'} ran out of memory ({first_line(error)}): "
            f"{'' if gpu else 'close other programs and '}{again}start again with --overwrite "
            f"and a smaller {smaller}"
        )
        kind = RunFault
    else:
        message = (
            f"the run stopped on an unexpected error ({first_line(error)}){resume}; "
            "please report it with the log"
        )
        kind = RunFault
    log = write_fault_log(store_path, error)
    where = f"; traceback in {log}" if log is not None else ""
    return kind(f"{message}{where}")


def _out_of_memory(error: BaseException) -> str | None:
    """``"GPU"`` or ``"host"`` where ``error`` says that memory ran out there, else ``None``."""
    import torch  # a run has it loaded

    if isinstance(error, torch.OutOfMemoryError):  # an accelerator's
        return "GPU"
    # NumPy raises MemoryError; torch's CPU allocator a RuntimeError that says so.
    if isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(error)
    ):
        return "host"
    return None


def _free_bytes(path: str | Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MB"
