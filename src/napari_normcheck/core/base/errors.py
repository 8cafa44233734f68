"""The one exception type users see: a specific, one-line message that names the problem and the fix."""


class NormcheckError(ValueError):
    """Bad input or an impossible request, explained for the user.

    The command line prints ``str(error)`` and exits with code 2; the napari widget shows it as a
    notification. The message names what is wrong and how to fix it; it never needs a traceback.
    """


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line user messages."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
