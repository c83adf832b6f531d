import pytest
import torch

from kvtier.kernels.partial_attention import PartialAccumulator, partial_attention


def dense_reference(queries, keys, values, allowed):
    """float64 softmax attention: queries (B, H, G, Q, D), keys/values (B, H, T, D), allowed broadcastable."""
    scores = torch.einsum("bhgqd,bhtd->bhgqt", queries.double(), keys.double())
    scores = scores.masked_fill(~allowed, -torch.inf)
    return torch.einsum("bhgqt,bhtd->bhgqd", scores.softmax(-1), values.double())


@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("tile", [1, 7, 32])
def test_tiles_merged_by_log_sum_exp_equal_dense(groups, tile):
    generator = torch.Generator().manual_seed(groups * 100 + tile)
    batch, heads, queries_n, tokens, dim = 2, 2, 5, 70, 16
    queries = torch.randn(batch, heads, groups, queries_n, dim, generator=generator)
    keys = torch.randn(batch, heads, tokens, dim, generator=generator) * 2
    values = torch.randn(batch, heads, tokens, dim, generator=generator)
    allowed = torch.rand(batch, 1, 1, queries_n, tokens, generator=generator) > 0.3
    allowed[..., 0] = True  # every row attends somewhere
    allowed[:, :, :, :, 10:50] = False  # whole tiles masked out
    accumulator = PartialAccumulator()
    for first in range(0, tokens, tile):
        part = slice(first, first + tile)
        accumulator.add(*partial_attention(queries, keys[:, :, part], values[:, :, part], allowed[..., part]))
    expected = dense_reference(queries, keys, values, allowed)
    torch.testing.assert_close(accumulator.out.double(), expected, rtol=1e-5, atol=1e-5)


def test_fully_masked_tile_contributes_nothing():
    queries = torch.randn(1, 1, 1, 2, 8)
    keys, values = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    out, lse = partial_attention(queries, keys, values, torch.zeros(1, 1, 1, 2, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()
    accumulator = PartialAccumulator()
    accumulator.add(out, lse)
    accumulator.add(*partial_attention(queries, keys, values, None))
    expected = dense_reference(queries, keys, values, torch.ones(1, 1, 1, 2, 4, dtype=torch.bool))
    torch.testing.assert_close(accumulator.out.double(), expected, rtol=1e-5, atol=1e-5)
