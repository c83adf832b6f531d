"""TurboQuant's pieces against their definitions: Lloyd-Max optimality, unbiased QJL dot products, round trips."""

import math

import pytest
import torch

from kvtier.formats.lloyd_max import boundaries, codebook, coordinate_density, distortion
from kvtier.formats.turboquant import TurboQuantFormat, pack_planes, qjl_sketch, unpack_planes
from kvtier.rotation import random_signs, rotate

# D * E[(x - level(x))^2] per bit width for large D, as the TurboQuant paper reports (0.36, 0.117, 0.03, 0.009)
PAPER_UNIT_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


def conditional_mean(dim: int, low: float, high: float, points: int = 200_001) -> float:
    """E[x | low < x < high] for one coordinate of a random unit vector, by the trapezoid rule."""
    x = torch.linspace(low, high, points, dtype=torch.float64)
    density = coordinate_density(dim, x)
    return float(torch.trapezoid(x * density, x) / torch.trapezoid(density, x))


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_every_level_is_the_mean_of_its_cell(dim, bits):
    levels = codebook(bits, dim)
    edges = [-1.0, *boundaries(levels).tolist(), 1.0]
    for index, level in enumerate(levels.tolist()):
        assert level == pytest.approx(conditional_mean(dim, edges[index], edges[index + 1]), abs=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_moving_any_level_raises_the_distortion(bits):
    dim = 64
    levels = codebook(bits, dim)
    best = distortion(levels, dim)
    step = 0.02 / math.sqrt(dim)
    for index in range(len(levels)):
        for sign in (-1, 1):
            moved = levels.clone()
            moved[index] += sign * step
            assert distortion(moved.sort().values, dim) > best


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_matches_the_paper_and_its_bound(bits):
    unit_mse = 128 * distortion(codebook(bits, 128), 128)
    assert unit_mse == pytest.approx(PAPER_UNIT_MSE[bits], rel=0.15)  # the paper gives one or two digits
    assert unit_mse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits  # the paper's upper bound


def test_one_bit_levels_are_plus_minus_the_mean_absolute_coordinate():
    dim = 64  # E|x| = Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2))
    expected = math.exp(math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim + 1) / 2))
    assert torch.allclose(codebook(1, dim), torch.tensor([-expected, expected], dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bit_planes_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64))
    planes = pack_planes(codes, bits)
    assert planes.shape == (3, 5, bits, 8) and planes.dtype == torch.uint8
    assert torch.equal(unpack_planes(planes), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_round_trip_error_of_rotated_vectors_is_the_codebook_distortion(bits):
    dim, count = 64, 4096
    vectors = torch.randn(count, dim) * torch.rand(count, 1) * 10  # all directions, norms up to 10
    rotated = rotate(vectors, random_signs(dim, seed=1))
    quantizer = TurboQuantFormat(bits, qjl=False)
    page = quantizer.quantize(rotated, rotated, None, None)
    _, restored = quantizer.dequantize(page, torch.float64)
    relative = ((restored - rotated.double()).square().sum(-1) / rotated.double().square().sum(-1)).mean()
    expected = dim * distortion(codebook(bits, dim), dim)
    assert float(relative) == pytest.approx(expected, rel=0.1)
    assert torch.allclose(page["value_norm"].double(), rotated.double().norm(dim=-1, keepdim=True), rtol=1e-3)


def estimated_dot_products(bits: int, qjl: bool, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One key and one query close to it; every draw a fresh rotation and sketch. Returns the estimates of
    q . k (draws,) and the exact value, in float64."""
    dim = 64
    generator = torch.Generator().manual_seed(seed)
    key = torch.randn(dim, generator=generator, dtype=torch.float64)
    query = key + 0.5 * torch.randn(dim, generator=generator, dtype=torch.float64)
    quantizer = TurboQuantFormat(bits, qjl, 0, "unbiased")
    estimates = []
    for draw in range(draws):
        signs = random_signs(dim, seed=seed * 100_003 + draw).double()
        sketch = qjl_sketch(dim, seed=seed * 100_003 + draw) if qjl else None
        rotated_key, rotated_query = rotate(key, signs), rotate(query, signs)
        page = quantizer.quantize(rotated_key[None].float(), rotated_key[None].float(), None, sketch)
        restored, _ = quantizer.dequantize(page, torch.float64, sketch)
        estimates.append(restored[0] @ rotated_query)
    return torch.stack(estimates), query @ key


@pytest.mark.parametrize("bits", [2, 3])
def test_qjl_dot_products_are_unbiased_and_the_mean_error_shrinks_with_draws(bits):
    errors = {}
    for draws in (200, 3200):
        estimates, exact = estimated_dot_products(bits, qjl=True, draws=draws, seed=bits)
        standard_error = estimates.std() / math.sqrt(draws)
        errors[draws] = abs(float(estimates.mean() - exact))
        assert errors[draws] <= 4 * standard_error, (draws, errors[draws], float(standard_error))
    assert errors[3200] <= 0.01 * abs(float(exact))  # within 1% of q . k on average over 3200 draws


@pytest.mark.parametrize("bits", [2, 3])
def test_codebook_only_dot_products_shrink_toward_zero(bits):
    """Without the QJL bit the estimate is biased low by about the codebook's distortion, which is what the
    sketch removes: the unbiasedness test above is not passing by accident."""
    estimates, exact = estimated_dot_products(bits, qjl=False, draws=400, seed=bits)
    shrink = float(estimates.mean() / exact)
    assert 1 - 2 * PAPER_UNIT_MSE[bits] < shrink < 1 - 0.5 * PAPER_UNIT_MSE[bits]
    assert abs(float(estimates.mean() - exact)) > 4 * float(estimates.std()) / math.sqrt(400)


def filled_turboquant_cache(bits: int, qjl: bool, center: bool, seed: int = 0):
    """One-layer TieredCache (2 KV heads, D = 64) with TurboQuant warm pages, filled with random keys that share
    a large common offset, as real keys do. Returns the cache, keys and values (1, 2, T, 64)."""
    from transformers import LlamaConfig

    from kvtier import TierConfig, TieredCache

    model = LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        hidden_size=256)
    config = TierConfig(budget_gb=0.1, sink_tokens=4, recent_window=32, block_size=64, key_group=32,
                        warm_format="turboquant", turboquant_bits=bits, turboquant_qjl=qjl,
                        turboquant_center_keys=center)
    cache = TieredCache(config, model)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, 420, 64, generator=generator) + 6 * torch.randn(1, 2, 1, 64, generator=generator)
    values = torch.randn(1, 2, 420, 64, generator=generator)
    cache.layers[0].update(keys, values)
    return cache, keys, values


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layer_round_trip_error_is_the_codebook_distortion_of_the_centered_keys(bits):
    """Through a real layer (rotation by the fast transform, key means, bit planes, slabs): every warm key's
    squared error relative to its distance from its group mean is the unit codebook distortion on average."""
    from test_layer import cached_tokens

    cache, keys, values = filled_turboquant_cache(bits, qjl=False, center=True)
    layer = cache.layers[0]
    positions, got_keys, got_values = cached_tokens(layer)
    assert torch.equal(positions, torch.arange(keys.shape[2]))
    warm = torch.cat([torch.arange(entry.start, entry.start + 64) for entry in layer.warm.table])
    grouped = keys[:, :, warm].unflatten(2, (-1, 32))  # (1, 2, groups, 32, 64); pages hold whole groups
    centered = (grouped - grouped.mean(3, keepdim=True)).flatten(2, 3)
    key_error = (got_keys[:, :, warm] - keys[:, :, warm]).square().sum(-1) / centered.square().sum(-1)
    value_error = (got_values[:, :, warm] - values[:, :, warm]).square().sum(-1) / values[:, :, warm].square().sum(-1)
    expected = 64 * distortion(codebook(bits, 64), 64)
    assert float(key_error.mean()) == pytest.approx(expected, rel=0.15)
    assert float(value_error.mean()) == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize("bits, qjl, center", [(3, True, True), (3, False, False), (4, True, False), (2, False, True)])
def test_bytes_per_token_are_exactly_the_packed_fields(bits, qjl, center):
    cache, _, _ = filled_turboquant_cache(bits, qjl, center)
    dim, key_group = 64, 32
    per_head = (2 * bits * dim / 8 + 2 * 2  # key and value codes, key and value norms (float16)
                + (dim / 8 + 2 if qjl else 0)  # sign bits and the residual norm
                + (2 * dim / key_group if center else 0))  # a float16 key mean per key group
    stats = cache.stats()
    assert stats["warm"]["pages"] > 0
    assert stats["warm"]["bytes_per_token"] == 2 * per_head  # one layer, two KV heads, batch 1
    assert stats["warm"]["format"].startswith(f"turboquant-{bits}bit")


def sketch_term_errors(dim: int, draws: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """For fresh sketches S and residuals r: |u - r|^2 / |r|^2 and (r . u) / |r|^2 of the unbiased sketch term
    u = sqrt(pi / 2) / D |r| S^T sign(S r), each (draws,) float64, computed from the definition."""
    generator = torch.Generator().manual_seed(seed)
    sketches = torch.randn(draws, dim, dim, generator=generator, dtype=torch.float64)  # (N, D, D)
    residuals = torch.randn(draws, dim, generator=generator, dtype=torch.float64) * torch.rand(draws, 1) * 3
    signs = torch.sign(torch.einsum("nij,nj->ni", sketches, residuals))  # (N, D)
    norms = residuals.norm(dim=-1, keepdim=True)
    sketched = math.sqrt(math.pi / 2) / dim * norms * torch.einsum("nij,ni->nj", sketches, signs)  # (N, D)
    squared = norms.squeeze(-1).square()
    return (sketched - residuals).square().sum(-1) / squared, (sketched * residuals).sum(-1) / squared


def test_min_mse_qjl_scale_minimizes_the_keys_squared_error():
    """The min-MSE scale lambda = 1 / (pi/2 + (D-1)/D) against a Monte Carlo over sketches: the unbiased term's
    error is (pi/2 - 1/D) |r|^2, lambda u leaves (1 - lambda) |r|^2, and lambda scaled up or down by 20% leaves
    more."""
    dim, draws = 64, 4000
    unbiased_error, alignment = sketch_term_errors(dim, draws)
    mean_square = float((unbiased_error + 2 * alignment - 1).mean())  # E|u|^2 / |r|^2
    unbiased_scale = TurboQuantFormat(3, True, 0, "unbiased").qjl_scale(dim)
    shrink = TurboQuantFormat(3, True, 0, "min_mse").qjl_scale(dim) / unbiased_scale
    assert shrink == pytest.approx(1 / (math.pi / 2 + (dim - 1) / dim))
    assert float(unbiased_error.mean()) == pytest.approx(math.pi / 2 - 1 / dim, rel=0.03)
    assert float(alignment.mean()) == pytest.approx(1.0, rel=0.03)  # E[r . u] = |r|^2: unbiased
    errors = {factor: 1 - 2 * factor * shrink * float(alignment.mean()) + (factor * shrink) ** 2 * mean_square
              for factor in (0.8, 1.0, 1.2)}  # E|r - lambda u|^2 / |r|^2 at lambda = factor * shrink
    assert errors[1.0] == pytest.approx(1 - shrink, rel=0.03)
    assert errors[1.0] < min(errors[0.8], errors[1.2]) and errors[1.0] < 1 < float(unbiased_error.mean())


@pytest.mark.parametrize("bits", [2, 3])
def test_min_mse_qjl_keys_are_closer_than_unbiased_or_codebook_only_keys(bits):
    """Through the format's quantize and dequantize on rotated random keys: squared key error relative to the
    codebook-only error D * distortion: about 1 - lambda with the min-MSE scale, pi/2 - 1/D unbiased."""
    dim, count = 64, 4096
    keys = rotate(torch.randn(count, dim) * torch.rand(count, 1) * 10, random_signs(dim, seed=3))
    sketch = qjl_sketch(dim, seed=4)
    relative = {}
    for estimator in ("unbiased", "min_mse"):
        quantizer = TurboQuantFormat(bits, True, 0, estimator)
        restored, _ = quantizer.dequantize(quantizer.quantize(keys, keys, None, sketch), torch.float64, sketch)
        error = (restored - keys.double()).square().sum(-1) / keys.double().square().sum(-1)
        relative[estimator] = float(error.mean()) / (dim * distortion(codebook(bits, dim), dim))
    shrink = 1 / (math.pi / 2 + (dim - 1) / dim)
    assert relative["min_mse"] == pytest.approx(1 - shrink, rel=0.1)
    assert relative["unbiased"] == pytest.approx(math.pi / 2 - 1 / dim, rel=0.1)


def test_min_mse_estimator_is_labelled_and_checked():
    from kvtier import TierConfig
    from kvtier.formats import make_format

    assert make_format(TierConfig(warm_format="turboquant")).label == "turboquant-3bit+qjl(min-mse)+mean/32"
    assert make_format(TierConfig(warm_format="turboquant", turboquant_qjl_estimator="unbiased")).label == \
        "turboquant-3bit+qjl+mean/32"
    with pytest.raises(ValueError, match=r"unknown turboquant_qjl_estimator 'biased'; choose one of"):
        TierConfig(turboquant_qjl_estimator="biased")


def test_keys_at_their_own_bits_decode_as_that_width_and_values_as_theirs():
    """key_bits apart from bits (the precision rule's low_key_bits): keys come back exactly as the key_bits format
    gives them, values exactly as the bits format does."""
    generator = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 64, 64, generator=generator), torch.randn(1, 2, 64, 64, generator=generator)
    mixed = TurboQuantFormat(2, False, 32, key_bits=3)
    got_keys, got_values = mixed.dequantize(mixed.quantize(keys, values))
    three, two = (TurboQuantFormat(bits, False, 32) for bits in (3, 2))
    assert torch.equal(got_keys, three.dequantize(three.quantize(keys, values))[0])
    assert torch.equal(got_values, two.dequantize(two.quantize(keys, values))[1])
    assert mixed.label == "turboquant-k3v2bit+mean/32"
    assert mixed.fields(1, 2, 64, 64)["key_planes"][0] == (1, 2, 64, 3, 8)
