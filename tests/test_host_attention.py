"""Attention over host-resident pages (kvtier.kernels.host_attention): the numba kernel against its torch reference
in float64 and against dense float64 attention over the dequantized keys and values.

Pages are written the way the warm tier writes them: fresh random keys and values quantized by the layout's format
and copied into slab rows through ``layout.views`` (as WarmPages.store does). The kernel's outputs and scratch are
poisoned with NaN, so anything it fails to write shows up. Shapes are small: the first call compiles the kernel.
"""

import math

import pytest
import torch

from kvtier.formats import Int4Format, TurboQuantFormat
from kvtier.formats.turboquant import qjl_sketch
from kvtier.kernels import host_attention as host
from kvtier.kernels.host_attention import host_attention, host_attention_reference, host_kernel_reads
from kvtier.pages import PageLayout

BATCH, KV_HEADS = 2, 2
SLAB_ROWS = 10
ROWS = [7, 2, 9, 0, 5, 3, 8]  # the attended slab rows: not sorted, not contiguous
PAGE_ORDER = [3, 0, 6, 1, 4, 2, 5]  # which block of positions each attended row holds
OUT_RELATIVE = 1e-5  # float32 arithmetic against float64
LSE_ABSOLUTE = 1e-4


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output and scratch tensor the kernel gets starts as NaN."""
    monkeypatch.setattr(host, "_empty", lambda *shape: torch.full(shape, math.nan))


def filled_slab(layout: PageLayout, generator: torch.Generator, sketch=None) -> torch.Tensor:
    """A uint8 (SLAB_ROWS, page_bytes) slab; every row a page of fresh random keys and values, quantized by the
    layout's format (all rows in one call, stacked on the batch axis) and written through the layout's views, as
    WarmPages.store writes a page (here every row at once)."""
    shape = (SLAB_ROWS * layout.batch, layout.kv_heads, layout.block_size, layout.head_dim)
    keys = torch.randn(shape, generator=generator) * 2
    keys[..., :3] += 4  # outlier channels, as real keys have
    values = torch.randn(shape, generator=generator)
    pages = layout.format.quantize(keys, values, None, sketch)  # fields (SLAB_ROWS * B, H, ...)
    slab = torch.zeros(SLAB_ROWS, layout.page_bytes, dtype=torch.uint8)
    for name, view in layout.views(slab).items():  # (SLAB_ROWS, B, H, ...) each
        view.copy_(pages[name].unflatten(0, (SLAB_ROWS, layout.batch)))
    return slab


def page_table(block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (n,) and positions (n,) int64: row ROWS[i] holds positions PAGE_ORDER[i] * block ... + block - 1."""
    return torch.tensor(ROWS), torch.tensor(PAGE_ORDER) * block


def dense_attention(queries, slab, rows, positions, kv_start, kv_end, layout, sketch=None):
    """float64 softmax over every attended token, keys and values dequantized page by page and concatenated,
    written out apart from the reference: returns out (B, H, G, D) and lse (B, H, G)."""
    fields = layout.views(slab[rows])
    keys, values = layout.format.dequantize(fields, torch.float64, sketch)  # (n, B, H, block, D)
    keys = torch.cat(list(keys), dim=2)  # (B, H, n * block, D)
    values = torch.cat(list(values), dim=2)
    token_positions = torch.cat([torch.arange(p, p + layout.block_size) for p in positions.tolist()])
    allowed = (token_positions >= kv_start[:, None]) & (token_positions < kv_end[:, None])  # (B, n * block)
    scores = torch.einsum("bhgd,bhtd->bhgt", queries.double(), keys)
    scores = scores.masked_fill(~allowed[:, None, None], -torch.inf)
    return torch.einsum("bhgt,bhtd->bhgd", scores.softmax(-1), values), scores.logsumexp(-1)


def assert_close_lse(got, expected):
    """Equal -inf where nothing was attended, within LSE_ABSOLUTE elsewhere."""
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    assert (got.double()[finite] - expected[finite]).abs().max() < LSE_ABSOLUTE


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


def int4_layout(head_dim: int, block: int, key_axis: str) -> PageLayout:
    """INT4 pages, keys per channel over 16-token groups (32 for 64-token pages) or per token."""
    key_group = 32 if block == 64 else 16
    return PageLayout(BATCH, KV_HEADS, block, head_dim, Int4Format(key_group, key_per_channel=key_axis == "channel"))


@pytest.mark.parametrize("key_axis", ["channel", "token"])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("groups", [1, 4, 8], ids=["mha", "gqa4", "gqa8"])
def test_kernel_matches_float64_reference_and_dense(groups, head_dim, block, key_axis):
    seed = groups * 1000 + head_dim * 10 + block + (key_axis == "token")
    generator = torch.Generator().manual_seed(seed)
    layout = int4_layout(head_dim, block, key_axis)
    assert host_kernel_reads(layout)
    slab = filled_slab(layout, generator)
    rows, positions = page_table(block)
    tokens = len(ROWS) * block
    # sequence 0: partial first and last pages; sequence 1: misses pages 0, 1, 5 and 6 entirely
    kv_start = torch.tensor([3, 2 * block + 1])
    kv_end = torch.tensor([tokens - 5, 5 * block - 3])
    queries = torch.randn(BATCH, KV_HEADS, groups, head_dim, generator=generator) * 2 / math.sqrt(head_dim)

    out, lse, page_lse = host_attention(queries, slab, rows, positions, kv_start, kv_end, layout, with_page_lse=True)

    assert out.shape == queries.shape and out.dtype == torch.float32
    assert lse.shape == queries.shape[:-1] and page_lse.shape == (*queries.shape[:-1], len(ROWS))
    assert not out.isnan().any() and not lse.isnan().any() and not page_lse.isnan().any()
    expected_out, expected_lse, expected_page_lse = host_attention_reference(
        queries.double(), slab, rows, positions, kv_start, kv_end, layout, with_page_lse=True)
    assert expected_out.dtype == torch.float64
    assert relative_error(out, expected_out) < OUT_RELATIVE
    assert_close_lse(lse, expected_lse)
    assert_close_lse(page_lse, expected_page_lse)
    outside = (positions + block <= kv_start[1]) | (positions >= kv_end[1])  # pages sequence 1 never reaches
    assert outside.sum() == 4 and torch.isneginf(page_lse[1][..., outside]).all()
    assert torch.isfinite(page_lse[1][..., ~outside]).all() and torch.isfinite(page_lse[0]).all()

    dense_out, dense_lse = dense_attention(queries, slab, rows, positions, kv_start, kv_end, layout)
    assert relative_error(out, dense_out) < OUT_RELATIVE
    assert_close_lse(lse, dense_lse)
    torch.testing.assert_close(expected_out, dense_out, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("key_axis", ["channel", "token"])
def test_sequence_that_attends_nothing(key_axis):
    generator = torch.Generator().manual_seed(11)
    layout, groups = int4_layout(64, 32, key_axis), 4
    slab = filled_slab(layout, generator)
    rows, positions = page_table(32)
    kv_start = torch.tensor([40, 10_000])  # sequence 1's range lies past every page
    kv_end = torch.tensor([150, 10_050])
    queries = torch.randn(BATCH, KV_HEADS, groups, 64, generator=generator) / 4
    out, lse, page_lse = host_attention(queries, slab, rows, positions, kv_start, kv_end, layout, with_page_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isneginf(page_lse[1]).all()
    expected_out, expected_lse, expected_page_lse = host_attention_reference(
        queries.double(), slab, rows, positions, kv_start, kv_end, layout, with_page_lse=True)
    assert relative_error(out[0], expected_out[0]) < OUT_RELATIVE
    assert_close_lse(lse, expected_lse)
    assert_close_lse(page_lse, expected_page_lse)


def test_no_pages():
    layout, groups = int4_layout(64, 16, "channel"), 4
    slab = torch.zeros(2, layout.page_bytes, dtype=torch.uint8)
    queries = torch.randn(BATCH, KV_HEADS, groups, 64)
    none = torch.zeros(0, dtype=torch.int64)
    out, lse, page_lse = host_attention(queries, slab, none, none, torch.tensor([0, 0]), torch.tensor([9, 9]), layout,
                                        with_page_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert page_lse.shape == (BATCH, KV_HEADS, groups, 0)
    assert host_attention(queries, slab, none, none, torch.tensor([0, 0]), torch.tensor([9, 9]), layout)[2] is None


def test_rows_outside_the_slab_are_refused():
    layout, groups = int4_layout(64, 16, "channel"), 1
    slab = torch.zeros(3, layout.page_bytes, dtype=torch.uint8)
    queries = torch.randn(BATCH, KV_HEADS, groups, 64)
    with pytest.raises(IndexError):
        host_attention(queries, slab, torch.tensor([0, 3]), torch.tensor([0, 16]), torch.tensor([0, 0]),
                       torch.tensor([32, 32]), layout)


@pytest.mark.parametrize("qjl, key_group", [(True, 16), (False, 0)])
def test_turboquant_pages_take_the_reference(qjl, key_group):
    """2-bit codebooks: the package computes each codebook on first use, 3 and 4 bits take seconds."""
    generator = torch.Generator().manual_seed(key_group)
    layout = PageLayout(BATCH, KV_HEADS, 16, 64, TurboQuantFormat(2, qjl, key_group))
    assert not host_kernel_reads(layout)
    sketch = qjl_sketch(64, seed=5) if qjl else None
    slab = filled_slab(layout, generator, sketch)
    rows, positions = page_table(16)
    kv_start, kv_end = torch.tensor([0, 20]), torch.tensor([112, 90])
    queries = torch.randn(BATCH, KV_HEADS, 4, 64, generator=generator) / 4
    got = host_attention(queries, slab, rows, positions, kv_start, kv_end, layout, sketch, with_page_lse=True)
    expected = host_attention_reference(queries, slab, rows, positions, kv_start, kv_end, layout, sketch,
                                        with_page_lse=True)
    for tensor, reference in zip(got, expected):
        assert torch.equal(tensor, reference)
    dense_out, _ = dense_attention(queries, slab, rows, positions, kv_start, kv_end, layout, sketch)
    assert relative_error(got[0], dense_out) < OUT_RELATIVE


def test_float64_queries_take_the_reference():
    layout, groups = int4_layout(64, 16, "token"), 4
    generator = torch.Generator().manual_seed(3)
    slab = filled_slab(layout, generator)
    rows, positions = page_table(16)
    queries = torch.randn(BATCH, KV_HEADS, groups, 64, generator=generator, dtype=torch.float64)
    out, lse, _ = host_attention(queries, slab, rows, positions, torch.tensor([0, 5]), torch.tensor([112, 60]),
                                 layout)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


@pytest.mark.parametrize("splits", [1, 3, 5, 7])
def test_any_split_of_the_pages_gives_the_same_answer(splits, monkeypatch):
    """Page ranges merged by log-sum-exp, some of them empty (5 splits of 7 pages) or fully masked for a sequence."""
    monkeypatch.setattr(host, "_splits", lambda pairs, count: splits)
    generator = torch.Generator().manual_seed(splits)
    layout = int4_layout(64, 16, "channel")
    slab = filled_slab(layout, generator)
    rows, positions = page_table(16)
    kv_start, kv_end = torch.tensor([5, 40]), torch.tensor([100, 70])
    queries = torch.randn(BATCH, KV_HEADS, 4, 64, generator=generator) / 4
    out, lse, page_lse = host_attention(queries, slab, rows, positions, kv_start, kv_end, layout, with_page_lse=True)
    expected_out, expected_lse, expected_page_lse = host_attention_reference(
        queries.double(), slab, rows, positions, kv_start, kv_end, layout, with_page_lse=True)
    assert relative_error(out, expected_out) < OUT_RELATIVE
    assert_close_lse(lse, expected_lse)
    assert_close_lse(page_lse, expected_page_lse)
