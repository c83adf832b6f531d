"""Randomized Hadamard rotation of the head dim: R = diag(signs) @ H / sqrt(D), orthonormal.

Rotating spreads outlier channels over all channels before quantizing. Attention never needs the
rotated vectors turned back one by one: q . k = (q R) . (k R), and a sum of rotated values is rotated
back once, so the cost is two D x D products per query, not per cached token.
"""

from __future__ import annotations

import torch


def hadamard_matrix(dim: int) -> torch.Tensor:
    """Sylvester Hadamard matrix (dim, dim) of +-1 in float32; dim must be a power of two."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(
            f"the Hadamard rotation needs a power-of-two head dim, got {dim}; "
            "attach with rotate=False to quantize this model without rotation."
        )
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < dim:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    """Orthonormal (dim, dim) float32 matrix R; rotate row vectors with x @ R, undo with y @ R.T."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1
    return signs[:, None] * hadamard_matrix(dim) / dim**0.5
