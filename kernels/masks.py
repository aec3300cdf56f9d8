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

__all__ = ["MaskMod", "TextMask", "host_mask_4d", "text_only_mask", "arrow_keep", "arrow_mask_mod", "arrow_block_tables", "arrow_block_mask", "segment_offsets"]

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


# ------------------------------------------------------------------------------------------- host masks on text


def host_mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """A host attention mask as the host's SDPA backend broadcasts it: [Lq, Lk] -> [1, 1, Lq, Lk], [B, Lq, Lk] ->
    [B, 1, Lq, Lk] (ComfyUI's ``attention_pytorch``: a 3-D mask has a batch axis, not a head axis), 4-D unchanged."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0 if mask.dim() < 3 else 1)
    return mask


class TextMask:
    """A host attention mask that touches only text key columns: after broadcasting to [B, H, Lq, Lk] every column
    k >= T (image and reference tokens) is a no-op (float: exactly 0; bool: True = keep). Text columns may hold
    anything (an additive bias such as Redux's ``attn_bias``, -inf / False padding).

    mask: the host's tensor as passed (what the host's dense attention gets for full heads); view4: it as
    [B', H', Lq', L] (each of B', H', Lq' is 1 or the call's size); bias: float [B', H', Lq', T], the additive
    text-column bias (a bool mask's False as -inf)."""

    __slots__ = ("mask", "view4", "bias", "txt_len")

    def __init__(self, mask: torch.Tensor, view4: torch.Tensor, bias: torch.Tensor, txt_len: int) -> None:
        self.mask = mask
        self.view4 = view4
        self.bias = bias
        self.txt_len = txt_len

    @property
    def per_head(self) -> bool:
        return self.view4.shape[1] > 1

    def for_heads(self, index: torch.Tensor | None) -> torch.Tensor:
        """The host mask for a subset of heads (`index`; None: all): the original tensor unless it varies per head."""
        if index is None or not self.per_head:
            return self.mask
        return self.view4[:, index]

    def bias_for(self, index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The text-column bias [B', h, Lq', T] of the heads `index` (None: all) in `dtype`."""
        b = self.bias if index is None or not self.per_head else self.bias[:, index]
        return b if b.dtype == dtype else b.to(dtype)

    def combined(self, keep: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The float mask [B', h, L, L] of an arrow head: the text bias on text columns, 0 / -inf (the band `keep`
        [L, L]) on the others. Text rows keep every column in an arrow band, so the host's no-op image columns
        stay no-ops there."""
        t = self.txt_len
        seq = keep.shape[-1]
        img = torch.zeros(seq, seq - t, dtype=dtype, device=keep.device).masked_fill_(~keep[:, t:], float("-inf"))
        if t == 0:
            return img
        bias = self.bias_for(index, dtype)
        lead = bias.shape[:2]
        return torch.cat([bias.expand(*lead, seq, t), img.expand(*lead, seq, seq - t)], dim=-1)

    def score_mod(self):
        """FlexAttention score_mod adding the text-column bias (k < T); None without text columns."""
        t = self.txt_len
        if t == 0:
            return None
        bias = self.bias
        sb, sh, sq = (int(n > 1) for n in bias.shape[:3])  # broadcast axes are indexed at 0
        last = t - 1

        def text_bias(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                      kv_idx: torch.Tensor) -> torch.Tensor:
            val = bias[b * sb, h * sh, q_idx * sq, torch.clamp(kv_idx, max=last)]
            return torch.where(kv_idx < t, score + val, score)

        text_bias.__name__ = f"text_bias_txt{t}"
        return text_bias


def text_only_mask(mask: torch.Tensor, batch: int, heads: int, seq_len: int, txt_len: int) -> TextMask | str:
    """Classify a host attention mask of a call with `batch` × `heads` queries of `seq_len` tokens, text first
    (`txt_len`): a `TextMask` when every key column k >= txt_len is a no-op, else why not (a sentence). One device
    reduction (a sync on CUDA): callers check a mask once per forward, not per layer."""
    if not torch.is_tensor(mask):
        return f"the mask is a {type(mask).__name__}, not a tensor"
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        return f"unsupported mask dtype {mask.dtype}"
    if not 2 <= mask.dim() <= 4:
        return f"unsupported mask shape {tuple(mask.shape)}"
    m = host_mask_4d(mask)
    b, h, lq, lk = m.shape
    if lk != seq_len or lq not in (1, seq_len) or b not in (1, batch) or h not in (1, heads):
        return f"mask shape {tuple(mask.shape)} does not broadcast to [{batch}, {heads}, {seq_len}, {seq_len}]"
    rest = m[..., txt_len:]
    if rest.numel():
        touched = (~rest).any() if m.dtype == torch.bool else (rest != 0).any()
        if bool(touched):
            return "the mask covers image tokens (a regional mask)"
    text = m[..., :txt_len]
    if m.dtype == torch.bool:
        bias = torch.zeros(text.shape, dtype=torch.float32, device=m.device).masked_fill_(~text, float("-inf"))
    else:
        bias = text.contiguous()
    return TextMask(mask, m, bias, txt_len)
