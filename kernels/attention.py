"""The public attention API: head-wise arrow attention of one layer in one call, as a PyTorch custom op.

```python
from dfav2.kernels import WINDOW_FULL, WINDOW_SKIP, arrow_attention
table = torch.tensor([WINDOW_FULL, 256, 128, WINDOW_SKIP], dtype=torch.int32, device=q.device)   # one per head
o = arrow_attention(q, k, v, table, txt_len, layout="bhld")     # q, k, v [B, H, L, D], text tokens first
```

FP8 heads: an optional int32 ``[H]`` `head_quant` table (1 = FP8, kernels/quant.py; 0 = the inputs' dtype) goes to
the kernel where it has an FP8 path and the GPU has FP8 tensor cores (compute capability >= 8.9); everywhere else
(CPU, older GPUs, the reference) FP8 heads run in the inputs' dtype, with one warning per reason and process.

`arrow_attention` is registered as ``torch.ops.dfav2.arrow_attention`` (and ``dfav2::arrow_attention_out`` for the
in-place form) with fake (meta) implementations, so ``torch.compile`` (ComfyUI's TorchCompileModel included) traces
a model that calls it as one opaque node per call, without graph breaks. On CUDA it runs the fused Triton kernel
(kernels/arrow_triton.py); inputs the kernel does not take (another head_dim, dtype or device, more than
`MAX_HEADS` heads, ...) and every non-CUDA device run the exact reference, masked SDPA per window
(`arrow_attention_reference`), with one warning per reason and process. Under ``TRITON_INTERPRET=1`` CPU tensors
run the kernel through Triton's interpreter (how the CPU tests check the kernel behind this very op).
Forward only (inference): there is no autograd formula.
"""

import functools
import logging
import math
import os
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from .masks import arrow_keep
from .methods import WINDOW_FULL, WINDOW_SKIP
from .quant import fp8_supported

__all__ = ["LAYOUTS", "arrow_attention", "arrow_attention_reference", "fp8_unsupported", "head_table",
           "kernel_unsupported"]

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
           out: Optional[torch.Tensor], quant: Optional[torch.Tensor] = None) -> None:
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
    if quant is not None and (quant.dtype != torch.int32 or quant.shape != table.shape or quant.device != table.device):
        raise ValueError(f"head_quant must be an int32 tensor shaped like head_table ({tuple(table.shape)}) on "
                         f"{table.device}, got {quant.dtype} {tuple(quant.shape)} on {quant.device}")


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
                     out: Optional[torch.Tensor], quant: Optional[torch.Tensor] = None) -> Optional[str]:
    """`_check` (raises on caller errors) and `_kernel_reason` of one call, cached per key: a repeated call costs
    one key build instead of both checks (the host path of every attention call)."""
    key = (layout, txt_len, _interpreting(), q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype,
           k.device, v.shape, v.stride(), v.dtype, v.device, table.shape, table.dtype, table.device,
           None if out is None else (out.shape, out.dtype, out.device),
           None if quant is None else (quant.shape, quant.dtype, quant.device))
    try:
        return _CHECKED[key]
    except KeyError:
        pass
    _check(q, k, v, table, txt_len, layout, out, quant)
    why = _kernel_reason(q, k, v, table.shape[0], layout)
    if len(_CHECKED) >= _VERDICTS_MAX:
        _CHECKED.clear()
    _CHECKED[key] = why
    return why


def _warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        log.warning("DiTFastAttnV2: the arrow kernel cannot run %s; using the masked-SDPA reference (warned once)", why)


def _warn_fp8_once(why: str, dtype: torch.dtype) -> None:
    key = f"fp8: {why}"
    if key not in _warned:
        _warned.add(key)
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))
        log.warning("DiTFastAttnV2: %s; FP8 heads run in %s (warned once)", why, name)


@functools.lru_cache(maxsize=64)
def _fp8_reason(device: torch.device) -> Optional[str]:
    """Why the kernel cannot compute FP8 heads on `device` (None: it can), given that it runs the call. Cached per
    device: the hot path of every call with a quant table."""
    return None if fp8_supported(device) else "no FP8 tensor cores here"


def fp8_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    layout: str = "bhld") -> Optional[str]:
    """Why FP8 heads of this call would not run in FP8 (None: `arrow_attention` with `head_quant` runs them in FP8):
    the kernel cannot take the call (`kernel_unsupported`), the device has no FP8 tensor cores (CPU, CUDA compute
    capability < 8.9; `quant.fp8_supported`). From shapes and devices only."""
    why = kernel_unsupported(q, k, v, heads, layout)
    if why is not None:
        return f"the arrow kernel cannot run {why}"
    return _fp8_reason(q.device)


def _bhld(x: torch.Tensor, heads: int, layout: str) -> torch.Tensor:
    """A [B, H, L, D] view of x (no copy)."""
    if layout == "bhld":
        return x
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def arrow_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_table: torch.Tensor,
                              txt_len: int, *, layout: str = "bhld", scale: Optional[float] = None,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact reference of `arrow_attention` (same arguments, without `head_quant`: every head in the inputs'
    dtype, which is how FP8 heads run where FP8 cannot; `quant.fp8_attention_reference` is the FP8 reference): per
    distinct window one SDPA call on that window's heads with the token-exact keep mask (`masks.arrow_keep`; none
    for full heads). Reads `head_table` on the host (a device sync on CUDA) and builds an L x L mask per distinct
    arrow window: a fallback, not a fast path. Skipped heads: zeros when `out` is None, untouched otherwise."""
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
         scale: Optional[float], out: torch.Tensor, zero_skip: bool, quant: Optional[torch.Tensor] = None) -> None:
    """Both ops' implementation: the kernel where it can run, else the reference (warned once per reason)."""
    why = kernel_unsupported(q, k, v, table.shape[0], layout)
    _execute(q, k, v, table, txt_len, layout, scale, out, zero_skip, why, quant)


def _execute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, txt_len: int, layout: str,
             scale: Optional[float], out: torch.Tensor, zero_skip: bool, why: Optional[str],
             quant: Optional[torch.Tensor] = None) -> None:
    """`_run` with the verdict known (`why`: None = the kernel runs it). `quant`: the head_quant table or None."""
    if why is None:
        from .arrow_triton import arrow_attention_triton

        extra = {}
        if quant is not None:
            # Not read on the host (no sync): a table given where FP8 cannot run is said once, whatever it holds.
            fp8_why = _fp8_reason(q.device)
            if fp8_why is None:
                extra["head_quant"] = quant
            else:
                _warn_fp8_once(fp8_why, q.dtype)
        arrow_attention_triton(q, k, v, table, txt_len, layout=layout, sm_scale=scale, out=out, zero_skip=zero_skip,
                               **extra)
        return
    if q.device.type == "cuda":  # CPU runs the reference by design; on CUDA it is a fallback worth saying
        _warn_once(why)
    if quant is not None and bool(quant.any()):  # the reference reads head_table on the host anyway
        _warn_fp8_once("no FP8 tensor cores here" if not fp8_supported(q.device) else f"the arrow kernel cannot run {why}",
                       q.dtype)
    if zero_skip:
        out.copy_(arrow_attention_reference(q, k, v, table, txt_len, layout=layout, scale=scale))
    else:
        arrow_attention_reference(q, k, v, table, txt_len, layout=layout, scale=scale, out=out)


def _register() -> None:
    """Define the two ops once per process (the pack may be imported under two module names, e.g. by ComfyUI and
    by tests: the second import reuses the first registration, whose code is the same)."""
    if hasattr(torch.ops.dfav2, "arrow_attention"):
        return

    # head_quant is the last argument, with a default, so calls written before it keep their meaning.
    @torch.library.custom_op("dfav2::arrow_attention", mutates_args=())
    def _arrow(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_table: torch.Tensor, txt_len: int,
               layout: str, scale: Optional[float], head_quant: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.empty_like(q)
        _run(q, k, v, head_table, txt_len, layout, scale, out, zero_skip=True, quant=head_quant)
        return out

    @_arrow.register_fake
    def _arrow_fake(q, k, v, head_table, txt_len, layout, scale, head_quant=None):
        return torch.empty_like(q)

    @torch.library.custom_op("dfav2::arrow_attention_out", mutates_args=("out",))
    def _arrow_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_table: torch.Tensor, txt_len: int,
                   layout: str, scale: Optional[float], out: torch.Tensor,
                   head_quant: Optional[torch.Tensor] = None) -> None:
        _run(q, k, v, head_table, txt_len, layout, scale, out, zero_skip=False, quant=head_quant)

    @_arrow_out.register_fake
    def _arrow_out_fake(q, k, v, head_table, txt_len, layout, scale, out, head_quant=None):
        return None


_register()


def arrow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_table: torch.Tensor, txt_len: int, *,
                    layout: str = "bhld", scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
                    head_quant: Optional[torch.Tensor] = None) -> torch.Tensor:
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
    head_quant : Tensor, optional
        int32 ``[H]`` like `head_table` (same device), per head `QUANT_NONE` (0): the inputs' dtype, `QUANT_FP8`
        (1): FP8 (the scheme of kernels/quant.py). FP8 heads run in FP8 only on the kernel with an FP8 path on a GPU
        with FP8 tensor cores (`fp8_unsupported` says why not); elsewhere in the inputs' dtype, warned once. None:
        every head in the inputs' dtype.

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
        why = _checked_verdict(q, k, v, head_table, txt_len, layout, out, head_quant)
        if out is None:
            out = torch.empty_like(q)
            _execute(q, k, v, head_table, txt_len, layout, scale, out, True, why, head_quant)
        else:
            _execute(q, k, v, head_table, txt_len, layout, scale, out, False, why, head_quant)
        return out
    _check(q, k, v, head_table, txt_len, layout, out, head_quant)
    if out is None:
        return torch.ops.dfav2.arrow_attention(q, k, v, head_table, txt_len, layout, scale, head_quant)
    torch.ops.dfav2.arrow_attention_out(q, k, v, head_table, txt_len, layout, scale, out, head_quant)
    return out
