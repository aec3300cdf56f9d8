"""The host-free parts of the reference models: scene generator and its ground-truth scorer, the latent codec and
the text encoder (the trained models themselves are tested in tests/host/test_host_refmodels.py)."""

import numpy as np
import pytest
import torch

from dfav2.refmodels import codec, scenes, text


def test_scenes_are_deterministic_and_varied():
    a, b = scenes.sample_scenes(64, 3), scenes.sample_scenes(64, 3)
    assert a == b and a != scenes.sample_scenes(64, 4)
    groups = [g for s in a for g in s.groups]
    assert {g.count for g in groups} == {1, 2, 3}
    assert {g.color for g in groups} == set(scenes.COLORS) and {g.shape for g in groups} == set(scenes.SHAPES)
    assert {s.bg_texture for s in a} == set(scenes.BG_TEXTURES)
    for s in a:
        cells = [g.cell for g in s.groups]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)
        words = s.caption.replace(",", " , ").split()
        assert set(words) <= set(scenes.VOCAB)
        for g in s.groups:
            assert scenes.CELLS[g.cell] in s.caption and g.color in s.caption


@pytest.mark.parametrize("size", [128, 256, 384])
def test_score_accepts_the_rendered_truth_and_rejects_other_scenes(size):
    sc = scenes.sample_scenes(12, 11)
    imgs = scenes.render(sc, size)
    assert imgs.shape == (12, 3, size, size) and 0 <= imgs.min() and imgs.max() <= 1
    good = scenes.score(imgs, sc)
    assert good["background"] == 1.0 and good["color"] == 1.0 and good["object"] >= 0.9, good
    bad = scenes.score(imgs, scenes.sample_scenes(12, 12))
    assert bad["object"] < 0.3 and bad["color"] < good["color"], bad
    blank = scenes.score(torch.full_like(imgs, 0.5), sc)
    assert blank["color"] == 0.0 and blank["object"] == 0.0


def test_codec_is_an_orthonormal_projection_that_keeps_the_scenes():
    b = codec.basis().double()
    assert b.shape == (codec.CHANNELS, 3 * codec.PATCH ** 2)
    assert torch.allclose(b @ b.T, torch.eye(codec.CHANNELS, dtype=torch.float64), atol=1e-12)
    sc = scenes.sample_scenes(8, 5)
    imgs = scenes.render(sc, 256)
    z = codec.encode(imgs)
    assert z.shape == (8, 16, 32, 32)
    assert 0.2 < z.std().item() < 2.0  # roughly normalised
    rec = codec.decode(z)
    psnr = 10 * torch.log10(1 / ((rec - imgs) ** 2).mean())
    assert psnr > 28, psnr
    assert scenes.score(rec, sc)["color"] == 1.0
    # decode is the adjoint of encode on latents: encode(decode(z)) == z where decode does not clamp
    z2 = torch.randn(2, 16, 5, 7) * 0.1
    assert torch.allclose(codec.encode(codec.decode(z2)), z2, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.zeros(1, 3, 20, 16))


def test_text_encoder_shapes_padding_and_order():
    caps = [s.caption for s in scenes.sample_scenes(16, 9)]
    ctx, pooled = text.encode_text(caps)
    longest = max(len(text.tokenize(c)) for c in caps)
    assert ctx.shape == (16, max(text.MIN_LENGTH, longest), text.CONTEXT_DIM)
    assert pooled.shape == (16, text.POOLED_DIM)
    assert text.tokenize("a red circle") != text.tokenize("a circle red")
    one, _ = text.encode_text(["a red circle at the top"])
    swapped, _ = text.encode_text(["a circle red at the top"])
    assert not torch.allclose(one, swapped)
    empty, pooled_empty = text.encode_text([""])
    assert empty.shape == (1, text.MIN_LENGTH, text.CONTEXT_DIM) and torch.count_nonzero(pooled_empty) == 0
    assert text.tokenize("a zebra") == [text.TOKENS.index("a"), 1]  # unknown words -> <unk>
    assert np.isfinite(ctx.numpy()).all()
