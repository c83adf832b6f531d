"""The Gluon INT4 decode kernel (kernels/int4_mma_decode.py): its operand orders and rotation algebra in torch on any
machine, its sm_90 machine code offline, and its outputs against the float64 reference on a GPU.

The kernel runs only compiled on CUDA (Gluon has no interpreter); on the CPU the tests check what the kernel relies
on (the orders are bit permutations of the channel index, so the Hadamard matrix applies in operand order) by
computing the kernel's rotation steps in float64, and that its page loop reads every byte through its shared-memory
ring (and keeps nothing in local memory under the launch's register cap).
"""

import math

import pytest
import torch
from test_decode_kernel import BF16_RELATIVE, filled_layer, small_llama, two_prompts
from test_kernel_sass import compile_and_count

from kvtier.kernels import int4_mma_decode as mma
from kvtier.kernels.decode_attention import DecodeWorkspace, decode_attention, paged_attention_reference
from kvtier.rotation import hadamard_matrix, random_rotation

# benchmarks/kernel_sass.py's formats of the Gluon kernel, by head dim
GLUON_FORMATS = {"gluon-int4": 128, "gluon-int4-mass": 128, "gluon-int4-d64": 64, "gluon-int4-unrotated": 128}
BLOCK = 64  # kernel_sass.py's page
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def bit_permutation(mapping, bits: int) -> bool:
    """Whether ``mapping`` on 0 .. 2^bits - 1 sends each single bit to a single bit, and sums of bits to sums."""
    images = [mapping(1 << bit) for bit in range(bits)]
    if sorted(images) != [1 << bit for bit in range(bits)]:
        return False
    return all(mapping(index) == sum(image for bit, image in enumerate(images) if index >> bit & 1)
               for index in range(1 << bits))


@pytest.mark.parametrize("half", [32, 64])
def test_operand_orders_are_bit_permutations(half):
    """Step tokens, value operand rows and key reduction indices each map to tokens or channels by permuting bits."""
    assert bit_permutation(mma._token, 5)
    assert bit_permutation(lambda row: mma._value_byte(row, half), half.bit_length() - 1)
    assert bit_permutation(lambda k: mma._key_channel(k, half), half.bit_length() - 1)


@pytest.mark.parametrize("dim", [64, 128])
def test_rotation_in_operand_order_matches_the_rotation(dim):
    """The kernel's two products, in float64: q R from the query gathered in key operand order through H over the
    halves, and y R^T from an accumulator in value row order through H then the signs, equal q @ R and y @ R.T."""
    half = dim // 2
    rotation = random_rotation(dim, seed=3).double()
    signs = (rotation[:, 0] * math.sqrt(dim)).double()
    hadamard = hadamard_matrix(half).double()
    generator = torch.Generator().manual_seed(0)
    query, output = torch.randn(2, 5, dim, generator=generator, dtype=torch.float64)

    key_order = torch.tensor([mma._key_channel(k, half) for k in range(half)])  # operand index -> channel
    low, high = (query * signs)[:, key_order], (query * signs)[:, key_order + half]
    rotated = torch.cat([(low + high) @ hadamard, (low - high) @ hadamard], 1) / math.sqrt(dim)  # operand order
    torch.testing.assert_close(rotated, (query @ rotation)[:, torch.cat([key_order, key_order + half])])

    value_order = torch.tensor([mma._value_byte(row, half) for row in range(half)])  # accumulator row -> channel
    low, high = output[:, value_order], output[:, value_order + half]  # y = v R as the accumulator holds it
    plain = torch.cat([(low + high) @ hadamard, (low - high) @ hadamard], 1) / math.sqrt(dim)
    plain = plain * signs[torch.cat([value_order, value_order + half])]
    torch.testing.assert_close(plain, (output @ rotation.T)[:, torch.cat([value_order, value_order + half])])


HANDLED = {  # name: (query heads, KV heads, head dim, block, dtype, extra config, whether the Gluon kernel reads it)
    "llama-shape": (16, 4, 128, 64, torch.bfloat16, {}, True),
    "smollm2-shape-float16": (9, 3, 64, 64, torch.float16, {}, True),
    "unrotated-block32": (8, 1, 64, 32, torch.bfloat16, {"rotate": False}, True),
    "float32-model": (8, 2, 64, 64, torch.float32, {}, False),
    "16-rows-a-kv-head": (16, 1, 64, 64, torch.bfloat16, {}, False),
    "head-dim-32": (8, 2, 32, 64, torch.bfloat16, {}, False),
    "key-groups-of-16": (8, 2, 64, 64, torch.bfloat16, {"key_group": 16}, False),
    "per-token-keys": (8, 2, 64, 64, torch.bfloat16, {"key_axis": "token"}, False),
    "turboquant": (8, 2, 64, 64, torch.bfloat16, {"warm_format": "turboquant"}, False),
}


@pytest.mark.parametrize("name", HANDLED)
def test_which_pages_the_kernel_handles(name):
    """The Gluon kernel takes INT4 pages with per-channel keys in groups of 32, head dim 64 or 128, up to 8 query
    rows a KV head and a 16-bit model; decode_attention leaves the rest to the page kernel."""
    query_heads, kv_heads, head_dim, block, dtype, extra, expected = HANDLED[name]
    layer = filled_layer("cpu", 1, query_heads, kv_heads, head_dim, 100, dtype, seed=1,
                         **{"block_size": block, "key_group": 32, **extra})
    assert mma.handles(layer.paged(), query_heads, dtype) == expected


def test_a_rotation_without_its_signs_goes_to_the_page_kernel():
    """The kernel applies R by its Hadamard structure, so pages rotated by another matrix (no ``rotation_signs``,
    as benchmarks/kernel_variants.py builds them) are not its own."""
    layer = filled_layer("cpu", 1, 8, 2, 64, 100, torch.bfloat16, seed=1, block_size=64, key_group=32)
    paged = layer.paged()
    assert mma.handles(paged, 8, torch.bfloat16)
    paged.rotation_signs = None
    assert not mma.handles(paged, 8, torch.bfloat16)


@pytest.fixture(scope="module")
def sass_rows(tmp_path_factory) -> dict:
    """benchmarks/kernel_sass.py's rows for the Gluon kernel's formats (compiled once, in a process of its own)."""
    return compile_and_count(tmp_path_factory.mktemp("gluon"), "--formats", *GLUON_FORMATS)


@pytest.mark.parametrize("name", GLUON_FORMATS)
def test_warm_loop_reads_pages_through_its_shared_memory_ring(name, sass_rows):
    """Offline for sm_90, with the launch's register cap: every byte of a page reaches the loop by cp.async into the
    program's ring (12 copies a 32-token key group: 4 for the key codes, 4 for the value codes, one each for the
    scale codes, minimums, value scales, value minimums and scale bases; no other global loads but the next page's
    address and position), nothing is kept in local memory, and per 32-token step and 16 code bytes the loop issues 4
    MMAs for the key group's column terms, 4 for scores and 4 for values, plus 2 for the value offsets; per-page mass
    adds under 5% of its instructions."""
    head_dim = GLUON_FORMATS[name]
    warm, hot = sass_rows[name]["warm_loop"], sass_rows[name]["hot_loop"]
    steps = BLOCK // mma.STEP
    assert sass_rows[name]["registers"] <= mma.REGISTERS
    assert warm["async copies"] == 12 * steps, warm["async copies"]
    assert warm["global loads"] <= 2, warm["global loads"]
    assert warm["local memory"] == 0, warm["local memory"]
    assert hot["local memory"] <= 0.04 * hot["instructions"], hot["local memory"]
    assert warm["mma"] == steps * (12 * (head_dim // 2) // 16 + 2)
    if name == "gluon-int4-mass":
        assert warm["instructions"] < 1.05 * sass_rows["gluon-int4"]["warm_loop"]["instructions"]


CASES = {  # batch, query heads, KV heads, head dim, tokens, block, extra config
    "llama-gqa4-d128": (2, 16, 4, 128, 700, 64, {}),
    "smollm2-gqa3-d64": (2, 9, 3, 64, 700, 64, {}),
    "gqa8-d64-block32-unrotated": (1, 8, 1, 64, 500, 32, {"rotate": False}),
    "mha-d128-block128-no-sinks": (2, 2, 2, 128, 900, 128, {"sink_tokens": 0}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_kernel_matches_float64_reference(case, dtype, device):
    """decode_attention through the Gluon kernel (outputs and scratch poisoned) against the float64 reference over
    the same pages: rows with different windows, sinks and recent tokens in the hot tier, page mass."""
    batch, query_heads, kv_heads, head_dim, tokens, block, extra = CASES[case]
    layer = filled_layer(device, batch, query_heads, kv_heads, head_dim, tokens, dtype, seed=len(case),
                         block_size=block, key_group=32, recent_window=100, **extra)
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(batch, query_heads, head_dim, generator=generator).to(device, dtype)
    assert mma.reads(query, layer.paged())
    kv_start = torch.tensor([0, 70][:batch], dtype=torch.int32, device=device)
    kv_end = torch.tensor([tokens, tokens - 45][:batch], dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    workspace = DecodeWorkspace()
    for splits in (1, 3, None):  # one split, a few, and the launcher's rule
        decode_attention(query, layer.paged(), kv_start, kv_end, scale, with_mass=True, workspace=workspace,
                         splits=splits)
        for buffer in workspace.buffers.values():
            buffer.fill_(math.nan)
        out, mass = decode_attention(query, layer.paged(), kv_start, kv_end, scale, with_mass=True,
                                     workspace=workspace, splits=splits, out=torch.full_like(query, math.nan))
        queries = (query.double() * scale).view(batch, kv_heads, query_heads // kv_heads, 1, head_dim)
        expected, _, expected_mass = paged_attention_reference(queries, layer.paged(), kv_start, kv_end,
                                                               with_mass=True)
        expected = expected.view(batch, query_heads, head_dim)
        assert torch.isfinite(out).all() and torch.isfinite(mass).all()
        assert (out.double() - expected).norm() / expected.norm() < BF16_RELATIVE
        torch.testing.assert_close(mass.double(), expected_mass, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_long_split_of_flat_attention(device):
    """512 pages in one split, attention nearly uniform over zero-mean values: the output is small (about 1 /
    sqrt(32K)) next to what the MMAs see per token (s (64 + c) and the minimums), which must not build up in the
    accumulators over the split."""
    layer = filled_layer(device, 1, 4, 1, 128, 64, torch.bfloat16, seed=11, block_size=64, key_group=32)
    generator = torch.Generator(device=device).manual_seed(3)
    for _ in range(8):  # 32K more tokens, 4K at a time
        keys, values = torch.randn(2, 1, 1, 4096, 128, generator=generator, device=device, dtype=torch.bfloat16)
        layer.update(keys, values)
    tokens = layer.total_tokens
    query = torch.randn(1, 4, 128, generator=generator, device=device, dtype=torch.bfloat16) * 0.05
    kv_start, kv_end = (torch.tensor([first], dtype=torch.int32, device=device) for first in (0, tokens))
    out, _ = decode_attention(query, layer.paged(), kv_start, kv_end, 128**-0.5, splits=1,
                              out=torch.full_like(query, math.nan))
    expected = paged_attention_reference((query.double() / math.sqrt(128)).view(1, 1, 4, 1, 128), layer.paged(),
                                         kv_start, kv_end)[0].view(1, 4, 128)
    assert layer.paged().warm_pages >= 500 and expected.norm(dim=-1).max() < 0.1  # values: norms near 11
    assert (out.double() - expected).norm() / expected.norm() < BF16_RELATIVE


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_page_count_read_on_the_device(device):
    """The CUDA graph's launch (warm page count in a device tensor, a fixed grid of mostly empty splits) through the
    Gluon kernel, before and after a page is added."""
    layer = filled_layer(device, 2, 8, 2, 128, 300, torch.bfloat16, seed=5, block_size=32, key_group=32)
    query = torch.randn(2, 8, 128, device=device, dtype=torch.bfloat16)
    assert mma.reads(query, layer.paged())
    kv_start = torch.tensor([0, 9], dtype=torch.int32, device=device)
    workspace = DecodeWorkspace()
    for tokens in (300, 332):
        if tokens > 300:
            layer.update(torch.randn(2, 2, 32, 128, device=device, dtype=torch.bfloat16),
                         torch.randn(2, 2, 32, 128, device=device, dtype=torch.bfloat16))
        kv_end = torch.full((2,), tokens, dtype=torch.int32, device=device)
        queries = (query.double() / math.sqrt(128)).view(2, 2, 4, 1, 128)
        expected = paged_attention_reference(queries, layer.paged(), kv_start, kv_end)[0].view(2, 8, 128)
        out, _ = decode_attention(query, layer.paged(), kv_start, kv_end, 128**-0.5, workspace=workspace, splits=64,
                                  out=torch.full_like(query, math.nan), warm_count=layer.warm.row_count)
        assert (out.double() - expected).norm() / expected.norm() < BF16_RELATIVE


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
@torch.no_grad()
def test_generate_through_the_kernel_matches_the_torch_path(device):
    """Greedy generate() of a small random bf16 Llama with a padded row: the Gluon kernel's steps (graph-replayed)
    and the torch reference path give the same tokens and close logits."""
    import kvtier

    model = small_llama(device).to(torch.bfloat16)
    ids, mask = two_prompts(device, 300, padded=True)
    runs = {}
    for kernel in ("torch", "triton"):
        kvtier.attach(model, budget_gb=0.5, decode_kernel=kernel, recent_window=64, block_size=32, key_group=32)
        try:
            runs[kernel] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        finally:
            kvtier.detach(model)
    assert torch.equal(runs["torch"].sequences, runs["triton"].sequences)
    for expected, got in zip(runs["torch"].logits, runs["triton"].logits):
        assert (got.float() - expected.float()).norm() / expected.float().norm() < BF16_RELATIVE
