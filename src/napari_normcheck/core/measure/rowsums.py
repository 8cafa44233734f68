"""Float64 sums of float32 rows, in NumPy's order of additions wherever the rows are.

The soft Dice sums are float64 sums of float32 probabilities. Their last bits depend on the order
of the additions, and the report's numbers, the resume and the cluster equalities are bitwise, so
every device adds in one order: NumPy's. ``a.sum(axis=1, dtype=np.float64)`` on a contiguous float32
row casts :func:`numpy.getbufsize` values at a time (8192) and sums each such buffer pairwise
(blocks of 128 summed with 8 running sums, halves added together), then adds the buffers' sums
one after the other. :func:`numpy_order_row_sums` does the same additions with torch operations on
the rows' device, vectorized over rows and buffers; on the CPU, NumPy's own kernel is the faster
of the two, and :func:`float64_row_sums` uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: NumPy's pairwise summation sums blocks of this many values with 8 running sums.
_BLOCK = 128
_LANES = 8


def float64_row_sums(rows: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-row float64 sums of contiguous float32 rows ``(C, N)``, bit for bit NumPy's.

    Parameters
    ----------
    rows : torch.Tensor or numpy.ndarray
        Contiguous float32 rows, on any device.

    Returns
    -------
    numpy.ndarray
        ``(C,)`` float64, equal to ``rows.sum(axis=1, dtype=np.float64)`` on the host.
    """
    if isinstance(rows, np.ndarray):
        return rows.sum(axis=1, dtype=np.float64)
    if rows.device.type == "cuda":
        return numpy_order_row_sums(rows)
    # The CPU's (NumPy's kernel is the faster there) and other accelerators', which may lack float64.
    return rows.cpu().numpy().sum(axis=1, dtype=np.float64)


def numpy_order_row_sums(rows: torch.Tensor) -> np.ndarray:
    """:func:`float64_row_sums` computed with torch operations where ``rows`` are.

    Whole buffers are summed on the device (about 30 operations whatever the length); the buffer
    sums, ``C x N / 8192`` values, and the last, partial buffer (under 8192 values a row) are added
    on the host in NumPy, in NumPy's order.
    """
    import torch

    n_rows, length = rows.shape
    buffer = np.getbufsize()
    n_full = length // buffer if _leaves_are_blocks(buffer) else 0
    parts = [np.zeros((n_rows, 1))]
    if n_full:
        whole = rows[:, : n_full * buffer].to(torch.float64)
        parts.append(_whole_buffer_sums(whole.reshape(n_rows, n_full, buffer)).cpu().numpy())
    tail = rows[:, n_full * buffer :]
    if tail.shape[1]:
        # A partial buffer: NumPy sums an uncast float64 row of that length the same way.
        values = tail.cpu().numpy().astype(np.float64)
        for start in range(0, values.shape[1], buffer):
            parts.append(values[:, start : start + buffer].sum(axis=1, keepdims=True))
    # The buffers' sums one after the other, from 0.
    return np.add.accumulate(np.concatenate(parts, axis=1), axis=1)[:, -1]


def _leaves_are_blocks(buffer: int) -> bool:
    """Whether halving a buffer (to multiples of 8) ends in blocks of exactly 128 values."""
    return (
        buffer >= _BLOCK
        and buffer % _BLOCK == 0
        and (buffer // _BLOCK) & (buffer // _BLOCK - 1) == 0
    )


def _whole_buffer_sums(buffers: torch.Tensor) -> torch.Tensor:
    """NumPy's pairwise sum of each buffer ``(..., B)`` with ``B = 128 * 2**k``: ``(...)``."""
    *lead, size = buffers.shape
    # Each block of 128: 8 running sums over its 16 groups of 8, in order, then combined as
    # ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)).
    groups = buffers.reshape(*lead, size // _BLOCK, _BLOCK // _LANES, _LANES)
    running = groups[..., 0, :].clone()
    for k in range(1, _BLOCK // _LANES):
        running += groups[..., k, :]
    r = running
    blocks = ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + (
        (r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7])
    )
    # Then the halves: the sum of a run of blocks is its first half's plus its second half's.
    while blocks.shape[-1] > 1:
        blocks = blocks[..., 0::2] + blocks[..., 1::2]
    return blocks[..., 0]
