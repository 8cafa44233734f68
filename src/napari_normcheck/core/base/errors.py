"""The exception types users see: a specific, one-line message that names the problem and the fix."""


class NormcheckError(ValueError):
    """Bad input or an impossible request, explained for the user.

    The command line prints ``str(error)`` and exits with code 2; the napari widget shows it as a
    notification. The message names what is wrong and how to fix it; it never needs a traceback.
    """


class RunFault(NormcheckError):
    """A run stopped by what happened during it; what it finished is kept for ``--resume``.

    The message names the cause, the place (the input's region, OUT, a block) and the fix; the
    full traceback is in the log file the message names.
    """


class InputReadError(RunFault):
    """A region of the input could not be read (a damaged chunk, a file or server gone)."""


class OutputWriteError(RunFault):
    """OUT could not be created or written (no space, no permission, a store that went away)."""


class WorkerError(RunFault):
    """A cluster worker failed on a block."""


class OutputLocked(NormcheckError):
    """Another live run is writing OUT."""


class NormcheckNotice(UserWarning):
    """Something the user should know that is not an error (the command line prints one line)."""


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line user messages."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
