"""The public op `arrow_attention` (torch.ops.dfav2.arrow_attention / arrow_attention_out): the reference against a
float64 definition, the op's semantics (skipped heads, in-place form, layouts), torch.compile(fullgraph=True) and
torch.library.opcheck, fallbacks for what the kernel cannot take, caller errors.

On a machine without CUDA the op runs the Triton kernel through the interpreter (TRITON_INTERPRET=1, set here as the
other kernel tests do); the reference is checked on its own. GPU (`-m gpu`): the op on CUDA at real sizes."""

from __future__ import annotations

import importlib
import logging
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dfav2.kernels import WINDOW_FULL, WINDOW_SKIP, arrow_attention, arrow_attention_reference, head_table  # noqa: E402
from dfav2.kernels import attention as api  # noqa: E402

try:
    import dfav2.kernels.arrow_triton as arrow_triton  # noqa: E402

    importlib.reload(arrow_triton)  # re-decorate the kernel under the interpreter setting chosen above
except ImportError:  # pragma: no cover - no triton: the op runs the reference everywhere
    arrow_triton = None

FULL, SKIP = WINDOW_FULL, WINDOW_SKIP
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def naive(q, k, v, windows, txt_len, scale=None):
    """float64 masked softmax of [B, H, L, D] inputs; skipped heads are NaN (compared separately)."""
    q, k, v = (x.double() for x in (q, k, v))
    b, h, seq, d = q.shape
    i = torch.arange(seq, device=q.device)
    out = torch.full_like(q, float("nan"))
    for head, w in enumerate(windows):
        if w == SKIP:
            continue
        s = q[:, head] @ k[:, head].transpose(-1, -2) * (scale if scale is not None else d ** -0.5)
        if w != FULL:
            keep = (i[:, None] < txt_len) | (i[None, :] < txt_len) | ((i[:, None] - i[None, :]).abs() <= w)
            s = s.masked_fill(~keep, float("-inf"))
        out[:, head] = torch.softmax(s, -1) @ v[:, head]
    return out


def make(b, h, seq, d, layout, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "bhld":
        return [torch.randn(b, h, seq, d, generator=g).to(device, dtype) for _ in range(3)]
    return [torch.randn(b, seq, h * d, generator=g).to(device, dtype) for _ in range(3)]


def bhld(x, h, layout):
    return x if layout == "bhld" else x.unflatten(-1, (h, x.shape[-1] // h)).transpose(1, 2)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def windows_for(h, n, rng):
    pool = [FULL, SKIP, 0, 1, max(n // 16, 0), n // 2, n + 3]
    ws = [rng.choice(pool) for _ in range(h)]
    ws[0], ws[-1] = FULL, SKIP
    return ws


@pytest.mark.parametrize("layout", ["bhld", "blhd_flat"])
@pytest.mark.parametrize("t,n", [(0, 9), (1, 1), (5, 40), (13, 70)])
def test_reference_matches_float64_definition(layout, t, n):
    h, d = 4, 16
    rng = random.Random(t * 100 + n)
    ws = windows_for(h, n, rng)
    q, k, v = make(2, h, t + n, d, layout, seed=t + n)
    out = arrow_attention_reference(q, k, v, head_table(ws, "cpu"), t, layout=layout, scale=0.3)
    ref = naive(*(bhld(x, h, layout) for x in (q, k, v)), ws, t, scale=0.3)
    ob = bhld(out, h, layout)
    live = [i for i, w in enumerate(ws) if w != SKIP]
    assert rel(ob[:, live], ref[:, live]) <= 1e-5
    assert torch.equal(ob[:, [h - 1]], torch.zeros_like(ob[:, [h - 1]]))  # skipped: zeros (functional form)
    # in-place form: skipped heads keep what `out` held, the others are overwritten
    held = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    res = arrow_attention_reference(q, k, v, head_table(ws, "cpu"), t, layout=layout, scale=0.3, out=held.clone())
    rb, hb = bhld(res, h, layout), bhld(held, h, layout)
    assert torch.equal(rb[:, [h - 1]], hb[:, [h - 1]])
    assert rel(rb[:, live], ref[:, live]) <= 1e-5


@pytest.mark.parametrize("layout", ["bhld", "blhd_flat"])
@pytest.mark.parametrize("t,n,d", [(0, 1, 64), (1, 30, 64), (7, 33, 128)])
def test_op_functional_and_in_place(layout, t, n, d):
    h = 3
    ws = [FULL, max(n // 8, 0), SKIP]
    q, k, v = make(1, h, t + n, d, layout, seed=n + d)
    table = head_table(ws, "cpu")
    ref = naive(*(bhld(x, h, layout) for x in (q, k, v)), ws, t)
    out = arrow_attention(q, k, v, table, t, layout=layout)
    ob = bhld(out, h, layout)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(ob[:, :2], ref[:, :2]) <= 1e-5
    assert torch.equal(ob[:, 2], torch.zeros_like(ob[:, 2]))
    held = torch.full_like(q, 7.0)
    res = arrow_attention(q, k, v, table, t, layout=layout, out=held)
    assert res is held
    hb = bhld(held, h, layout)
    assert torch.all(hb[:, 2] == 7.0) and rel(hb[:, :2], ref[:, :2]) <= 1e-5
    # the ops themselves (what torch.compile records) give the same result as the eager call
    via_op = torch.ops.dfav2.arrow_attention(q, k, v, table, t, layout, None)
    assert torch.equal(via_op, out)


def test_torch_compile_fullgraph_traces_the_op():
    h, t, n, d = 4, 5, 27, 16
    q, k, v = make(2, h, t + n, d, "bhld", seed=3)
    cached = torch.randn(2, h, t + n, d, generator=torch.Generator().manual_seed(4))
    table = head_table([FULL, 6, SKIP, 0], "cpu")

    def layer(q, k, v, table, cached):
        # functional form, then the in-place form on a buffer that holds a cached head: one node each
        a = arrow_attention(q * 1.5, k, v, table, t, scale=0.2)
        buf = cached.clone()
        arrow_attention(q, k, v, table, t, out=buf)
        return a + buf

    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    got = compiled(q, k, v, table, cached)
    want = layer(q, k, v, table, cached)
    assert counter.frame_count == 1  # one graph, no breaks
    targets = {str(node.target).removesuffix(".default") for g in counter.graphs for node in g.graph.nodes}
    assert {"dfav2.arrow_attention", "dfav2.arrow_attention_out"} <= targets, targets
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    got2 = compiled(q, k, v, table, cached * 2)  # new data, same graph
    assert counter.frame_count == 1
    assert torch.allclose(got2, layer(q, k, v, table, cached * 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["bhld", "blhd_flat"])
def test_opcheck(layout):
    h, t, n, d = 3, 4, 21, 16
    q, k, v = make(1, h, t + n, d, layout, seed=5)
    table = head_table([FULL, 3, SKIP], "cpu")
    torch.library.opcheck(torch.ops.dfav2.arrow_attention.default, (q, k, v, table, t, layout, None))
    out = torch.randn_like(q)
    torch.library.opcheck(torch.ops.dfav2.arrow_attention_out.default, (q, k, v, table, t, layout, 0.25, out))


@pytest.mark.parametrize("d,dtype", [(24, torch.float32), (16, torch.float64)])
def test_op_falls_back_to_the_reference_for_what_the_kernel_cannot_take(d, dtype):
    h, t, n = 3, 5, 30
    q, k, v = make(2, h, t + n, d, "bhld", dtype=dtype, seed=d)
    assert api.kernel_unsupported(q, k, v, h) is not None
    ws = [FULL, 4, SKIP]
    out = arrow_attention(q, k, v, head_table(ws, "cpu"), t)
    ref = naive(q, k, v, ws, t)
    assert rel(out[:, :2], ref[:, :2]) <= 1e-5 and torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))


def test_engine_routes_what_the_kernel_cannot_take_with_one_warning(monkeypatch, caplog):
    from dfav2.kernels import FULL as M_FULL
    from dfav2.kernels import LayerDecision, arrow, engine, headwise_attention

    monkeypatch.setattr(engine, "_warned", set())
    decision = LayerDecision((M_FULL, arrow(8), arrow(2)))
    q, k, v = make(1, 3, 45, 24, "bhld", seed=9)  # head_dim 24: no kernel for it
    with caplog.at_level(logging.WARNING, logger=engine.__name__):
        for _ in range(3):
            out, hit = headwise_attention(q, k, v, 5, decision, backend="triton")
    ref, _ = headwise_attention(q, k, v, 5, decision, backend="sdpa")
    assert hit and torch.equal(out, ref)
    said = [r for r in caplog.records if "cannot run" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


def test_caller_errors_raise():
    q, k, v = make(1, 2, 10, 16, "bhld")
    table = head_table([FULL, FULL], "cpu")
    with pytest.raises(ValueError, match="layout"):
        arrow_attention(q, k, v, table, 0, layout="bshd")
    with pytest.raises(ValueError, match="int32"):
        arrow_attention(q, k, v, table.long(), 0)
    with pytest.raises(ValueError, match="txt_len"):
        arrow_attention(q, k, v, table, 11)
    with pytest.raises(ValueError, match="heads"):
        arrow_attention(q, k, v, table[:1], 0)
    with pytest.raises(ValueError, match="one shape"):
        arrow_attention(q, k[:, :, :9], v[:, :, :9], table, 0)
    with pytest.raises(ValueError, match="out"):
        arrow_attention(q, k, v, table, 0, out=torch.empty(1, 2, 10, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("layout,h,t,n,d", [("bhld", 24, 256, 4096, 128), ("blhd_flat", 38, 154, 4096, 64),
                                            ("bhld", 5, 1, 1, 64), ("blhd_flat", 3, 333, 1000, 128)])
def test_gpu_op_matches_reference_and_compiles(layout, h, t, n, d):
    rng = random.Random(h + t + n)
    ws = windows_for(h, n, rng)
    q, k, v = make(1, h, t + n, d, layout, dtype=torch.bfloat16, device="cuda", seed=7)
    table = head_table(ws, "cuda")
    out = arrow_attention(q, k, v, table, t, layout=layout)
    ref = arrow_attention_reference(q.float(), k.float(), v.float(), table, t, layout=layout)
    ob, rb = bhld(out, h, layout), bhld(ref, h, layout)
    live = [i for i, w in enumerate(ws) if w != SKIP]
    assert rel(ob[:, live], rb[:, live]) <= 1e-2
    assert torch.equal(ob[:, [h - 1]], torch.zeros_like(ob[:, [h - 1]]))
    compiled = torch.compile(lambda q, k, v: arrow_attention(q, k, v, table, t, layout=layout) * 2, fullgraph=True)
    assert torch.equal(compiled(q, k, v), out * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("d,dtype", [(96, torch.bfloat16), (64, torch.float64)])
def test_gpu_fallbacks_never_raise(d, dtype):
    from dfav2.kernels import FULL as M_FULL
    from dfav2.kernels import LayerDecision, arrow, headwise_attention

    q, k, v = make(1, 4, 77 + 1000, d, "bhld", dtype=dtype, device="cuda", seed=d)
    decision = LayerDecision((M_FULL, arrow(8), arrow(16), M_FULL))
    out, _ = headwise_attention(q, k, v, 77, decision, backend="auto")
    ref, _ = headwise_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), 77, decision, backend="sdpa")
    assert rel(out.cpu(), ref) <= 1e-2
    ws = [FULL, 62, 31, SKIP]
    o2 = arrow_attention(q, k, v, head_table(ws, "cuda"), 77)
    assert rel(o2[:, :3].cpu(), naive(q.cpu(), k.cpu(), v.cpu(), ws, 77)[:, :3]) <= 1e-2


def test_second_import_under_another_name_reuses_the_ops():
    # ComfyUI imports the pack under its folder name while tests (or a second copy) import it as `dfav2`: the ops
    # are registered once per process and the second copy uses them
    import importlib.util
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("dfav2_second_copy", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dfav2_second_copy"] = mod
    try:
        spec.loader.exec_module(mod)
        from dfav2_second_copy.kernels import arrow_attention as again

        q, k, v = make(1, 2, 12, 16, "bhld", seed=12)
        table = head_table([FULL, 2], "cpu")
        assert torch.equal(again(q, k, v, table, 3), arrow_attention(q, k, v, table, 3))
    finally:
        for name in [n for n in sys.modules if n == "dfav2_second_copy" or n.startswith("dfav2_second_copy.")]:
            del sys.modules[name]
