"""Cost model against brute-force counting of the arrow mask."""

from __future__ import annotations

import pytest
import torch

from dfav2.kernels import CACHE, FULL, Geometry, LayerDecision, arrow, arrow_keep, decision_flops, image_tokens, kept_pairs, kept_tiles
from dfav2.kernels.cost import band_pairs, head_cost

GEOMETRIES = [(0, 1), (0, 67), (5, 3), (13, 70), (77, 130), (154, 256), (7, 1000)]
METHODS = [FULL, CACHE, arrow(1), arrow(2), arrow(8), arrow(16), arrow(32)]


@pytest.mark.parametrize("t,n", GEOMETRIES)
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_kept_pairs_equals_brute_force(t, n, method):
    seq = t + n
    if method == CACHE:
        expected = 0
    else:
        w = method.window(n)
        expected = int(arrow_keep(t, seq, w).sum())
    assert kept_pairs(t, n, method) == expected


@pytest.mark.parametrize("t,n", GEOMETRIES)
@pytest.mark.parametrize("tile", [16, 64, 128])
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_kept_tiles_equals_brute_force(t, n, tile, method):
    seq = t + n
    if method == CACHE:
        assert kept_tiles(t, n, method, tile) == 0
        return
    w = method.window(n)
    keep = arrow_keep(t, seq, w)
    nb = -(-seq // tile)
    padded = torch.zeros(nb * tile, nb * tile, dtype=torch.bool)
    padded[:seq, :seq] = keep
    tiles = padded.view(nb, tile, nb, tile).any(dim=(1, 3))
    assert kept_tiles(t, n, method, tile) == int(tiles.sum())


@pytest.mark.parametrize("n", range(0, 40))
@pytest.mark.parametrize("w", [0, 1, 2, 5, 38, 39, 100])
def test_band_pairs_closed_form(n, w):
    i = torch.arange(n)
    assert band_pairs(n, w) == int(((i[:, None] - i[None, :]).abs() <= w).sum())


def test_method_md_table_flux_1024():
    # method.md §2.2: Flux 1024², T = 512, f = 8 keeps 0.306 of the pairs (element level).
    geo = Geometry(512, image_tokens(1024, 1024), heads=24, head_dim=128)
    assert geo.n_img_tokens == 4096
    frac = head_cost(geo, arrow(8)) / head_cost(geo, FULL)
    assert frac == pytest.approx(0.306, abs=0.002)


def test_block_density_table_flux_2048():
    # method.md §2.2 block-level table: Flux 2048², T = 256, BLOCK 128 -> 15.5 % / 9.8 % / 6.8 %.
    geo = Geometry(256, image_tokens(2048, 2048))
    full = head_cost(geo, FULL, 128)
    got = [head_cost(geo, arrow(f), 128) / full for f in (8, 16, 32)]
    assert got == pytest.approx([0.155, 0.098, 0.068], abs=0.002)


def test_decision_flops_sums_heads_and_scales():
    geo = Geometry(10, 90, heads=3, head_dim=64, batch=2)
    dec = LayerDecision((FULL, arrow(8), CACHE))
    kept, dense = decision_flops(geo, dec)
    scale = 4 * 64 * 2
    assert dense == 3 * 100 * 100 * scale
    assert kept == (100 * 100 + kept_pairs(10, 90, arrow(8))) * scale


def test_image_tokens_pads_partial_patches():
    assert image_tokens(1024, 768) == 64 * 48
    assert image_tokens(1000, 760) == 63 * 48  # latent 125 x 95 -> 63 x 48 patches


def test_geometry_rejects_bad_values():
    with pytest.raises(ValueError, match="txt_len"):
        Geometry(-1, 10)
    with pytest.raises(ValueError, match="heads"):
        Geometry(1, 10, heads=0)
