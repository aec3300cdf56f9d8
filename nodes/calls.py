"""What a forward and an attention call of a planned layer look like, checked without state or host import:
`describe_forward` gives a forward's geometry and cache key (or why it runs dense), `dense_reason` says why a call
must run the host's dense attention, `parse_call` turns a routable call into [B, H, L, D] views, `dense_call` runs
an all-full call on another dense function in the host's layouts.
Flux passes q, k, v [B, H, L, D] with ``skip_reshape=True``; SD3 passes [B, L, H·D] with ``heads=`` (and v,
sometimes k, as [B, L, H, D])."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..calibration.plan import LayerSpec
from ..kernels.masks import TextMask, text_only_mask
from .layouts import Layout, Reason

__all__ = ["Call", "dense_call", "dense_reason", "describe_forward", "parse_call"]



#: (mask, batch, heads, seq_len, txt_len) -> TextMask, or why the mask keeps the call dense (masks.text_only_mask)
MaskCheck = Callable[[torch.Tensor, int, int, int, int], "TextMask | str"]


class Call:
    """A routable attention call: q, k, v as [B, H, L, D] views, how to give the output back, and the host's mask
    when it touches only text key columns (`mask`, a `TextMask`; None without a mask)."""

    __slots__ = ("q", "k", "v", "batch", "seq_len", "heads", "head_dim", "flat", "mask")


def parse_call(spec: LayerSpec, txt_len: int, n_img: int, args: tuple, kwargs: dict, ref_len: int = 0,
               check_mask: MaskCheck | None = None) -> Call | Reason:
    """[B, H, L, D] views of a routable call with L = text + image + reference tokens, or why it is not one.
    A mask is routable when it touches only text key columns; `check_mask` classifies it (default
    `masks.text_only_mask`, one device reduction; the router caches it per forward)."""
    if len(args) < 3 or len(args) > 4:
        return Reason("arguments", f"unexpected attention call with {len(args)} positional arguments")
    q, k, v = args[0], args[1], args[2]
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    if kwargs.get("enable_gqa"):
        return Reason("gqa", "grouped-query attention is not supported")
    if not isinstance(heads, int) or heads < 1:
        return Reason("heads", f"attention call without a head count ({heads!r})")
    if not (torch.is_tensor(q) and torch.is_tensor(k) and torch.is_tensor(v)):
        return Reason("arguments", "q, k, v are not tensors")
    flat = not kwargs.get("skip_reshape", False)
    if flat:
        if q.dim() != 3 or q.shape[-1] % heads:
            return Reason("layout", f"unexpected query shape {tuple(q.shape)} for {heads} heads")
        batch, seq_len, hd = q.shape
        head_dim = hd // heads
        # SD3 passes v (sometimes k) as [B, L, H, D] next to q [B, L, H*D]
        same = all(t.shape == q.shape or t.shape == (batch, seq_len, heads, head_dim) for t in (k, v))
    else:
        if q.dim() != 4 or q.shape[1] != heads:
            return Reason("layout", f"unexpected query shape {tuple(q.shape)} for {heads} heads")
        batch, _, seq_len, head_dim = q.shape
        same = k.shape == q.shape and v.shape == q.shape
    if not same:
        return Reason("Lq != Lk", f"query {tuple(q.shape)} and key/value {tuple(k.shape)}/{tuple(v.shape)} differ (KV cache?)")
    if heads != spec.heads or head_dim != spec.head_dim:
        return Reason("head mismatch", f"layer {spec.name}: plan expects {spec.heads} heads × {spec.head_dim}, "
                      f"call has {heads} × {head_dim}")
    if seq_len != txt_len + n_img + ref_len:
        refs = f" + reference {ref_len}" if ref_len else ""
        return Reason("layout", f"layer {spec.name}: sequence length {seq_len} is not text {txt_len} + image grid {n_img}{refs}")
    mask = kwargs.get("mask")
    text_mask = None
    if mask is not None:
        checked = (check_mask or text_only_mask)(mask, batch, heads, seq_len, txt_len)
        if not isinstance(checked, TextMask):
            return Reason("mask", f"an attention mask is present and not text-only: {checked}")
        text_mask = checked
    c = Call()
    c.q, c.k, c.v = q, k, v
    c.batch, c.seq_len, c.heads, c.head_dim, c.flat = batch, seq_len, heads, head_dim, flat
    c.mask = text_mask
    return c


def dense_reason(spec: LayerSpec, txt_len: int, n_img: int, args: tuple, kwargs: dict, ref_len: int = 0) -> str | None:
    """Why an attention call of layer `spec` (forward with `txt_len` text and `n_img` image tokens) must run the
    host's dense attention, or None when the plan can run it. `args`/`kwargs` are what the host passes to its
    attention backend: Flux q, k, v [B, H, L, D] with ``skip_reshape=True``, SD3 [B, L, H·D] with ``heads=``.
    The reason's `.kind` groups warnings. Pure: no state, no host import."""
    r = parse_call(spec, 0 if spec.image_only else txt_len, n_img, args, kwargs, ref_len)
    return r if isinstance(r, Reason) else None


def describe_forward(layout: Layout, x: Any, context: Any, to: dict, extra: dict, sigma: float
                     ) -> tuple[Reason | None, int, int, tuple[int, ...], Hashable]:
    """What one model forward looks like to the plan: (why it must run dense or None, text tokens, image tokens,
    reference-latent token counts, cache key). `x` is the latent [B, C, H, W], `context` the text conditioning
    [B, T, C], `to` the forward's transformer_options, `extra` its ``ref_latents`` (an ``attention_mask`` is
    checked per call: a mask on text key columns only is routed, see `parse_call`)."""
    if not (torch.is_tensor(x) and x.dim() == 4):
        return Reason("latent is not [B, C, H, W]"), 0, 0, (), None
    if context is None or not torch.is_tensor(context) or context.dim() != 3:
        return Reason("no text conditioning tensor"), 0, 0, (), None
    if not math.isfinite(sigma):
        return Reason("no sigma for this forward"), 0, 0, (), None
    reason = layout.forward_reason(to)
    if reason is not None:
        return reason, 0, 0, (), None
    refs: tuple[int, ...] = ()
    if extra.get("ref_latents") is not None:
        counted = layout.reference_tokens(extra["ref_latents"])
        if isinstance(counted, Reason):
            return counted, 0, 0, (), None
        refs = counted
    n_img = layout.latent_tokens(int(x.shape[-2]), int(x.shape[-1]))
    txt_len = layout.text_tokens(int(context.shape[1]))
    chunks = to.get("uuids") or to.get("cond_or_uncond") or ()
    try:
        chunk_key = tuple(chunks)
    except TypeError:
        chunk_key = (id(chunks),)
    key: tuple = (str(x.device), chunk_key, int(x.shape[0]))
    replaced = (to.get("patches_replace") or {}).get("dit")
    if replaced:
        # Forwards with blocks replaced (e.g. the extra Skip Layer Guidance pass of the same conditioning) compute
        # other head outputs: they keep their own cache, never the plain forward's.
        key += (tuple(sorted(map(str, replaced))),)
    return None, txt_len, n_img, refs, key


def dense_call(fast: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
    """Run an attention call whose heads all run full with `fast` ((q, k, v, scale) on [B, H, L, D]), taking and
    returning the host's layouts: Flux [B, H, L, D] (``skip_reshape``), SD3 [B, L, H·D] (v, sometimes k, as
    [B, L, H, D]); the output is [B, L, H·D] unless ``skip_output_reshape``."""
    q, k, v = args[0], args[1], args[2]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    if kwargs.get("skip_reshape", False):
        b, _, seq, d = q.shape
    else:
        b, seq, hd = q.shape
        d = hd // heads
        q, k, v = (t.reshape(b, seq, heads, d).transpose(1, 2) for t in (q, k, v))
    out = fast(q, k, v, kwargs.get("scale"))
    if kwargs.get("skip_output_reshape", False):
        return out
    return out.transpose(1, 2).reshape(b, seq, heads * d)
