"""One vocabulary for a head's method and window, one image-token count, one tile rule (kernels/)."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch

from dfav2.kernels import (
    CACHE,
    FULL,
    WINDOW_FULL,
    WINDOW_SKIP,
    HeadMethod,
    LayerDecision,
    arrow,
    arrow_keep,
    grid_tokens,
    image_tokens,
    kernel_tile,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_windows_of_each_method():
    assert FULL.window(4096) == WINDOW_FULL
    assert CACHE.window(4096) == WINDOW_SKIP
    assert arrow(8).window(4096) == 256 and arrow(32).window(10) == 0
    assert LayerDecision((FULL, CACHE, arrow(16))).windows(4096) == (WINDOW_FULL, WINDOW_SKIP, 128)


def test_keep_matrix_of_full_and_skip_windows():
    assert bool(arrow_keep(3, 10, WINDOW_FULL).all())
    assert not bool(arrow_keep(3, 10, WINDOW_SKIP).any())


@pytest.mark.parametrize("name", ["arrow/١", "arrow/８", "arrow/0", "arrow/08", "arrow/+8", "arrow/8 ", "arrow/²"])
def test_method_factor_must_be_ascii_digits(name):
    with pytest.raises(ValueError):
        HeadMethod.parse(name)


def test_one_image_token_count():
    assert image_tokens(1024, 1024) == grid_tokens(128, 128, 2) == 4096
    assert image_tokens(1000, 1000) == grid_tokens(125, 125, 2) == 63 * 63  # partial patches padded
    assert image_tokens(1024, 1024, vae_scale=16, patch=1) == 4096  # Flux 2


def _kernel_module():
    spec = importlib.util.spec_from_file_location("_dfav2_arrow_triton_vocab", ROOT / "kernels" / "arrow_triton.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_table_codes_and_tile_rule_agree_with_the_core(monkeypatch):
    pytest.importorskip("triton")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    at = _kernel_module()
    assert (at._FULL, at._SKIP) == (WINDOW_FULL, WINDOW_SKIP)
    # The sm90 (H200) launch config is the one the cost model's tile rule describes.
    monkeypatch.setattr(at, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for head_dim in (64, 128):
        cfg = at._default_config(torch.device("cuda"), head_dim, torch.bfloat16)
        assert cfg["BLOCK_M"] == cfg["BLOCK_N"] == kernel_tile(head_dim)
