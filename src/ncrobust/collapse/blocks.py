"""Row blocks: the float64 work on ``[N, d]`` features is done a block of rows at a time.

On the CPU a block is about ``_BLOCK_BYTES`` of float64, so that the float64 copy of a block and
its difference to the class means stay in cache and no ``N x d`` float64 copy is made. On a GPU a
block is the whole batch: the batch already bounds memory, and each block costs kernel launches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_BLOCK_BYTES = 1 << 20
_MIN_BLOCK_ROWS = 16


def _block_rows(d: int, device: torch.device | None = None) -> int:
    """Rows per block of ``d`` features: cache-sized on the CPU, the whole batch on a GPU."""
    if device is not None and device.type != "cpu":
        return 1 << 62
    return max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (8 * d))


def _blocks(n: int, d: int, device: torch.device | None = None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the consecutive row blocks of ``n`` rows of ``d`` features."""
    step = _block_rows(d, device)
    for start in range(0, n, step):
        yield start, min(n, start + step)
