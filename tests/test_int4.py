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
