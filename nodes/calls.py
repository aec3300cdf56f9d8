"""What an attention call of a planned layer looks like, checked without state or host import: `dense_reason`
says why a call must run the host's dense attention, `parse_call` turns a routable call into [B, H, L, D] views.
Flux passes q, k, v [B, H, L, D] with ``skip_reshape=True``; SD3 passes [B, L, H·D] with ``heads=`` (and v,
sometimes k, as [B, L, H, D])."""

from __future__ import annotations

import torch

from ..calibration.plan import LayerSpec
from .layouts import Reason

__all__ = ["Call", "dense_reason", "parse_call"]



class Call:
    """A routable attention call: q, k, v as [B, H, L, D] views and how to give the output back."""

    __slots__ = ("q", "k", "v", "batch", "seq_len", "heads", "head_dim", "flat")


def parse_call(spec: LayerSpec, txt_len: int, n_img: int, args: tuple, kwargs: dict, ref_len: int = 0) -> Call | Reason:
    """[B, H, L, D] views of a routable call with L = text + image + reference tokens, or why it is not one."""
    if len(args) < 3 or len(args) > 4:
        return Reason("arguments", f"unexpected attention call with {len(args)} positional arguments")
    q, k, v = args[0], args[1], args[2]
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    if kwargs.get("mask") is not None:
        return Reason("mask", "an attention mask is present")
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
    c = Call()
    c.q, c.k, c.v = q, k, v
    c.batch, c.seq_len, c.heads, c.head_dim, c.flat = batch, seq_len, heads, head_dim, flat
    return c


def dense_reason(spec: LayerSpec, txt_len: int, n_img: int, args: tuple, kwargs: dict, ref_len: int = 0) -> str | None:
    """Why an attention call of layer `spec` (forward with `txt_len` text and `n_img` image tokens) must run the
    host's dense attention, or None when the plan can run it. `args`/`kwargs` are what the host passes to its
    attention backend: Flux q, k, v [B, H, L, D] with ``skip_reshape=True``, SD3 [B, L, H·D] with ``heads=``.
    The reason's `.kind` groups warnings. Pure: no state, no host import."""
    r = parse_call(spec, 0 if spec.image_only else txt_len, n_img, args, kwargs, ref_len)
    return r if isinstance(r, Reason) else None
