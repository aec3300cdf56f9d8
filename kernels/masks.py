"""Arrow attention masks (DiTFastAttnV2): the token-level definition and a fast FlexAttention BlockMask.

Text first: positions 0..T-1 are text, then the N image tokens, then the tokens of each reference latent (Kontext /
edit: the host appends them after the image, [text T, image N, ref R1, ref R2, ...]); `refs` lists R1, R2, ... Heads
are described by their *window* (methods.py: `WINDOW_FULL`, `WINDOW_SKIP`, or a band half-width w >= 0). A band keeps
(q, k) iff ``q < T or k < T or |o(q) - o(k)| <= w`` where o(x) is x's offset inside its own *segment* (the image, or
its reference): a band per image segment, which also keeps image <-> reference pairs at aligned offsets. Without
references o(q) - o(k) = q - k: the plain arrow. (Measured against keeping reference rows and columns full like
text, which costs far more for a larger error: bench/bench_reference.py, README "Reference latents".) The block builder classifies tiles arithmetically (no dense
mask is ever materialised), so a per-head BlockMask at 2048² costs milliseconds, not the ~141 ms of
``create_block_mask`` (baselines.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .methods import WINDOW_FULL, WINDOW_SKIP

__all__ = ["MaskMod", "arrow_keep", "arrow_mask_mod", "arrow_block_tables", "arrow_block_mask", "segment_offsets"]

#: FlexAttention's mask_mod signature: (batch, head, q_idx, kv_idx) -> bool tensor.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Band half-width meaning "keep everything" inside the mask_mod's width tensor (a full head in a masked call).
_FULL_WIDTH = 1 << 30


def _segments(txt_len: int, seq_len: int, refs: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of the image segment and of each reference segment."""
    n_img = seq_len - txt_len - sum(refs)
    if n_img < 0 or any(r < 0 for r in refs):
        raise ValueError(f"{txt_len} text tokens and references {tuple(refs)} do not fit in {seq_len} tokens")
    out, start = [], txt_len
    for length in (n_img, *refs):
        out.append((start, start + length))
        start += length
    return out


def segment_offsets(txt_len: int, seq_len: int, refs: Sequence[int] = (), device: torch.device | str = "cpu") -> torch.Tensor:
    """o(x) for every position (int64 [L]): the offset inside its segment (text positions: their index)."""
    off = torch.arange(seq_len, device=device)
    for start, end in _segments(txt_len, seq_len, refs):
        off[start:end] -= start
    return off


def arrow_keep(txt_len: int, seq_len: int, window: int, device: torch.device | str = "cpu",
               refs: Sequence[int] = ()) -> torch.Tensor:
    """Dense boolean keep-matrix [L, L] of one head with `window` (WINDOW_FULL: all, WINDOW_SKIP: none) and
    reference segments `refs` after the image."""
    if window == WINDOW_FULL:
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if window < 0:
        return torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    idx = torch.arange(seq_len, device=device)
    q, k = idx[:, None], idx[None, :]
    off = segment_offsets(txt_len, seq_len, refs, device) if refs else idx
    return (q < txt_len) | (k < txt_len) | ((off[:, None] - off[None, :]).abs() <= window)


def arrow_mask_mod(txt_len: int, band: torch.Tensor, offsets: torch.Tensor | None = None) -> MaskMod:
    """FlexAttention mask_mod for per-head band half-widths (int tensor [H]; a huge value keeps everything;
    skipped heads are excluded by the BlockMask, which gives them no blocks). `offsets`: `segment_offsets` of a
    call with references (None: none, then the offset difference is q - k)."""
    if offsets is None:

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return (q_idx < txt_len) | (kv_idx < txt_len) | ((q_idx - kv_idx).abs() <= band[h])

        mask_mod.__name__ = f"arrow_txt{txt_len}"
        return mask_mod
    off = offsets

    def segment_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx < txt_len) | (kv_idx < txt_len) | ((off[q_idx] - off[kv_idx]).abs() <= band[h])

    segment_mask_mod.__name__ = f"arrow_txt{txt_len}_segments"
    return segment_mask_mod


def arrow_block_tables(
    txt_len: int,
    seq_len: int,
    windows: Sequence[int],
    block_size: int = 128,
    device: torch.device | str = "cpu",
    refs: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify every (q-tile, k-tile) pair of every head: (any_kept, all_kept), each bool [H, Qb, Kb].

    `windows[h]`: WINDOW_FULL, WINDOW_SKIP (no tile kept) or a band half-width; `refs`: reference segments after
    the image. A tile pair is *partial* when any_kept and not all_kept (needs element masking).
    """
    nb = -(-seq_len // block_size)
    start = torch.arange(nb, device=device) * block_size
    end = torch.clamp(start + block_size, max=seq_len) - 1  # inclusive
    qa, qb = start[:, None], end[:, None]
    ka, kb = start[None, :], end[None, :]
    t = txt_len
    any_text = (qa < t) | (ka < t)  # a text row or column in the tile pair: something is kept
    # Per pair of segments (image or reference) present in a tile pair: the least and largest offset distance
    # between its q part and its k part. Pairs with a text token are always kept, so the tile pair keeps some
    # pair iff some segment pair's least distance is inside the band, and all iff every largest one is.
    spans = []
    for s0, s1 in _segments(t, seq_len, refs):
        lo_q, hi_q = torch.clamp(qa, min=s0) - s0, torch.clamp(qb, max=s1 - 1) - s0
        lo_k, hi_k = torch.clamp(ka, min=s0) - s0, torch.clamp(kb, max=s1 - 1) - s0
        spans.append((lo_q, hi_q, lo_q <= hi_q, lo_k, hi_k, lo_k <= hi_k))
    pairs = []
    for lo_q, hi_q, in_q, _, _, _ in spans:
        for _, _, _, lo_k, hi_k, in_k in spans:
            both = in_q & in_k
            min_dist = torch.clamp(torch.maximum(lo_k - hi_q, lo_q - hi_k), min=0)
            max_dist = torch.maximum(hi_q - lo_k, hi_k - lo_q)
            big = torch.iinfo(min_dist.dtype).max
            pairs.append((torch.where(both, min_dist, big), torch.where(both, max_dist, -1)))
    min_any = torch.stack([p[0] for p in pairs]).amin(0)
    max_all = torch.stack([p[1] for p in pairs]).amax(0)
    anys, alls = [], []
    for w in windows:
        if w == WINDOW_FULL:
            anys.append(torch.ones(nb, nb, dtype=torch.bool, device=device))
            alls.append(anys[-1])
        elif w < 0:
            anys.append(torch.zeros(nb, nb, dtype=torch.bool, device=device))
            alls.append(anys[-1])
        else:
            anys.append(any_text | (min_any <= w))
            # Only (segment, segment) pairs can be dropped; they all survive iff the farthest is inside the band.
            alls.append(max_all <= w)
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
    refs: Sequence[int] = (),
):  # -> torch.nn.attention.flex_attention.BlockMask
    """A FlexAttention BlockMask for per-head windows, built from block indices directly.

    Tiles wholly inside the pattern go to the ``full`` lists (no mask_mod evaluated), edge tiles to
    the partial lists with the token-exact `arrow_mask_mod`. WINDOW_SKIP heads get no tiles at all (their
    output is zero); WINDOW_FULL heads get every tile. `refs`: reference segments after the image.
    """
    from torch.nn.attention.flex_attention import BlockMask

    any_kept, all_kept = arrow_block_tables(txt_len, seq_len, windows, block_size, device, refs)
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
        mask_mod=arrow_mask_mod(txt_len, widths, segment_offsets(txt_len, seq_len, refs, device) if refs else None),
        seq_lengths=(seq_len, seq_len),
    )
