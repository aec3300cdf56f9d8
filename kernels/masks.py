"""Arrow attention masks (DiTFastAttnV2): the token-level definition and a fast FlexAttention BlockMask.

Text first: positions 0..T-1 are text, then N image tokens, then R reference tokens (Kontext / edit reference
latents, which the host appends after the image: [text T, image N, ref R1, ref R2, ...]). Reference tokens are kept
like text (their rows and columns are full): measured against a band per image segment in bench/bench_reference.py.
Heads are described by their *window* (methods.py: `WINDOW_FULL`, `WINDOW_SKIP`, or a band half-width w >= 0
keeping (q, k) iff ``q < T or k < T or q >= T + N or k >= T + N or |q - k| <= w``); R = 0 is the plain arrow. The block builder classifies tiles arithmetically (no dense
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


def arrow_keep(txt_len: int, seq_len: int, window: int, device: torch.device | str = "cpu",
               ref_len: int = 0) -> torch.Tensor:
    """Dense boolean keep-matrix [L, L] of one head with `window` (WINDOW_FULL: all, WINDOW_SKIP: none); the last
    `ref_len` tokens are reference tokens (kept like text)."""
    if window == WINDOW_FULL:
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if window < 0:
        return torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    idx = torch.arange(seq_len, device=device)
    q, k = idx[:, None], idx[None, :]
    keep = (q < txt_len) | (k < txt_len) | ((q - k).abs() <= window)
    if ref_len:
        ref_start = seq_len - ref_len
        keep |= (q >= ref_start) | (k >= ref_start)
    return keep


def arrow_mask_mod(txt_len: int, band: torch.Tensor, ref_start: int | None = None) -> MaskMod:
    """FlexAttention mask_mod for per-head band half-widths (int tensor [H]; a huge value keeps everything;
    skipped heads are excluded by the BlockMask, which gives them no blocks). `ref_start` (T + N): where the
    reference tokens begin (None: there are none)."""
    if ref_start is None:

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return (q_idx < txt_len) | (kv_idx < txt_len) | ((q_idx - kv_idx).abs() <= band[h])

        mask_mod.__name__ = f"arrow_txt{txt_len}"
        return mask_mod
    r0 = ref_start

    def ref_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        dense = (q_idx < txt_len) | (kv_idx < txt_len) | (q_idx >= r0) | (kv_idx >= r0)
        return dense | ((q_idx - kv_idx).abs() <= band[h])

    ref_mask_mod.__name__ = f"arrow_txt{txt_len}_ref{r0}"
    return ref_mask_mod


def arrow_block_tables(
    txt_len: int,
    seq_len: int,
    windows: Sequence[int],
    block_size: int = 128,
    device: torch.device | str = "cpu",
    ref_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify every (q-tile, k-tile) pair of every head: (any_kept, all_kept), each bool [H, Qb, Kb].

    `windows[h]`: WINDOW_FULL, WINDOW_SKIP (no tile kept) or a band half-width; the last `ref_len` tokens are
    reference tokens (kept like text). A tile pair is *partial* when any_kept and not all_kept (needs element
    masking).
    """
    nb = -(-seq_len // block_size)
    start = torch.arange(nb, device=device) * block_size
    end = torch.clamp(start + block_size, max=seq_len) - 1  # inclusive
    qa, qb = start[:, None], end[:, None]
    ka, kb = start[None, :], end[None, :]
    t = txt_len
    r0 = seq_len - ref_len  # first reference token (= L without references)
    # Image part [T, T + N) of each range (empty when the range is all text or all reference).
    qa_img, ka_img = torch.clamp(qa, min=t), torch.clamp(ka, min=t)
    qb_img, kb_img = torch.clamp(qb, max=r0 - 1), torch.clamp(kb, max=r0 - 1)
    q_has_img, k_has_img = qa_img <= qb_img, ka_img <= kb_img
    # A range touching text or reference rows/columns keeps something; otherwise both ranges are all image.
    any_text = (qa < t) | (ka < t) | (qb >= r0) | (kb >= r0)
    min_dist = torch.clamp(torch.maximum(ka - qb, qa - kb), min=0)
    max_img_dist = torch.maximum(qb_img - ka_img, kb_img - qa_img)
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
            # Rows that are text or reference keep all; image rows keep text and reference columns; so only image x image pairs
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
    ref_len: int = 0,
):  # -> torch.nn.attention.flex_attention.BlockMask
    """A FlexAttention BlockMask for per-head windows, built from block indices directly.

    Tiles wholly inside the pattern go to the ``full`` lists (no mask_mod evaluated), edge tiles to
    the partial lists with the token-exact `arrow_mask_mod`. WINDOW_SKIP heads get no tiles at all (their
    output is zero); WINDOW_FULL heads get every tile. The last `ref_len` tokens are reference tokens.
    """
    from torch.nn.attention.flex_attention import BlockMask

    any_kept, all_kept = arrow_block_tables(txt_len, seq_len, windows, block_size, device, ref_len)
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
        mask_mod=arrow_mask_mod(txt_len, widths, seq_len - ref_len if ref_len else None),
        seq_lengths=(seq_len, seq_len),
    )
