"""Raw float arrays moved to disk and back (spilled work in progress), bit for bit.

Written through the file object rather than ``ndarray.tofile``: a full disk then raises
``OSError(ENOSPC)``, which the run reports as "no space left", instead of ``tofile``'s errno-less
"N requested and 0 written".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_raw(path: str | Path, array: np.ndarray) -> None:
    """Write ``array``'s values in C order, nothing else (the caller keeps shape and dtype)."""
    with open(path, "wb") as file:
        file.write(memoryview(np.ascontiguousarray(array)).cast("B"))


def read_raw(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Read back what :func:`write_raw` wrote, and remove the file."""
    values = np.fromfile(path, dtype=dtype).reshape(shape)
    Path(path).unlink()
    return values
