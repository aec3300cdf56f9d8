"""A word tokenizer and a fixed text encoder for the scene captions, shaped like the host's conditioning.

Tokens: the caption's words and commas (`scenes.VOCAB`), plus `<pad>` and `<unk>`. The encoder is fixed, not
trained (the diffusion model's own text input layer learns to read it): every token has an embedding drawn
once from numpy's PCG64 with `SEED` and orthonormalised (so all tokens are exactly distinguishable), plus a
sinusoidal position code of amplitude 0.5 (so word order, e.g. "red circle at the top, blue square ...", is
visible). Output, like ComfyUI's CONDITIONING from a CLIP/T5 encoder:

- context `[B, T, CONTEXT_DIM]`, T = max(`min_length`, longest caption), shorter captions padded with `<pad>`
  (T5 in ComfyUI pads Flux prompts to 256 the same way; long captions give longer T);
- pooled `[B, POOLED_DIM]`: the mean of the caption's token embeddings (without padding).

The empty caption is all `<pad>` (the unconditional input for classifier-free guidance).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from .scenes import VOCAB

__all__ = ["tokenize", "encode_text", "TOKENS", "CONTEXT_DIM", "POOLED_DIM", "MIN_LENGTH", "SEED"]

CONTEXT_DIM = 64
POOLED_DIM = 64
MIN_LENGTH = 32
SEED = 20261128
TOKENS = ("<pad>", "<unk>") + tuple(VOCAB)
_INDEX = {t: i for i, t in enumerate(TOKENS)}


def _table() -> torch.Tensor:
    rng = np.random.default_rng(SEED)
    q, _ = np.linalg.qr(rng.standard_normal((CONTEXT_DIM, CONTEXT_DIM)))
    return torch.from_numpy(q[: len(TOKENS)].astype(np.float32)) * math.sqrt(CONTEXT_DIM) * 0.5


_EMB = _table()  # rows of norm 0.5 * sqrt(C): entries of about unit scale / 2


def tokenize(caption: str) -> list[int]:
    words = re.findall(r"[a-z]+|,", caption.lower())
    return [_INDEX.get(w, 1) for w in words]


def _positions(t: int) -> torch.Tensor:
    pos = torch.arange(t, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, CONTEXT_DIM, 2, dtype=torch.float32) / CONTEXT_DIM)
    pe = torch.zeros(t, CONTEXT_DIM)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe * 0.5


def encode_text(captions: Sequence[str], min_length: int = MIN_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (context `[B, T, 64]`, pooled `[B, 64]`), float32 on CPU."""
    ids = [tokenize(c) for c in captions]
    t = max([min_length] + [len(i) for i in ids])
    tok = torch.zeros(len(ids), t, dtype=torch.long)
    for b, i in enumerate(ids):
        tok[b, : len(i)] = torch.tensor(i, dtype=torch.long)
    ctx = _EMB[tok] + _positions(t)[None]
    real = (tok != 0).float()[..., None]
    pooled = (_EMB[tok] * real).sum(1) / real.sum(1).clamp_min(1.0)
    return ctx, pooled
