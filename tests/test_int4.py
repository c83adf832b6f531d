import pytest
import torch

from kvtier import int4


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 1, 32, 128), (3, 2, 16, 8)])
def test_pack_unpack_round_trip(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = int4.pack_nibbles(codes)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack_nibbles(packed), codes)


@pytest.mark.parametrize("axis", ["keys", "values"])
@pytest.mark.parametrize("seed", range(3))
def test_quantization_error_within_half_a_step(axis, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64) * 3 + 1
    x[..., 5] *= 20  # an outlier channel
    quantize = int4.quantize_keys if axis == "keys" else int4.quantize_values
    codes, scale, minimum = quantize(x.float())
    restored = int4.dequantize(codes, scale, minimum).double()
    step = scale.double().expand_as(x)
    # half a step of rounding, plus the float16 rounding of the minimum and of scale * 15
    bound = step / 2 + minimum.double().abs().expand_as(x) * 2**-10 + 15 * step * 2**-10 + 1e-6
    assert ((restored - x).abs() <= bound).all()


def test_key_ranges_leave_padding_out():
    keys = torch.randn(1, 1, 8, 4)
    keys[0, 0, :2] = 1000.0  # two padding tokens with absurd values
    valid = torch.tensor([[[False, False, True, True, True, True, True, True]]])
    codes, scale, minimum = int4.quantize_keys(keys, valid)
    restored = int4.dequantize(codes, scale, minimum)
    assert scale.float().max() < 1.0  # the range is that of the real tokens
    assert torch.allclose(restored[0, 0, 2:], keys[0, 0, 2:], atol=scale.float().max().item())


@pytest.mark.parametrize("head_dim,block", [(64, 64), (128, 64), (128, 128)])
def test_int4_page_bytes_per_token_under_three_tenths_of_bf16(head_dim, block):
    from kvtier.pages import WarmPages

    pages = WarmPages(batch=1, kv_heads=1, head_dim=head_dim, block_size=block, device="cpu", pages_per_slab=1,
                      budget=None)
    bytes_per_token = pages.page_bytes / block
    bf16_bytes_per_token = 2 * head_dim * 2  # keys and values, 2 bytes each
    assert bytes_per_token <= 0.3 * bf16_bytes_per_token, (bytes_per_token, bf16_bytes_per_token)
