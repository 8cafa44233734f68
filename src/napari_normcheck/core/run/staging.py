"""Host-to-device copies of input batches through reused page-locked buffers.

``torch.Tensor.pin_memory()`` allocates a new page-locked buffer on every call, which costs more than
the copy itself for tile-sized batches. :class:`HostStaging` keeps a few pinned buffers per window
shape and rotates through them; a buffer is refilled only after the CUDA event recorded behind its
last asynchronous copy has completed, so a non-blocking copy never reads a buffer being overwritten.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


class HostStaging:
    """Stage ``(C, z, y, x)`` windows into device tensors of a batch.

    Parameters
    ----------
    device : torch.device
        The target device. On the CPU batches are plain stacks (no copy to make).
    n_buffers : int
        Pinned buffers in rotation (2: one is filled while the other is being copied).
    """

    def __init__(self, device: torch.device, n_buffers: int = 2) -> None:
        self.device = device
        self.n_buffers = max(1, n_buffers)
        # window shape -> list of [pinned buffer (capacity, C, z, y, x), event or None]
        self._slots: dict[tuple[int, ...], deque[list]] = {}

    def to_device(self, images: list[np.ndarray]) -> torch.Tensor:
        """A ``(N, C, z, y, x)`` float32 tensor on the device holding ``images``.

        Parameters
        ----------
        images : list of numpy.ndarray
            Windows of one shape, float32.

        Returns
        -------
        torch.Tensor
            On CUDA, the result of a non-blocking copy from a pinned buffer (ordered on the current
            stream, so kernels launched after it see the data).
        """
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(images))
        shape = tuple(images[0].shape)
        slot = self._slot(shape, len(images))
        buffer, event = slot
        if event is not None:
            event.synchronize()  # the copy that last read this buffer has finished
        host = buffer[: len(images)]
        host_view = host.numpy()
        for i, image in enumerate(images):
            host_view[i] = image
        on_device = host.to(self.device, non_blocking=True)
        done = torch.cuda.Event(blocking=True)  # waited for asleep, not spinning on a core
        done.record(torch.cuda.current_stream(self.device))
        slot[1] = done
        return on_device

    def _slot(self, shape: tuple[int, ...], n: int) -> list:
        # Least recently used first: the buffer whose copy was queued longest ago.
        slots = self._slots.setdefault(shape, deque())
        if len(slots) < self.n_buffers:
            slot = [self._allocate(shape, n), None]
        else:
            slot = slots.popleft()
            if slot[0].shape[0] < n:
                if slot[1] is not None:
                    slot[1].synchronize()
                slot[0], slot[1] = self._allocate(shape, n), None
        slots.append(slot)
        return slot

    @staticmethod
    def _allocate(shape: tuple[int, ...], n: int) -> torch.Tensor:
        return torch.empty((n, *shape), dtype=torch.float32, pin_memory=True)


class HostCopies:
    """Device-to-host copies of finished results, off the stream the model computes on.

    On the CPU a tensor is already on the host: :meth:`to_host` returns its memory as an array, no
    copy made. On CUDA the copy goes into page-locked memory (torch's caching host allocator reuses
    those blocks) on a side stream that first waits for the work queued so far on the current one,
    so the next tiles' forwards and blends run while it copies; only the calling thread waits for
    the copy to land.

    Parameters
    ----------
    device : torch.device
        Where the tensors handed to :meth:`to_host` are.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_host(self, tensor: torch.Tensor) -> np.ndarray:
        """``tensor``'s values as a host array (shares ``tensor``'s memory on the CPU)."""
        if tensor.device.type == "cpu":
            return tensor.numpy()
        if self._stream is None:  # another accelerator (MPS, XPU): a plain, blocking copy
            return tensor.cpu().numpy()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            host.copy_(tensor, non_blocking=True)
            # Waited for asleep: a spinning wait would take a core from the other threads.
            done = torch.cuda.Event(blocking=True)
            done.record(self._stream)
        # The allocator must not hand the tensor's memory to other work before the copy has read it.
        tensor.record_stream(self._stream)
        done.synchronize()
        return host.numpy()
