"""The calibrator's metric at memory speed: `kernels.head_error.head_sq_err` (Triton on CUDA, torch elsewhere) and
`calibration.metric.HeadRse`, against float64.

CPU tier: the torch path, and the Triton kernel under Triton's interpreter (TRITON_INTERPRET=1 when there is no
CUDA) at odd sizes and strides. GPU tier (`-m gpu`): real sizes, the kernel against float64 and bit-for-bit
deterministic.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from dfav2.calibration.metric import HeadRse, head_rse  # noqa: E402


def _load():
    # the file itself, decorated under the interpreter setting above whatever imported the package before
    spec = importlib.util.spec_from_file_location("_dfav2_head_error_under_test",
                                                  pathlib.Path(__file__).resolve().parents[1] / "kernels" / "head_error.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


he = _load()
_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp = pytest.mark.skipif(not _INTERP, reason="interpreter tier: set TRITON_INTERPRET=1 (auto when no CUDA)")


def gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available() or _INTERP,
                                              reason="needs CUDA (and TRITON_INTERPRET unset)")(fn))


def _pair(B, H, L, D, dtype, layout, device, seed):
    """Two attention-output-like tensors (a reference and a candidate close to it), [B, H, L, D] views; 'blhd': views
    of [B, L, H, D] storage (the host's layout), 'sliced': every other head of a wider tensor."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(B, H, L, D, generator=g) * (0.5 + torch.rand(1, H, 1, 1, generator=g)) + torch.randn(1, H, 1, D, generator=g)
    cand = ref + 0.05 * torch.randn(B, H, L, D, generator=g)
    out = []
    for x in (ref, cand):
        x = x.to(dtype)
        if layout == "blhd":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == "sliced":
            x = torch.stack([x, torch.zeros_like(x)], 2).flatten(1, 2)[:, ::2]
        out.append(x.to(device))
    return out


def _exact(a, b):
    return (a.double() - b.double()).square().sum((0, 2, 3))


SHAPES = [(1, 1, 1, 64), (2, 3, 33, 128), (1, 2, 530, 72), (3, 2, 1025, 64)]


@pytest.mark.parametrize("B,H,L,D", SHAPES)
@pytest.mark.parametrize("layout", ["bhld", "blhd", "sliced"])
def test_torch_path_against_float64(B, H, L, D, layout):
    ref, cand = _pair(B, H, L, D, torch.bfloat16, layout, "cpu", 1)
    got = he.head_sq_err(cand, ref, use_triton=False)
    assert got.dtype == torch.float32 and got.shape == (H,)
    torch.testing.assert_close(got.double(), _exact(cand, ref), rtol=1e-5, atol=0)


@interp
@pytest.mark.parametrize("B,H,L,D", SHAPES)
@pytest.mark.parametrize("layout", ["bhld", "blhd", "sliced"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_interpreter_against_float64(B, H, L, D, layout, dtype):
    ref, cand = _pair(B, H, L, D, dtype, layout, "cpu", 2)
    got = he.head_sq_err(cand, ref, use_triton=True)
    torch.testing.assert_close(got.double(), _exact(cand, ref), rtol=1e-5, atol=0)
    assert torch.equal(he.head_sq_err(ref, ref, use_triton=True), torch.zeros(H))


def test_bad_input_names_the_problem():
    a = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="one shape"):
        he.head_sq_err(a, torch.zeros(1, 2, 3, 5))
    with pytest.raises(ValueError, match="one shape"):
        he.head_sq_err(a[0], a[0])
    with pytest.raises(ValueError, match="reference"):
        HeadRse(a[0])
    with pytest.raises(ValueError, match="one shape"):
        HeadRse(a)(torch.zeros(1, 2, 3, 5))


def test_a_failing_kernel_falls_back_to_torch_once_with_a_warning(monkeypatch):
    class Broken:
        calls = 0

        def __getitem__(self, grid):
            Broken.calls += 1
            raise RuntimeError("no such GPU")

    monkeypatch.setattr(he, "_sq_err_kernel", Broken())
    monkeypatch.setattr(he, "_kernel_ok", True)
    ref, cand = _pair(2, 3, 33, 64, torch.bfloat16, "bhld", "cpu", 5)
    with pytest.warns(RuntimeWarning, match="measuring in torch"):
        got = he.head_sq_err(cand, ref, use_triton=True)
    torch.testing.assert_close(got.double(), _exact(cand, ref), rtol=1e-5, atol=0)
    assert he._kernel_ok is False and Broken.calls == 1
    monkeypatch.setattr(he.torch.Tensor, "is_cuda", property(lambda self: True))  # auto mode no longer tries it
    torch.testing.assert_close(he.head_sq_err(cand, ref).double(), _exact(cand, ref), rtol=1e-5, atol=0)
    assert Broken.calls == 1


@pytest.mark.parametrize("B,H,L,D", SHAPES[1:])
def test_head_rse_is_the_definition_in_float64(B, H, L, D):
    ref, cand = _pair(B, H, L, D, torch.bfloat16, "blhd", "cpu", 3)
    r = ref.double()
    want = (cand.double() - r).square().mean((0, 2, 3)) / r.var((0, 2, 3), correction=0)
    torch.testing.assert_close(head_rse(cand, ref).double(), want, rtol=1e-4, atol=0)
    meter = HeadRse(ref)  # one reference, several candidates: the same numbers as head_rse each time
    for s in range(3):
        c2 = ref + (s + 1) * 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(s)).to(ref.dtype)
        assert torch.equal(meter(c2), head_rse(c2, ref))


@gpu
@pytest.mark.parametrize("B,H,L,D", [(4, 24, 4352, 128), (1, 24, 16640, 128), (2, 24, 4429, 64), (1, 3, 77, 96)])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_gpu_kernel_against_float64_and_deterministic(B, H, L, D, layout):
    ref, cand = _pair(B, H, L, D, torch.bfloat16, layout, "cuda", 4)
    got = he.head_sq_err(cand, ref)  # auto: the Triton kernel on CUDA
    torch.testing.assert_close(got.double(), _exact(cand, ref), rtol=1e-5, atol=0)
    assert all(torch.equal(got, he.head_sq_err(cand, ref)) for _ in range(3))
    torch.testing.assert_close(head_rse(cand, ref).cpu(), head_rse(cand.cpu(), ref.cpu()), rtol=1e-5, atol=0)
