import numpy as np
import pytest

from privtune.common.ult import DctImageCodec, SymbolMapper, UltConfig, build_symbol_table

from .conftest import KEY


def dct_matrix(p: int) -> np.ndarray:
    """Orthonormal DCT-II matrix written out from its definition (independent of scipy)."""
    k, n = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    m = np.sqrt(2.0 / p) * np.cos(np.pi * (2 * n + 1) * k / (2 * p))
    m[0] /= np.sqrt(2.0)
    return m


def test_coefficients_match_the_definition():
    codec = DctImageCodec(patch_size=8, keep=3)
    image = np.random.default_rng(0).uniform(0, 255, (16, 24))
    d = dct_matrix(8)
    coeffs = codec.coefficients(image)
    assert coeffs.shape == (1, 2, 3, 3, 3)
    for r in range(2):
        for c in range(3):
            block = image[8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
            assert np.allclose(coeffs[0, r, c], (d @ block @ d.T)[:3, :3])


@pytest.mark.parametrize("patch_size,keep,decimals", [(8, 3, 1), (4, 2, 0), (8, 8, 2)])
def test_patch_error_is_dropped_energy_plus_rounding(patch_size, keep, decimals):
    codec = DctImageCodec(patch_size, keep, decimals)
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (4 * patch_size, 3 * patch_size))
    restored = codec.decode(codec.encode(image), image.shape)
    d = dct_matrix(patch_size)
    step = 0.5 * 10.0**-decimals
    for r in range(4):
        for c in range(3):
            sl = np.s_[patch_size * r : patch_size * (r + 1), patch_size * c : patch_size * (c + 1)]
            full = d @ image[sl] @ d.T
            kept = full[:keep, :keep]
            dropped = (full**2).sum() - (kept**2).sum()
            rounding = ((kept - np.round(kept * 10**decimals) / 10**decimals) ** 2).sum()
            error = ((restored[sl] - image[sl]) ** 2).sum()
            assert error == pytest.approx(dropped + rounding, rel=1e-9, abs=1e-9)
            assert np.sqrt(error) <= np.sqrt(dropped + keep * keep * step**2) + 1e-9


def test_low_frequency_content_comes_back_within_rounding():
    codec = DctImageCodec()
    d = dct_matrix(8)
    rng = np.random.default_rng(2)
    blocks = []
    for _ in range(6):
        coeffs = np.zeros((8, 8))
        coeffs[:3, :3] = rng.normal(0, 50, (3, 3))
        blocks.append(d.T @ coeffs @ d)
    image = np.block([blocks[:3], blocks[3:]])
    restored = codec.decode(codec.encode(image), image.shape)
    for r in range(2):
        for c in range(3):
            sl = np.s_[8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
            assert np.linalg.norm(restored[sl] - image[sl]) <= 3 * 0.05 + 1e-9


def test_ragged_colour_images_keep_their_shape_through_a_keyed_table():
    codec = DctImageCodec()
    rng = np.random.default_rng(3)
    images = [rng.uniform(0, 1, (13, 10, 3)) for _ in range(4)]
    table = build_symbol_table(
        (codec.encode(im) for im in images[:2]), UltConfig(vocab_size=300), "image", codec.params()
    )
    mapper = SymbolMapper(table, KEY, codec.valid_codes)
    codes = codec.encode(images[3])
    ids, _ = mapper.to_ids(codes)
    stream = mapper.to_stream([ids], strict=True)
    assert np.array_equal(stream, codes)
    restored = codec.decode(stream, images[3].shape)
    assert restored.shape == (13, 10, 3)
    assert np.abs(restored - images[3]).mean() < 0.3
