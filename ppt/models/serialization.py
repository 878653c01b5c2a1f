"""Space-filling-curve codes of integer grid coordinates (the serialization of PTv3).

A code orders the voxels of a batch along a curve, so neighbouring codes are (mostly)
neighbouring voxels and attention over runs of consecutive codes is local attention:

- ``"z"``: Z-order (Morton): the bits of x, y, z interleaved, x most significant in each triple.
- ``"hilbert"``: Hilbert curve (Skilling, "Programming the Hilbert curve", AIP 2004): every
  step moves to a face neighbour.
- ``"z-trans"``, ``"hilbert-trans"``: the same curves with x and y swapped.

Layout of a code (int64): ``batch << (3 * depth) | curve index`` with ``depth`` bits per axis,
so sorting by code sorts by sample first and a sample's order never depends on its batch.
Codes are hierarchical: ``code >> 3`` is the code of the voxel's parent cell on the grid of
half the resolution (``grid >> 1``), for both curves; grid pooling uses this.

Unlike the reference (which takes ``depth`` from the largest coordinate in the batch, so a
Hilbert order changes with the other samples of a batch), the PTv3 backbone uses a fixed
depth (:data:`DEFAULT_DEPTH`), which makes a sample's order independent of its batch.
"""
from __future__ import annotations

import torch

ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")
DEFAULT_DEPTH = 16        # bits per axis: 65536 voxels (1.3 km at 2 cm) per axis
MAX_DEPTH = 21            # 3 * 21 = 63 bits, the most an int64 holds
CODE_BITS = 63

# bit-spreading masks: an integer's bits moved to every third position (21 bits -> 63)
_SPREAD = ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F),
           (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249))
# the inverse steps: shift 2, 4, ..., 32, each followed by the previous spreading mask
_COMPACT = tuple(zip((2, 4, 8, 16, 32), [m for _, m in _SPREAD[-2::-1]] + [0x1FFFFF]))


def _spread(v: torch.Tensor) -> torch.Tensor:
    """(N,) int64 values < 2**21 -> (N,) with bit i moved to bit 3i."""
    v = v & 0x1FFFFF
    for shift, mask in _SPREAD:
        v = (v | (v << shift)) & mask
    return v


def _compact(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_spread`: bits 0, 3, 6, ... of (N,) int64 -> a dense integer."""
    v = v & _SPREAD[-1][1]
    for shift, mask in _COMPACT:
        v = (v ^ (v >> shift)) & mask
    return v


def _interleave(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (_spread(a) << 2) | (_spread(b) << 1) | _spread(c)


def _deinterleave(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _compact(code >> 2), _compact(code >> 1), _compact(code)


def _hilbert_transpose(axes: list[torch.Tensor], depth: int) -> list[torch.Tensor]:
    """Skilling's AxesToTranspose: 3 (N,) coordinates -> the Hilbert index in transposed form
    (bit ``b`` of the index triple ``b`` is spread over the three returned integers)."""
    x = [a.clone() for a in axes]
    q = 1 << (depth - 1)
    while q > 1:  # inverse undo of the excess work, from the top bit down
        p = q - 1
        for i in range(3):
            on = (x[i] & q) != 0
            if i == 0:
                x[0] = torch.where(on, x[0] ^ p, x[0])
                continue
            t = (x[0] ^ x[i]) & p  # where the bit is off, swap the low bits of x0 and xi
            x[0] = torch.where(on, x[0] ^ p, x[0] ^ t)
            x[i] = torch.where(on, x[i], x[i] ^ t)
        q >>= 1
    x[1] = x[1] ^ x[0]  # Gray encode
    x[2] = x[2] ^ x[1]
    t = torch.zeros_like(x[0])
    q = 1 << (depth - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return [v ^ t for v in x]


def _hilbert_axes(x: list[torch.Tensor], depth: int) -> list[torch.Tensor]:
    """Skilling's TransposeToAxes: inverse of :func:`_hilbert_transpose`."""
    x = [v.clone() for v in x]
    t = x[2] >> 1  # Gray decode
    x[2] = x[2] ^ x[1]
    x[1] = x[1] ^ x[0]
    x[0] = x[0] ^ t
    q = 2
    while q != 2 << (depth - 1):  # undo the excess work, from the bottom bit up
        p = q - 1
        for i in (2, 1, 0):
            on = (x[i] & q) != 0
            if i == 0:
                x[0] = torch.where(on, x[0] ^ p, x[0])
                continue
            t = (x[0] ^ x[i]) & p
            x[0] = torch.where(on, x[0] ^ p, x[0] ^ t)
            x[i] = torch.where(on, x[i], x[i] ^ t)
        q <<= 1
    return x


def _check(order: str, depth: int) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown serialization order {order!r}; valid: {', '.join(ORDERS)}")
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be in [1, {MAX_DEPTH}], got {depth}")


def encode(grid: torch.Tensor, batch: torch.Tensor | None = None, depth: int = DEFAULT_DEPTH,
           order: str = "z") -> torch.Tensor:
    """Curve codes of integer grid coordinates.

    Args:
        grid: (N, 3) non-negative integer coordinates, each < 2**depth.
        batch: (N,) sample index (stored in the high bits), or None.
        depth: bits per axis.
        order: one of :data:`ORDERS`.

    Returns:
        (N,) int64 codes.
    """
    _check(order, depth)
    grid = grid.long()
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid must be (N, 3), got {tuple(grid.shape)}")
    if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= 1 << depth):
        raise ValueError(f"grid coordinates must be in [0, 2**{depth}), got [{int(grid.min())}, {int(grid.max())}]")
    if order.endswith("-trans"):
        grid = grid[:, [1, 0, 2]]
    axes = list(grid.unbind(1))
    if order.startswith("hilbert"):
        axes = _hilbert_transpose(axes, depth)
    code = _interleave(*axes)
    if batch is not None:
        batch = batch.long()
        if batch.numel() and int(batch.max()) >= 1 << (CODE_BITS - 3 * depth):
            raise ValueError(f"batch index {int(batch.max())} does not fit beside {3 * depth} code bits")
        code = (batch << (3 * depth)) | code
    return code


def decode(code: torch.Tensor, depth: int = DEFAULT_DEPTH, order: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode`: (N,) codes -> ((N, 3) int64 grid, (N,) int64 batch index)."""
    _check(order, depth)
    code = code.long()
    batch = code >> (3 * depth)
    axes = list(_deinterleave(code & ((1 << (3 * depth)) - 1)))
    if order.startswith("hilbert"):
        axes = _hilbert_axes(axes, depth)
    grid = torch.stack(axes, dim=1)
    if order.endswith("-trans"):
        grid = grid[:, [1, 0, 2]]
    return grid, batch
