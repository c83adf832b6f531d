"""Randomized Hadamard rotation of the head dim: R = diag(signs) @ H / sqrt(D), orthonormal.

Rotating spreads outlier channels over all channels before quantizing. Attention never needs the
rotated vectors turned back one by one: q . k = (q R) . (k R), and a sum of rotated values is rotated
back once, so the cost is two D x D products per query, not per cached token. ``fast_hadamard`` is the transform
in D log D additions; ``rotate`` applies R as one matrix product, which is faster in torch at head dims up to 256.
"""

from __future__ import annotations

import torch


def _check_power_of_two(dim: int) -> None:
    if dim < 1 or dim & (dim - 1):
        raise ValueError(
            f"the Hadamard rotation needs a power-of-two head dim, got {dim}; "
            "attach with rotate=False to quantize this model without rotation."
        )


def hadamard_matrix(dim: int) -> torch.Tensor:
    """Sylvester Hadamard matrix (dim, dim) of +-1 in float32; dim must be a power of two."""
    _check_power_of_two(dim)
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < dim:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix


def random_signs(dim: int, seed: int) -> torch.Tensor:
    """(dim,) float32 of +-1, reproducible from ``seed``: the diagonal of R's sign flip."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    """Orthonormal (dim, dim) float32 matrix R; rotate row vectors with x @ R, undo with y @ R.T."""
    return rotation_matrix(random_signs(dim, seed))


def rotation_matrix(signs: torch.Tensor) -> torch.Tensor:
    """R = diag(signs) H / sqrt(D) for (D,) signs of +-1, in their dtype and on their device."""
    dim = signs.shape[0]
    return signs[:, None] * hadamard_matrix(dim).to(signs.device, signs.dtype) / dim**0.5


def fast_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H (Sylvester, unnormalized) over the last axis in D log D additions: the fast Walsh-Hadamard transform."""
    dim = x.shape[-1]
    _check_power_of_two(dim)
    out = x.reshape(-1, dim)
    half = 1
    while half < dim:
        pairs = out.view(-1, dim // (2 * half), 2, half)  # (rows, blocks, 2, half)
        out = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2)
        half *= 2
    return out.reshape(x.shape)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x @ R for the R of ``random_rotation`` with these signs: (..., D) -> (..., D).

    Applied as one (D, D) matrix product rather than by ``fast_hadamard``: at head dims up to 256 one product beats
    the transform's log2(D) stages in torch on both devices (on the CPU machine 3-4x at D 64 and 128; on CUDA one
    kernel launch instead of about 30)."""
    return x @ rotation_matrix(signs.to(x.device, x.dtype))
