"""The public attention API: head-wise arrow attention of one layer in one call, as a PyTorch custom op.

```python
from dfav2.kernels import WINDOW_FULL, WINDOW_SKIP, arrow_attention
table = torch.tensor([WINDOW_FULL, 256, 128, WINDOW_SKIP], dtype=torch.int32, device=q.device)   # one per head
o = arrow_attention(q, k, v, table, txt_len, layout="bhld")     # q, k, v [B, H, L, D], text tokens first
```

`arrow_attention` is registered as ``torch.ops.dfav2.arrow_attention`` (and ``dfav2::arrow_attention_out`` for the
in-place form) with fake (meta) implementations, so ``torch.compile`` (ComfyUI's TorchCompileModel included) traces
a model that calls it as one opaque node per call, without graph breaks. On CUDA it runs the fused Triton kernel
(kernels/arrow_triton.py); inputs the kernel does not take (another head_dim, dtype or device, more than
`MAX_HEADS` heads, ...) and every non-CUDA device run the exact reference, masked SDPA per window
(`arrow_attention_reference`), with one warning per reason and process. Under ``TRITON_INTERPRET=1`` CPU tensors
run the kernel through Triton's interpreter (how the CPU tests check the kernel behind this very op).
Forward only (inference): there is no autograd formula.
"""

import logging
import math
import os
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from .masks import arrow_keep
from .methods import WINDOW_FULL, WINDOW_SKIP

__all__ = ["LAYOUTS", "arrow_attention", "arrow_attention_reference", "head_table", "kernel_unsupported"]

log = logging.getLogger(__name__)

#: ``"bhld"``: q, k, v, out are ``[B, H, L, D]`` (any strides: Flux's views, or SD3's ``[B, L, H, D]`` transposed);
#: ``"blhd_flat"``: ``[B, L, H*D]`` with a contiguous last dim (ComfyUI's SD3 attention input), never copied.
LAYOUTS = ("bhld", "blhd_flat")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set[str] = set()


def head_table(windows: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The int32 ``[H]`` head table of per-head windows (`LayerDecision.windows(n_img)`: `WINDOW_FULL`,
    `WINDOW_SKIP` or a band half-width >= 0) on `device`."""
    return torch.tensor(list(windows), dtype=torch.int32, device=device)


def _geometry(q: torch.Tensor, heads: int, layout: str) -> tuple[int, int, int]:
    """(B, L, D) of q in `layout`."""
    if layout == "bhld":
        return q.shape[0], q.shape[2], q.shape[3]
    return q.shape[0], q.shape[1], q.shape[2] // heads


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, txt_len: int, layout: str,
           out: Optional[torch.Tensor]) -> None:
    """Caller errors (ValueError): what no implementation can run. Shapes and dtypes only, no device sync."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    want = 4 if layout == "bhld" else 3
    if any(x.dim() != want for x in (q, k, v)):
        raise ValueError(f"q, k, v must be {want}-D for layout {layout!r}, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape (Lq == Lk), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if table.dtype != torch.int32 or table.dim() != 1:
        raise ValueError(f"head_table must be a 1-D int32 tensor [H], got {table.dtype} {tuple(table.shape)}")
    if not (q.device == k.device == v.device == table.device):
        raise ValueError(f"q, k, v and head_table must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{table.device}")
    heads = table.shape[0]
    if layout == "bhld" and q.shape[1] != heads:
        raise ValueError(f"head_table has {heads} entries but q has {q.shape[1]} heads")
    if layout == "blhd_flat" and (heads == 0 or q.shape[-1] % heads):
        raise ValueError(f"blhd_flat: last dim {q.shape[-1]} is not a multiple of the {heads} heads in head_table")
    _, seq, _ = _geometry(q, heads, layout)
    if not 0 <= txt_len <= seq:
        raise ValueError(f"txt_len must be in [0, L={seq}], got {txt_len}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got {tuple(out.shape)}, "
                         f"{out.dtype}, {out.device}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: str) -> Optional[str]:
    if q.device.type != "cuda" and not _interpreting():
        return f"tensors on {q.device.type} (the kernel needs CUDA)"
    try:
        from . import arrow_triton
    except ImportError as exc:  # no Triton (e.g. Windows without triton-windows)
        return f"the Triton kernel is not importable ({exc})"
    return arrow_triton.unsupported_reason(q, k, v, heads, layout)


_VERDICTS: dict[tuple, Optional[str]] = {}
_VERDICTS_MAX = 1024


def kernel_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       layout: str = "bhld") -> Optional[str]:
    """Why the fused kernel cannot run this call (None: it can): no CUDA (and no ``TRITON_INTERPRET=1``), Triton
    not importable, or what the kernel itself refuses (`arrow_triton.unsupported_reason`: head_dim outside
    {16, 32, 64, 128}, dtype, more than `MAX_HEADS` heads, 32-bit row offsets). From shapes, strides, dtypes and
    devices only (no device sync); the verdict is cached per such key (a few µs per call, not tens)."""
    key = (layout, heads, _interpreting(), q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype,
           k.device, v.shape, v.stride(), v.dtype, v.device)
    try:
        return _VERDICTS[key]
    except KeyError:
        pass
    why = _kernel_reason(q, k, v, heads, layout)
    if len(_VERDICTS) >= _VERDICTS_MAX:
        _VERDICTS.clear()
    _VERDICTS[key] = why
    return why


_CHECKED: dict[tuple, Optional[str]] = {}


def _checked_verdict(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, txt_len: int, layout: str,
                     out: Optional[torch.Tensor]) -> Optional[str]:
    """`_check` (raises on caller errors) and `_kernel_reason` of one call, cached per key: a repeated call costs
    one key build instead of both checks (the host path of every attention call)."""
    key = (layout, txt_len, _interpreting(), q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype,
           k.device, v.shape, v.stride(), v.dtype, v.device, table.shape, table.dtype, table.device,
           None if out is None else (out.shape, out.dtype, out.device))
    try:
        return _CHECKED[key]
    except KeyError:
        pass
    _check(q, k, v, table, txt_len, layout, out)
    why = _kernel_reason(q, k, v, table.shape[0], layout)
    if len(_CHECKED) >= _VERDICTS_MAX:
        _CHECKED.clear()
    _CHECKED[key] = why
    return why


def _warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        log.warning("DiTFastAttnV2: the arrow kernel cannot run %s; using the masked-SDPA reference (warned once)", why)


def _bhld(x: torch.Tensor, heads: int, layout: str) -> torch.Tensor:
    """A [B, H, L, D] view of x (no copy)."""
    if layout == "bhld":
        return x
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def arrow_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_table: torch.Tensor,
                              txt_len: int, *, layout: str = "bhld", scale: Optional[float] = None,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact reference of `arrow_attention` (same arguments): per distinct window one SDPA call on that window's
    heads with the token-exact keep mask (`masks.arrow_keep`; none for full heads). Reads `head_table` on the host
    (a device sync on CUDA) and builds an L x L mask per distinct arrow window: a fallback, not a fast path.
    Skipped heads: zeros when `out` is None, untouched otherwise."""
    _check(q, k, v, head_table, int(txt_len), layout, out)
    heads = head_table.shape[0]
    zero_skip = out is None
    if out is None:
        out = torch.empty_like(q)
    qb, kb, vb, ob = (_bhld(x, heads, layout) for x in (q, k, v, out))
    seq = qb.shape[2]
    groups: dict[int, list[int]] = {}
    for h, w in enumerate(head_table.tolist()):
        groups.setdefault(WINDOW_SKIP if w < WINDOW_FULL else w, []).append(h)
    for w, hs in groups.items():
        idx = torch.tensor(hs, dtype=torch.long, device=q.device)
        if w == WINDOW_SKIP:
            if zero_skip:
                ob[:, idx] = 0
            continue
        mask = None if w == WINDOW_FULL else arrow_keep(txt_len, seq, w, q.device)
        ob[:, idx] = F.scaled_dot_product_attention(qb[:, idx], kb[:, idx], vb[:, idx], attn_mask=mask, scale=scale)
    return out


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, txt_len: int, layout: str,
         scale: Optional[float], out: torch.Tensor, zero_skip: bool) -> None:
    """Both ops' implementation: the kernel where it can run, else the reference (warned once per reason)."""
    why = kernel_unsupported(q, k, v, table.shape[0], layout)
    _execute(q, k, v, table, txt_len, layout, scale, out, zero_skip, why)


def _execute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, txt_len: int, layout: str,
             scale: Optional[float], out: torch.Tensor, zero_skip: bool, why: Optional[str]) -> None:
    """`_run` with the verdict known (`why`: None = the kernel runs it)."""
    if why is None:
        from .arrow_triton import arrow_attention_triton

        arrow_attention_triton(q, k, v, table, txt_len, layout=layout, sm_scale=scale, out=out, zero_skip=zero_skip)
        return
    if q.device.type == "cuda":  # CPU runs the reference by design; on CUDA it is a fallback worth saying
        _warn_once(why)
    if zero_skip:
        out.copy_(arrow_attention_reference(q, k, v, table, txt_len, layout=layout, scale=scale))
    else:
        arrow_attention_reference(q, k, v, table, txt_len, layout=layout, scale=scale, out=out)


def _register() -> None:
    """Define the two ops once per process (the pack may be imported under two module names, e.g. by ComfyUI and
    by tests: the second import reuses the first registration, whose code is the same)."""
    if hasattr(torch.ops.dfav2, "arrow_attention"):
        return

    @torch.library.custom_op("dfav2::arrow_attention", mutates_args=())
    def _arrow(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_table: torch.Tensor, txt_len: int,
               layout: str, scale: Optional[float]) -> torch.Tensor:
        out = torch.empty_like(q)
        _run(q, k, v, head_table, txt_len, layout, scale, out, zero_skip=True)
        return out

    @_arrow.register_fake
    def _arrow_fake(q, k, v, head_table, txt_len, layout, scale):
        return torch.empty_like(q)

    @torch.library.custom_op("dfav2::arrow_attention_out", mutates_args=("out",))
    def _arrow_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_table: torch.Tensor, txt_len: int,
                   layout: str, scale: Optional[float], out: torch.Tensor) -> None:
        _run(q, k, v, head_table, txt_len, layout, scale, out, zero_skip=False)

    @_arrow_out.register_fake
    def _arrow_out_fake(q, k, v, head_table, txt_len, layout, scale, out):
        return None


_register()


def arrow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_table: torch.Tensor, txt_len: int, *,
                    layout: str = "bhld", scale: Optional[float] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head-wise arrow attention of one layer (DiTFastAttnV2): per head full, arrow or skipped, one launch on CUDA.

    Parameters
    ----------
    q, k, v : Tensor
        ``layout="bhld"``: ``[B, H, L, D]``, any strides. ``layout="blhd_flat"``: ``[B, L, H*D]``, last dim
        contiguous. One shape and floating dtype, one device. Text first: tokens ``0 .. T-1`` are text,
        ``T .. L-1`` image (``N = L - T``). The kernel takes float16 / bfloat16 (float32: exact products, tests),
        ``D`` in {16, 32, 64, 128} and at most `MAX_HEADS` heads; anything else runs the reference.
    head_table : Tensor
        int32 ``[H]`` on the same device, one window per head in the vocabulary of `kernels.methods`:
        `WINDOW_FULL` (-1) full attention; `WINDOW_SKIP` (-2) not computed (a cached head); ``w >= 0`` arrow with
        band half-width ``w``: ``keep(q, k) = q < T or k < T or |q - k| <= w``, i.e. text rows and columns full,
        image->image inside the band (``w = N // (2 f)`` for arrow/f, `HeadMethod.window`). Never read on the host
        by the kernel (no sync; CUDA-graph safe).
    txt_len : int
        ``T``, 0 <= T <= L.
    layout : str
        ``"bhld"`` or ``"blhd_flat"`` (`LAYOUTS`); the output has q's layout.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    out : Tensor, optional
        Written in place (q's shape, dtype, device); skipped heads keep what it held (e.g. their cached output).
        Without `out` a new tensor is returned whose skipped heads are zeros.

    Returns
    -------
    Tensor of q's shape, layout and dtype (`out` itself when given).
    """
    txt_len = int(txt_len)
    if scale is not None:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if type(q) is torch.Tensor and not torch.compiler.is_compiling():
        # eager call on plain tensors: the ops' implementation directly (the custom-op dispatcher costs tens of µs
        # of host time per call; the result is the same function)
        why = _checked_verdict(q, k, v, head_table, txt_len, layout, out)
        if out is None:
            out = torch.empty_like(q)
            _execute(q, k, v, head_table, txt_len, layout, scale, out, True, why)
        else:
            _execute(q, k, v, head_table, txt_len, layout, scale, out, False, why)
        return out
    _check(q, k, v, head_table, txt_len, layout, out)
    if out is None:
        return torch.ops.dfav2.arrow_attention(q, k, v, head_table, txt_len, layout, scale)
    torch.ops.dfav2.arrow_attention_out(q, k, v, head_table, txt_len, layout, scale, out)
    return out
