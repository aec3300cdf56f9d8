"""calibration/quality.py: PSNR / SSIM / difference map of image batches in ComfyUI's [B, H, W, C] layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dfav2.calibration.quality import difference_map, psnr_ssim


@pytest.mark.parametrize("shape", [(1, 16, 16, 3), (3, 24, 40, 3), (2, 64, 48, 3)])
def test_psnr_ssim_against_direct_formulas(shape):
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(shape[1])
    a = torch.rand(shape, generator=g)
    b = (a + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    psnr, ssim = psnr_ssim(a, b)
    assert len(psnr) == len(ssim) == shape[0]
    for i in range(shape[0]):
        mse = float(((a[i] - b[i]) ** 2).mean())
        assert psnr[i] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
        want = structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=2, data_range=1.0)
        assert ssim[i] == pytest.approx(want, rel=1e-6) and 0 < ssim[i] < 1
    same_p, same_s = psnr_ssim(a, a.clone())
    assert same_p == [math.inf] * shape[0] and same_s == pytest.approx([1.0] * shape[0])
    # a worse copy scores lower on both
    worse = (a + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)
    wp, ws = psnr_ssim(a, worse)
    assert all(x < y for x, y in zip(wp, psnr)) and all(x < y for x, y in zip(ws, ssim))


def test_difference_map_and_shape_errors():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 8, 12, 3, generator=g)
    b = torch.rand(2, 8, 12, 3, generator=g)
    d = difference_map(a, b, 4.0)
    assert d.shape == a.shape and d.dtype == torch.float32
    assert torch.allclose(d, ((a - b).abs() * 4).clamp(0, 1))
    assert difference_map(a, a).abs().max() == 0
    assert torch.equal(difference_map(a, b, 1.0), (a - b).abs())
    with pytest.raises(ValueError, match="one shape"):
        psnr_ssim(a, b[:, :4])
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        difference_map(a[0], b[0])
    assert np.isfinite(psnr_ssim(a * 2, b)[0]).all()  # out-of-range values are clipped, not an error
