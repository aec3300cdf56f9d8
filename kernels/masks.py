"""Arrow attention masks (DiTFastAttnV2): the token-level definition and a fast FlexAttention BlockMask.

Text first: positions 0..T-1 are text, T..L-1 image. Heads are described by their *window* (methods.py:
`WINDOW_FULL`, `WINDOW_SKIP`, or a band half-width w >= 0 keeping (q, k) iff ``q < T or k < T or |q - k| <= w``). The block builder classifies tiles arithmetically (no dense
mask is ever materialised), so a per-head BlockMask at 2048² costs milliseconds, not the ~141 ms of
``create_block_mask`` (baselines.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .methods import WINDOW_FULL, WINDOW_SKIP

__all__ = ["MaskMod", "arrow_keep", "arrow_mask_mod", "arrow_block_tables", "arrow_block_mask"]

#: FlexAttention's mask_mod signature: (batch, head, q_idx, kv_idx) -> bool tensor.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Band half-width meaning "keep everything" inside the mask_mod's width tensor (a full head in a masked call).
_FULL_WIDTH = 1 << 30


def arrow_keep(txt_len: int, seq_len: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense boolean keep-matrix [L, L] of one head with `window` (WINDOW_FULL: all, WINDOW_SKIP: none)."""
    if window == WINDOW_FULL:
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if window < 0:
        return torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    idx = torch.arange(seq_len, device=device)
    q, k = idx[:, None], idx[None, :]
    return (q < txt_len) | (k < txt_len) | ((q - k).abs() <= window)


def arrow_mask_mod(txt_len: int, band: torch.Tensor) -> MaskMod:
    """FlexAttention mask_mod for per-head band half-widths (int tensor [H]; a huge value keeps everything;
    skipped heads are excluded by the BlockMask, which gives them no blocks)."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx < txt_len) | (kv_idx < txt_len) | ((q_idx - kv_idx).abs() <= band[h])

    mask_mod.__name__ = f"arrow_txt{txt_len}"
    return mask_mod


def arrow_block_tables(
    txt_len: int,
    seq_len: int,
    windows: Sequence[int],
    block_size: int = 128,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify every (q-tile, k-tile) pair of every head: (any_kept, all_kept), each bool [H, Qb, Kb].

    `windows[h]`: WINDOW_FULL, WINDOW_SKIP (no tile kept) or a band half-width. A tile pair is *partial*
    when any_kept and not all_kept (needs element masking).
    """
    nb = -(-seq_len // block_size)
    start = torch.arange(nb, device=device) * block_size
    end = torch.clamp(start + block_size, max=seq_len) - 1  # inclusive
    qa, qb = start[:, None], end[:, None]
    ka, kb = start[None, :], end[None, :]
    t = txt_len
    # Image part of each range (empty when the range is all text).
    qa_img, ka_img = torch.clamp(qa, min=t), torch.clamp(ka, min=t)
    q_has_img, k_has_img = qb >= t, kb >= t
    any_text = (qa < t) | (ka < t)
    min_dist = torch.clamp(torch.maximum(ka - qb, qa - kb), min=0)
    max_img_dist = torch.maximum(qb - ka_img, kb - qa_img)
    anys, alls = [], []
    for w in windows:
        if w == WINDOW_FULL:
            anys.append(torch.ones(nb, nb, dtype=torch.bool, device=device))
            alls.append(anys[-1])
        elif w < 0:
            anys.append(torch.zeros(nb, nb, dtype=torch.bool, device=device))
            alls.append(anys[-1])
        else:
            anys.append(any_text | (min_dist <= w))
            # Rows that are text keep all; image rows keep text columns; so only image x image pairs
            # can be dropped, and they all survive iff the farthest such pair is inside the band.
            alls.append(~(q_has_img & k_has_img) | (max_img_dist <= w))
    return torch.stack(anys), torch.stack(alls)


def _to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [H, Qb, Kb] -> (counts int32 [1, H, Qb], indices int32 [1, H, Qb, Kb]) with kept blocks first."""
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None], order[None]


def arrow_block_mask(
    txt_len: int,
    seq_len: int,
    windows: Sequence[int],
    block_size: int = 128,
    device: torch.device | str = "cpu",
):  # -> torch.nn.attention.flex_attention.BlockMask
    """A FlexAttention BlockMask for per-head windows, built from block indices directly.

    Tiles wholly inside the pattern go to the ``full`` lists (no mask_mod evaluated), edge tiles to
    the partial lists with the token-exact `arrow_mask_mod`. WINDOW_SKIP heads get no tiles at all (their
    output is zero); WINDOW_FULL heads get every tile.
    """
    from torch.nn.attention.flex_attention import BlockMask

    any_kept, all_kept = arrow_block_tables(txt_len, seq_len, windows, block_size, device)
    partial = any_kept & ~all_kept
    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(all_kept & any_kept)
    widths = torch.tensor(
        [_FULL_WIDTH if w == WINDOW_FULL else w for w in windows], dtype=torch.int64, device=device
    )
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=arrow_mask_mod(txt_len, widths),
        seq_lengths=(seq_len, seq_len),
    )
