import pytest
import torch

from kvtier.rotation import fast_hadamard, hadamard_matrix, random_rotation, random_signs, rotate


@pytest.mark.parametrize("dim", [2, 8, 64, 128, 256])
def test_rotation_is_orthonormal(dim):
    rotation = random_rotation(dim, seed=dim).double()
    assert torch.allclose(rotation @ rotation.T, torch.eye(dim, dtype=torch.float64), atol=1e-6)


def test_rotation_preserves_dot_products():
    rotation = random_rotation(64, seed=1)
    q, k = torch.randn(5, 64), torch.randn(7, 64)
    assert torch.allclose((q @ rotation) @ (k @ rotation).T, q @ k.T, atol=1e-4)


def test_seeds_give_different_rotations():
    assert not torch.equal(random_rotation(64, 0), random_rotation(64, 1))


@pytest.mark.parametrize("dim", [0, 3, 96])
def test_non_power_of_two_is_refused_with_advice(dim):
    with pytest.raises(ValueError, match="rotate=False"):
        hadamard_matrix(dim)


@pytest.mark.parametrize("dim", [2, 8, 64, 128])
def test_fast_hadamard_rotation_equals_the_matrix_product(dim):
    """The fast transform, rotate's product and random_rotation's matrix are one rotation (float64)."""
    x = torch.randn(3, 5, dim, dtype=torch.float64)
    signs = random_signs(dim, seed=dim).double()
    expected = x @ random_rotation(dim, seed=dim).double()
    assert torch.allclose(rotate(x, signs), expected, atol=1e-6, rtol=0)  # R is built in float32
    assert torch.allclose(fast_hadamard(x * signs) / dim**0.5, expected, atol=1e-6, rtol=0)
