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
    if axis == "keys":
        codes, scale_codes, base, minimum = int4.quantize_keys(x.float())
        scale = int4.decode_key_scales(scale_codes, base)
    else:
        codes, scale, minimum = int4.quantize_values(x.float())
    restored = int4.dequantize(codes, scale, minimum).double()
    step = scale.double().expand_as(x)
    # half a step of rounding, plus the float16 rounding of the minimum and of scale * 15
    bound = step / 2 + minimum.double().abs().expand_as(x) * 2**-10 + 15 * step * 2**-10 + 1e-6
    assert ((restored - x).abs() <= bound).all()


@pytest.mark.parametrize("seed", range(3))
def test_key_scale_codes_are_nearest_on_their_grid(seed):
    """Decoded key scale codes are within 1/64 of the scale for channels within 8 octaves of the group's widest
    (nearer than either neighbouring code), and the base for a narrower channel; the base is a power of two, and
    decoding equals base * 2^e * (1 + m / 32) for code 32 e + m, in float64."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(4, 6, 128, generator=generator, dtype=torch.float64) * 2.0).float()
    scales[0, 0, 3] = 1e-7  # far below the group's widest
    codes, base = int4.encode_key_scales(scales)
    decoded = int4.decode_key_scales(codes, base).double()

    def value(code):
        return base.double() * torch.exp2((code // 32).double()) * (1 + (code % 32).double() / 32)

    assert torch.equal(decoded, value(codes.long()))
    assert torch.equal(torch.frexp(base.double())[0], torch.full_like(base.double(), 0.5))  # powers of two
    in_range = scales.double() >= base.double()
    error = (decoded - scales.double()).abs()
    assert (error[in_range] <= scales.double()[in_range] / 64).all()
    for neighbour in (codes.long() - 1, codes.long() + 1):  # no other code is nearer
        assert (error[in_range] <= (value(neighbour) - scales.double()).abs()[in_range] + 1e-12).all()
    assert torch.equal(decoded[~in_range], base.double().expand_as(decoded)[~in_range])
    assert (codes.amax(-1) >= 223).all()  # the widest channel within an octave of code 255 (ratio above 126)


def test_key_ranges_leave_padding_out():
    keys = torch.randn(1, 1, 8, 4)
    keys[0, 0, :2] = 1000.0  # two padding tokens with absurd values
    valid = torch.tensor([[[False, False, True, True, True, True, True, True]]])
    codes, scale_codes, base, minimum = int4.quantize_keys(keys, valid)
    scale = int4.decode_key_scales(scale_codes, base)
    restored = int4.dequantize(codes, scale, minimum)
    assert scale.float().max() < 1.0  # the range is that of the real tokens
    assert torch.allclose(restored[0, 0, 2:], keys[0, 0, 2:], atol=scale.float().max().item())
