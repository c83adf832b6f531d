"""Lloyd-Max scalar codebooks for one coordinate of a random unit vector, computed here (no pasted tables).

After a random rotation, each coordinate x of a unit vector in R^D follows the density
f(x) = c_D (1 - x^2)^((D - 3) / 2) on [-1, 1] (close to N(0, 1/D) for large D). A Lloyd-Max codebook
for it is the set of 2^bits levels that minimizes E[(x - level(x))^2]: every level is the mean of x over
its cell (centroid condition) and every cell boundary lies halfway between neighbouring levels
(nearest-neighbour condition). Lloyd's iteration alternates the two conditions; the integrals over each
cell use Simpson's rule between the cell's exact edges, in float64.
"""

from __future__ import annotations

import functools
import math

import torch

QUADRATURE_POINTS = 2049  # per cell, odd for Simpson's rule
TOLERANCE = 1e-13
MAX_ITERATIONS = 20000


def coordinate_density(dim: int, points: torch.Tensor) -> torch.Tensor:
    """The density of one coordinate of a uniform random unit vector in R^dim, at ``points`` in [-1, 1]."""
    if dim < 3:
        raise ValueError(f"the coordinate density needs dim >= 3, got {dim}")
    log_norm = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
    return torch.exp(log_norm + (dim - 3) / 2 * torch.log1p(-points.square().clamp_max(1.0)))


def boundaries(levels: torch.Tensor) -> torch.Tensor:
    """Cell boundaries of sorted levels: the midpoints between neighbours (2^bits - 1 of them)."""
    return (levels[1:] + levels[:-1]) / 2


def _simpson_weights(points: int) -> torch.Tensor:
    weights = torch.ones(points, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return weights / (3 * (points - 1))


def cell_moments(levels: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cell of the levels' nearest-neighbour partition of [-1, 1]: P(cell), E[x; cell], E[x^2; cell]."""
    edges = torch.cat((levels.new_tensor([-1.0]), boundaries(levels), levels.new_tensor([1.0])))
    fraction = torch.linspace(0, 1, QUADRATURE_POINTS, dtype=torch.float64)
    width = (edges[1:] - edges[:-1]).unsqueeze(1)  # (cells, 1)
    points = edges[:-1].unsqueeze(1) + width * fraction  # (cells, Q)
    weighted = coordinate_density(dim, points) * _simpson_weights(QUADRATURE_POINTS) * width
    return weighted.sum(1), (weighted * points).sum(1), (weighted * points.square()).sum(1)


@functools.lru_cache(maxsize=None)
def _codebook64(bits: int, dim: int) -> torch.Tensor:
    count = 1 << bits
    # start evenly spread over +-2.5 standard deviations, then alternate the two optimality conditions
    levels = torch.linspace(-2.5, 2.5, count, dtype=torch.float64) / math.sqrt(dim)
    for _ in range(MAX_ITERATIONS):
        mass, moment, _ = cell_moments(levels, dim)
        updated = moment / mass
        if (updated - levels).abs().max() < TOLERANCE:
            return updated
        levels = updated
    return levels


def codebook(bits: int, dim: int) -> torch.Tensor:
    """(2^bits,) sorted float64 Lloyd-Max levels for a coordinate of a random unit vector in R^dim."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 1..8, got {bits}")
    return _codebook64(bits, dim).clone()


def distortion(levels: torch.Tensor, dim: int) -> float:
    """E[(x - nearest level)^2] for one coordinate; times dim, the expected squared error of a unit vector."""
    mass, moment, second = cell_moments(levels, dim)
    return float((second - 2 * levels * moment + levels.square() * mass).sum())
