"""Host memory reused from tile to tile for the per-tile arrays of one thread.

A tile's activated prediction box (both modes: 34 MB at tile 32x256x256 with two channels) and a
finished chunk's activation are new arrays every time. glibc serves allocations that large with
``mmap`` and returns them with ``munmap`` (beyond its 32 MiB ceiling for the dynamic threshold,
always), so the kernel hands out and zeroes every page again: on this project's 2-core machine,
64x1024x1024 voxels at tile 32x256x256 took 1.4 million page faults and 7-8 s of system time
beside 11 s of user time, and the sigmoid writing into new memory took 45% of those faults.
Writing into memory the same thread used for the tile before costs none of that.

On CUDA torch's caching allocator already reuses device memory, in stream order; a buffer of
ours reused there could be overwritten while a copy on the side stream still reads it, so device
tensors are plain new ones.
"""

from __future__ import annotations

import math

import torch


class ScratchBuffer:
    """One growing float32 buffer, lent out as a tensor of the shape asked for.

    Only for one thread, and one tensor at a time: a tensor from :meth:`empty` is valid until
    the next call, so nothing may keep it (or a view of it) beyond the work it was lent for.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def empty(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous float32 tensor of ``shape`` on ``device``.

        On the CPU it is this buffer's memory (grown when too small); elsewhere a new tensor.
        """
        if device.type != "cpu":
            return torch.empty(shape, dtype=torch.float32, device=device)
        n = math.prod(shape)
        if self._flat is None or self._flat.numel() < n:
            self._flat = None  # the old buffer goes before the larger one is allocated
            self._flat = torch.empty(n, dtype=torch.float32)
        return self._flat[:n].view(shape)

    def release(self) -> None:
        """Let the buffer's memory go (the run is over)."""
        self._flat = None
