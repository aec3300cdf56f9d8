"""Arrow attention masks (DiTFastAttnV2): the token-level definition and a fast FlexAttention BlockMask.

Text first: positions 0..T-1 are text, T..L-1 image. A head with half-width w keeps (q, k) iff
``q < T or k < T or |q - k| <= w``. The block builder classifies tiles arithmetically (no dense
mask is ever materialised), so a per-head BlockMask at 2048² costs milliseconds, not the ~141 ms of
``create_block_mask`` (baselines.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["MaskMod", "arrow_keep", "arrow_mask_mod", "arrow_block_tables", "arrow_block_mask"]

#: FlexAttention's mask_mod signature: (batch, head, q_idx, kv_idx) -> bool tensor.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Half-width meaning "keep everything" inside mask tensors (a full head routed through a mask path).
_FULL_WIDTH = 1 << 30


def arrow_keep(txt_len: int, seq_len: int, half_width: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense boolean keep-matrix [L, L] of one head; ``half_width=None`` means full attention."""
    idx = torch.arange(seq_len, device=device)
    q, k = idx[:, None], idx[None, :]
    if half_width is None:
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    return (q < txt_len) | (k < txt_len) | ((q - k).abs() <= half_width)


def arrow_mask_mod(txt_len: int, half_widths: torch.Tensor) -> MaskMod:
    """FlexAttention mask_mod for per-head half-widths (int tensor [H]; a huge value means full)."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx < txt_len) | (kv_idx < txt_len) | ((q_idx - kv_idx).abs() <= half_widths[h])

    mask_mod.__name__ = f"arrow_txt{txt_len}"
    return mask_mod


def arrow_block_tables(
    txt_len: int,
    seq_len: int,
    half_widths: Sequence[int | None],
    block_size: int = 128,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify every (q-tile, k-tile) pair of every head: (any_kept, all_kept), each bool [H, Qb, Kb].

    `half_widths[h]`: None = full head, negative = head not computed (no tile kept), else band
    half-width. A tile pair is *partial* when any_kept and not all_kept (needs element masking).
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
    for w in half_widths:
        if w is None:
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
    half_widths: Sequence[int | None],
    block_size: int = 128,
    device: torch.device | str = "cpu",
):  # -> torch.nn.attention.flex_attention.BlockMask
    """A FlexAttention BlockMask for per-head arrow bands, built from block indices directly.

    Tiles wholly inside the pattern go to the ``full`` lists (no mask_mod evaluated), edge tiles to
    the partial lists with the token-exact `arrow_mask_mod`. Negative half-widths give heads with no
    tiles at all (their output is zero); None gives full heads.
    """
    from torch.nn.attention.flex_attention import BlockMask

    any_kept, all_kept = arrow_block_tables(txt_len, seq_len, half_widths, block_size, device)
    partial = any_kept & ~all_kept
    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(all_kept & any_kept)
    widths = torch.tensor(
        [_FULL_WIDTH if w is None else w for w in half_widths], dtype=torch.int64, device=device
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
