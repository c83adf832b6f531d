"""The Triton paged decode kernel against its torch reference (float64) and against dense attention.

Fresh random states go through a real TieredCache layer (sinks, INT4 or TurboQuant warm pages, recent buffer), so the
kernel reads pages written by the real writer. On the CPU the kernel runs in Triton's interpreter (small
shapes); on a GPU the same sweep runs compiled. Outputs and the kernel's scratch are poisoned with NaN
before each run, so anything the kernel fails to write shows up.
"""

import math

import pytest
import torch
from transformers import LlamaConfig

from kvtier import TierConfig, TieredCache
from kvtier.kernels import decode_attention as kernel_module
from kvtier.kernels.decode_attention import DecodeWorkspace, decode_attention, paged_attention_reference

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# the kernel runs on CPU tensors only through Triton's interpreter, which conftest turns on where there is no CUDA
INTERPRETED = pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA case runs the compiled kernel here")
DEVICES = [pytest.param("cpu", marks=INTERPRETED), pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])]
BF16_RELATIVE = 1e-2  # the kernel's dot products take float16/bfloat16 operands


def filled_layer(device, batch, query_heads, kv_heads, head_dim, tokens, dtype, seed, **config):
    model = LlamaConfig(num_hidden_layers=1, num_attention_heads=query_heads, num_key_value_heads=kv_heads,
                        head_dim=head_dim, hidden_size=query_heads * head_dim)
    settings = dict(budget_gb=0.5, sink_tokens=4, recent_window=32, block_size=16, key_group=16)
    cache = TieredCache(TierConfig(**{**settings, **config}), model)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, tokens, head_dim, generator=generator) * 2
    values = torch.randn(batch, kv_heads, tokens, head_dim, generator=generator)
    keys[:, :, :, :3] += 4  # outlier channels, as real keys have
    layer = cache.layers[0]
    for first in range(0, tokens, 37):  # chunked, so pages fill across chunk boundaries
        layer.update(keys[:, :, first:first + 37].to(device, dtype), values[:, :, first:first + 37].to(device, dtype))
    return layer


def dense_attention(query, layer, kv_start, kv_end, scale):
    """float64 softmax over every cached token in the model basis, read back independently of the kernel."""
    from test_layer import cached_tokens

    positions, keys, values = cached_tokens(layer)
    batch, query_heads, head_dim = query.shape
    group = query_heads // keys.shape[1]
    keys = keys.double().repeat_interleave(group, 1)
    values = values.double().repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhtd->bht", query.double() * scale, keys)
    allowed = (positions[None, :] >= kv_start[:, None].cpu()) & (positions[None, :] < kv_end[:, None].cpu())
    scores = scores.masked_fill(~allowed[:, None].to(scores.device), -torch.inf)
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values)


CASES = {  # batch, query heads, KV heads, head dim, tokens, block, key group, extra config
    "gqa4-d64-block16": (2, 8, 2, 64, 150, 16, 16, {}),
    "gqa8-d128-block32": (1, 8, 1, 128, 200, 32, 16, {}),
    "mha-d64-block64": (2, 2, 2, 64, 260, 64, 32, {}),
    "gqa4-d64-token-keys": (2, 8, 2, 64, 120, 16, 16, {"key_axis": "token"}),
    "gqa4-d64-unrotated": (2, 8, 2, 64, 120, 16, 16, {"rotate": False}),
    "gqa4-d64-no-sinks": (2, 8, 2, 64, 101, 32, 32, {"sink_tokens": 0}),
    "turboquant3-qjl-gqa4-d64": (2, 8, 2, 64, 150, 16, 16, {"warm_format": "turboquant", "turboquant_bits": 3}),
    "turboquant3-qjl-unbiased-gqa4-d64": (1, 8, 2, 64, 150, 16, 16, {"warm_format": "turboquant", "turboquant_bits": 3,
                                                                     "turboquant_qjl_estimator": "unbiased"}),
    "turboquant4-gqa8-d128-block32": (1, 8, 1, 128, 200, 32, 16, {"warm_format": "turboquant", "turboquant_bits": 4,
                                                                   "turboquant_qjl": False}),
    "turboquant2-qjl-uncentered-mha-d64": (2, 2, 2, 64, 260, 64, 32, {"warm_format": "turboquant",
                                                                      "turboquant_bits": 2,
                                                                      "turboquant_center_keys": False}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64_reference_and_dense(case, dtype, device):
    if dtype == torch.bfloat16 and case not in ("gqa4-d64-block16", "gqa8-d128-block32", "turboquant3-qjl-gqa4-d64"):
        pytest.skip("bfloat16 hot tiers: three shapes are enough")
    layer, query, kv_start, kv_end, scale, expected, mass = check_kernel_against_reference(case, dtype, device)
    dense = dense_attention(query, layer, kv_start, kv_end, scale)
    # the reference reads every tier right (the dense side un-rotates warm tokens in float32)
    torch.testing.assert_close(expected, dense, rtol=1e-5, atol=1e-5)
    hot_share = 1 - mass.sum(-1)  # what the sinks and the recent window got
    assert ((hot_share > -1e-3) & (hot_share < 1 + 1e-3)).all()


VARIANT_CASES = [  # (variant, case, dtype, warm tile): each kernel variant on a few cases of the sweep above
    ("fold", "mha-d64-block64", torch.bfloat16, 128),  # key groups of 32, one query head per KV head
    ("offset", "gqa4-d64-token-keys", torch.float32, 128),  # per-token keys and values take the offset
    ("offset", "gqa8-d128-block32", torch.bfloat16, 128),  # per-channel keys keep c, values take the offset
    ("fold+offset", "gqa8-d128-block32", torch.bfloat16, 128),  # the benchmark's head dim and group
    ("fold+offset", "gqa4-d64-no-sinks", torch.float32, 128),
    ("mass_dot", "turboquant2-qjl-uncentered-mha-d64", torch.float32, 128),
    ("fold+offset+mass_dot", "gqa4-d64-unrotated", torch.float32, 128),
    ("fold+offset+mass_dot", "gqa4-d64-block16", torch.float32, 256),  # 16 pages a tile: every indicator column
    ("fold+offset+lop3", "gqa8-d128-block32", torch.float32, 128),  # lop3: compiled CUDA only (skipped elsewhere)
    ("lop3", "gqa8-d128-block32", torch.bfloat16, 128),  # the PTX's 1024 + c, less 1024
    ("offset+lop3", "gqa8-d128-block32", torch.bfloat16, 128),  # the PTX's 1 + c/64 for values
    ("offset+lop3", "gqa4-d64-token-keys", torch.float32, 128),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant, case, dtype, warm_tile", VARIANT_CASES,
                         ids=[f"{v}-{c}-{str(d)[6:]}-tile{t}" for v, c, d, t in VARIANT_CASES])
def test_kernel_variant_matches_float64_reference(variant, case, dtype, warm_tile, device, monkeypatch):
    if "lop3" in variant and device == "cpu":
        pytest.skip("the interpreter unpacks without the lop3 PTX: the case would repeat its variant without lop3")
    monkeypatch.setattr(kernel_module, "VARIANT", kernel_module.variant_switches(variant))
    monkeypatch.setattr(kernel_module, "WARM_TILE", warm_tile)
    check_kernel_against_reference(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mass_tile", [2, 4])
def test_page_mass_spread_over_merge_programs(mass_tile, device, monkeypatch):
    """Each merge program turns MASS_TILE pages' log-sum-exps into mass; several of them, a ragged last one included
    (7 warm pages), must give the reference's mass."""
    monkeypatch.setattr(kernel_module, "MASS_TILE", mass_tile)
    layer, *_ = check_kernel_against_reference("gqa4-d64-block16", torch.float32, device)
    assert layer.paged().warm_pages > mass_tile and layer.paged().warm_pages % mass_tile


def check_kernel_against_reference(case, dtype, device):
    """Run the kernel (outputs and scratch poisoned) on a filled layer of ``case`` and compare its output and page mass
    with the float64 reference; returns the layer, query, kv_start, kv_end, scale, the reference's output and the
    kernel's mass."""
    batch, query_heads, kv_heads, head_dim, tokens, block, key_group, extra = CASES[case]
    layer = filled_layer(device, batch, query_heads, kv_heads, head_dim, tokens, dtype, seed=len(case),
                         block_size=block, key_group=key_group, **extra)
    assert layer.warm.table, "the case must put tokens in warm pages"
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(batch, query_heads, head_dim, generator=generator).to(device, dtype)
    # ragged rows: the second sequence starts later (left padding) and ends earlier
    kv_start = torch.tensor([0, 9][:batch], dtype=torch.int32, device=device)
    kv_end = torch.tensor([tokens, tokens - 5][:batch], dtype=torch.int32, device=device)
    scale = head_dim**-0.5

    workspace = DecodeWorkspace()
    decode_attention(query, layer.paged(), kv_start, kv_end, scale, with_mass=True, workspace=workspace)
    for buffer in workspace.buffers.values():
        buffer.fill_(math.nan)
    out = torch.full_like(query, math.nan)
    out, mass = decode_attention(query, layer.paged(), kv_start, kv_end, scale, with_mass=True, workspace=workspace,
                                 out=out)

    queries = (query.double() * scale).view(batch, kv_heads, query_heads // kv_heads, 1, head_dim)
    expected, _, expected_mass = paged_attention_reference(queries, layer.paged(), kv_start, kv_end, with_mass=True)
    expected = expected.view(batch, query_heads, head_dim)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    relative = (out.double() - expected).norm() / expected.norm()
    assert relative < BF16_RELATIVE, relative.item()
    torch.testing.assert_close(mass.double(), expected_mass, atol=2e-3, rtol=2e-2)
    return layer, query, kv_start, kv_end, scale, expected, mass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low_key_bits", [None, 3])
def test_kernel_reads_the_precision_rules_low_pages(low_key_bits, device):
    """The precision rule's TurboQuant pages (2-bit values; keys at 2 bits, or at 3 with their levels after the value
    levels in the kernel's codebook) through the kernel, against the float64 reference over the same pages."""
    rule = dict(low_bits=2, low_key_bits=low_key_bits, low_share=0.5, on_budget_full="evict", block_size=16)
    probe = filled_layer(device, 2, 8, 2, 64, 40, torch.float32, seed=0, **rule)
    fixed = probe.cache.hot_bytes + probe.cache.scratch_bytes + probe.cache.staging_bytes
    budget_gb = (fixed + 8 * probe.warm.page_bytes + probe.warm.table_bytes) / 1024**3  # 8 INT4 pages' bytes
    layer = filled_layer(device, 2, 8, 2, 64, 300, torch.float32, seed=1, budget_gb=budget_gb, **rule)
    low = layer.low_pages()
    assert low is not None and low.layout.format.bits_of_keys == (low_key_bits or 2) and low.layout.format.bits == 2
    paged = layer.paged(low, with_hot=False)
    query = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2)).to(device)
    kv_start = torch.tensor([0, 9], dtype=torch.int32, device=device)
    kv_end = torch.full_like(kv_start, 300)
    out, mass = decode_attention(query, paged, kv_start, kv_end, 0.125, with_mass=True)
    queries = (query.double() * 0.125).view(2, 2, 4, 1, 64)
    expected, _, expected_mass = paged_attention_reference(queries, paged, kv_start, kv_end, with_mass=True)
    assert (out.double() - expected.view(2, 8, 64)).norm() / expected.norm() < BF16_RELATIVE
    torch.testing.assert_close(mass.double(), expected_mass, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge_elements", [4096, 64])
def test_fully_masked_split_and_single_split(merge_elements, device, monkeypatch):
    """A row whose window misses whole splits, and a forced single split, still give the reference's answer; with
    MERGE_ELEMENTS 64 the merge takes the splits two at a time (2 rows x 16 channels; a ragged last pair at 3 and 7
    splits)."""
    monkeypatch.setattr(kernel_module, "MERGE_ELEMENTS", merge_elements)
    layer = filled_layer(device, 2, 4, 2, 64, 180, torch.float32, seed=3)
    query = torch.randn(2, 4, 64, device=device)
    kv_start = torch.tensor([0, 150], dtype=torch.int32, device=device)  # row 1 sees only recent tokens
    kv_end = torch.tensor([180, 180], dtype=torch.int32, device=device)
    queries = (query.double() / 8).view(2, 2, 2, 1, 64)
    expected = paged_attention_reference(queries, layer.paged(), kv_start, kv_end)[0].view(2, 4, 64)
    for splits in (1, 3, 7):
        out, _ = decode_attention(query, layer.paged(), kv_start, kv_end, 1 / 8, splits=splits)
        assert (out.double() - expected).norm() / expected.norm() < BF16_RELATIVE


@pytest.mark.parametrize("batch, kv_heads, multiprocessors, expected", [
    (1, 8, 132, 32), (2, 8, 132, 16), (4, 8, 132, 8), (8, 8, 132, 4), (32, 8, 132, 1),  # H100/H200: 264 programs
    (1, 2, 132, 64), (1, 8, 108, 16), (3, 8, 132, 8)])  # capped at MAX_SPLITS; A100's 108; 264 // 24 = 11 -> 8
def test_splits_fill_about_two_programs_per_multiprocessor(batch, kv_heads, multiprocessors, expected, monkeypatch):
    """On CUDA the split count per (sequence, KV head) is the largest power of two at most SPLIT_PROGRAMS_PER_
    MULTIPROCESSOR x multiprocessors / (batch x KV heads), within 1..MAX_SPLITS; SPLITS_PER_HEAD overrides it, and
    the CPU keeps two."""
    monkeypatch.setattr(kernel_module, "_multiprocessors", lambda index: multiprocessors)
    assert kernel_module.max_splits(batch, kv_heads, "cuda") == expected
    assert kernel_module.max_splits(batch, kv_heads, "cpu") == 2
    monkeypatch.setattr(kernel_module, "SPLITS_PER_HEAD", 5)
    assert kernel_module.max_splits(batch, kv_heads, "cuda") == 5


@pytest.mark.parametrize("batch, kv_heads, multiprocessors, expected", [
    (1, 8, 132, 132), (2, 8, 132, 66), (8, 8, 132, 16), (64, 8, 132, 2), (512, 8, 132, 1),  # H200: 1,056 programs
    (1, 2, 132, 256), (1, 8, 108, 108)])  # capped at the Gluon kernel's MAX_SPLITS; A100's 108
def test_gluon_splits_fill_its_programs_per_multiprocessor(batch, kv_heads, multiprocessors, expected, monkeypatch):
    """The Gluon INT4 kernel's split count: its PROGRAMS_PER_MULTIPROCESSOR (8) one-warp programs per multiprocessor
    divided among (sequence, KV head) pairs, not rounded to a power of two, within 1..its MAX_SPLITS (256)."""
    monkeypatch.setattr(kernel_module, "_multiprocessors", lambda index: multiprocessors)
    assert kernel_module.max_splits(batch, kv_heads, "cuda", one_warp=True) == expected
    assert kernel_module.max_splits(batch, kv_heads, "cpu", one_warp=True) == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows_per_kv_head", [100, 128])
def test_many_query_rows_per_kv_head(rows_per_kv_head, device):
    """A prefill tile's rows (a KV head's query heads x positions; more than one program's QUERY_ROWS_PER_PROGRAM,
    ragged or not): outputs and log-sum-exp as the float64 reference's, and no per-page mass, which would need a
    head's rows in one program."""
    layer = filled_layer(device, 2, 4, 2, 64, 180, torch.float32, seed=4)
    query_heads = 2 * rows_per_kv_head
    query = torch.randn(2, query_heads, 64, generator=torch.Generator().manual_seed(5)).to(device)
    kv_start = torch.tensor([0, 21], dtype=torch.int32, device=device)
    kv_end = torch.full_like(kv_start, 180)
    lse = torch.full((2, query_heads), math.nan, device=device)
    out, _ = decode_attention(query, layer.paged(), kv_start, kv_end, 0.125, lse=lse)
    queries = (query.double() * 0.125).view(2, 2, rows_per_kv_head, 1, 64)
    expected, expected_lse, _ = paged_attention_reference(queries, layer.paged(), kv_start, kv_end)
    assert (out.double() - expected.view(2, query_heads, 64)).norm() / expected.norm() < BF16_RELATIVE
    # the kernel's scores come from float16 query x code dots: their log-sum-exp is good to about 1e-3
    torch.testing.assert_close(lse.double(), expected_lse.view(2, query_heads), atol=5e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="per-page mass"):
        decode_attention(query, layer.paged(), kv_start, kv_end, 0.125, with_mass=True)


def small_llama(device):
    """A 2-layer random-weight Llama (8 query heads, 2 KV heads, head dim 64) for generate() through kvtier."""
    from transformers import LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                         hidden_size=256, intermediate_size=512, vocab_size=500)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device).eval()


def two_prompts(device, tokens: int, padded: bool):
    """(2, tokens) random ids and their attention mask; ``padded``: the second row left-padded by 13 tokens."""
    ids = torch.randint(1, 500, (2, tokens), device=device)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :13] = 0
    return ids, mask


def assert_same_generation(reference, kernel):
    """The same greedy tokens, and every step's logits within the kernel's float16 operands' tolerance."""
    assert torch.equal(reference.sequences, kernel.sequences)
    for expected, got in zip(reference.logits, kernel.logits):
        assert (got - expected).norm() / expected.norm() < BF16_RELATIVE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("warm_format", ["int4", "turboquant"])
@torch.no_grad()
def test_generate_through_kernel_matches_torch_path(warm_format, device):
    """Greedy generate() of a small random Llama with padding: the kernel path and the reference path agree."""
    import kvtier

    model = small_llama(device)
    ids, mask = two_prompts(device, 90, padded=True)
    runs = {}
    for kernel in ("torch", "triton"):
        handle = kvtier.attach(model, budget_gb=0.5, decode_kernel=kernel, recent_window=32, block_size=16,
                               key_group=16, warm_format=warm_format)
        try:
            result = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                    output_logits=True, return_dict_in_generate=True)
        finally:
            kvtier.detach(model)
        graph = handle.stats()["graph"]  # on CUDA, the kernel's decode steps replay a CUDA graph
        replayed = graph is not None and graph["replays"] == 5
        assert handle.cache.decode_ranges is not None or replayed  # the padded decode steps took the paged decode path
        assert handle.stats()["warm"]["pages"] > 0
        runs[kernel] = result
    assert_same_generation(runs["torch"], runs["triton"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_chunked_prefill_attends_the_past_through_the_kernel(padded, device, monkeypatch):
    """Prefill chunks after the first attend the past pages through the decode kernel, a KV head's query heads x
    positions as the query rows of one launch (every row sees the same past, from each sequence's first unpadded token):
    the same tokens and logits as the torch path, which launches nothing."""
    import kvtier

    model = small_llama(device)
    ids, mask = two_prompts(device, 150, padded)
    launched_rows = []
    launch = kernel_module.decode_attention

    def counted(query, *args, **kwargs):
        launched_rows.append(query.shape[1])
        return launch(query, *args, **kwargs)

    monkeypatch.setattr(kernel_module, "decode_attention", counted)
    runs = {}
    for kernel in ("torch", "triton"):
        launched_rows.clear()
        kvtier.attach(model, budget_gb=0.5, decode_kernel=kernel, recent_window=32, block_size=16, key_group=16,
                      cuda_graph="off")
        try:
            runs[kernel] = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                          prefill_chunk_size=48, output_logits=True, return_dict_in_generate=True)
        finally:
            kvtier.detach(model)
        prefill_rows = [rows for rows in launched_rows if rows > 8]  # decode launches take the 8 query heads
        # chunks of 48, 48, 48 and 6 tokens; after the first, one launch per chunk and layer: 8 query heads x 48
        # positions (192 rows per KV head: three programs of 64), then 8 x 6
        assert prefill_rows == ([] if kernel == "torch" else [8 * 48] * (2 * 2) + [8 * 6] * 2)
    assert_same_generation(runs["torch"], runs["triton"])


@torch.no_grad()
def test_forcing_the_kernel_on_pages_it_cannot_read_says_why():
    import kvtier
    from kvtier.errors import KVTierError
    from transformers import LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         hidden_size=64, intermediate_size=128, vocab_size=100)
    model = LlamaForCausalLM(config).eval()
    kvtier.attach(model, budget_gb=0.1, decode_kernel="triton", block_size=8, key_group=8, recent_window=8)
    try:
        with pytest.raises(KVTierError, match=r"power-of-two block_size.*key groups of at least 16"):
            model.generate(torch.randint(0, 100, (1, 30)), max_new_tokens=2, do_sample=False)
    finally:
        kvtier.detach(model)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 8, 32])
def test_page_count_read_on_the_device(splits, device):
    """With the warm page count in a device tensor (what a CUDA graph replays) and a fixed grid of splits, many of
    them empty, the kernel gives the reference's answer, and reads pages stored after the launch was set up."""
    layer = filled_layer(device, 2, 8, 2, 64, 150, torch.float32, seed=5)
    query = torch.randn(2, 8, 64, device=device)
    kv_start = torch.tensor([0, 9], dtype=torch.int32, device=device)
    queries = (query.double() / 8).view(2, 2, 4, 1, 64)
    workspace = DecodeWorkspace()
    generator = torch.Generator().manual_seed(9)
    pages = []
    for tokens in (150, 150 + 16):  # the second call: one more warm page, the same launch arguments otherwise
        if tokens > 150:
            layer.update(torch.randn(2, 2, 16, 64, generator=generator).to(device),
                         torch.randn(2, 2, 16, 64, generator=generator).to(device))
        pages.append(len(layer.warm.table))
        kv_end = torch.full((2,), tokens, dtype=torch.int32, device=device)
        expected = paged_attention_reference(queries, layer.paged(), kv_start, kv_end)[0].view(2, 8, 64)
        decode_attention(query, layer.paged(), kv_start, kv_end, 1 / 8, workspace=workspace, splits=splits,
                         warm_count=layer.warm.row_count)
        for buffer in workspace.buffers.values():
            buffer.fill_(math.nan)
        out, _ = decode_attention(query, layer.paged(), kv_start, kv_end, 1 / 8, workspace=workspace, splits=splits,
                                  out=torch.full_like(query, math.nan), warm_count=layer.warm.row_count)
        assert int(layer.warm.row_count) == len(layer.warm.table)
        assert torch.isfinite(out).all()
        assert (out.double() - expected).norm() / expected.norm() < BF16_RELATIVE
    assert pages[1] == pages[0] + 1
