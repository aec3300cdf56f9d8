"""DFAApply next to other users of the attention override slot, inside a real ComfyUI (in-process, CPU): the core
`ModelAttentionBackend` node (ComfyUI >= 0.33), the core "Model Sparse Attention" node's install protocol (it
chains the previous override and re-installs itself on top at every ON_PREPARE_STATE), attention tensor
containers and a checkpoint's `preferred_attention` (host.md §0.1). Either node order must give the same result:
DFA routes every call and the other node serves the heads the plan keeps full, named in the run summary."""

import logging

import pytest

import dfa_hostenv as H

H.skip_module_without_host()
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("host")]

import torch  # noqa: E402

from dfav2.nodes import adapter as A  # noqa: E402
from dfav2.nodes import hooks as K  # noqa: E402
from dfav2.nodes import host as HS  # noqa: E402


# ------------------------------------------------------------------------------------ Model Attention Backend


@pytest.fixture
def attention_backend(monkeypatch):
    """The core ModelAttentionBackend node with a counting spy behind its "pytorch attention" choice."""
    try:
        from comfy_extras.nodes_model_advanced import ModelAttentionBackend
    except ImportError:
        ModelAttentionBackend = None
    if ModelAttentionBackend is None:
        pytest.skip(f"ComfyUI {H.host_version()} has no ModelAttentionBackend node (added in 0.33)")
    import comfy.ldm.modules.attention as attention

    real = attention.get_attention_function("pytorch")
    calls = []

    def attention_pytorch(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setitem(attention.REGISTERED_ATTENTION_FUNCTIONS, "pytorch", attention_pytorch)

    def apply(model):
        return ModelAttentionBackend().patch(model, "pytorch attention")[0]

    apply.calls = calls
    return apply


@pytest.mark.parametrize("family", ["flux", "sd35m"])
def test_model_attention_backend_in_either_order(models, family, attention_backend, caplog):
    """Before or after DFAApply, ModelAttentionBackend serves the full heads and DFA routes every call: the same
    latents in both orders, bit-identical to the backend alone with an all-full plan; said once per run."""
    if family == "flux":
        H.need_flux()
    model = models[family]
    full_plan, ac_plan = H.plan_pair(model)
    ref = H.ksample(model, family, cfg=3.5)
    alone = H.ksample(attention_backend(model), family, cfg=3.5)
    n_layers = len(full_plan.model.layers)
    assert len(attention_backend.calls) == 4 * n_layers  # 4 steps of cond+uncond in one batch
    outs = {}
    for plan_name, plan in (("full", full_plan), ("mixed", ac_plan)):
        for order in ("before", "after"):
            attention_backend.calls.clear()
            if order == "before":
                m = A.apply_dfa(attention_backend(model), plan=plan)
            else:
                m = attention_backend(A.apply_dfa(model, plan=plan))
                assert A.TO_PATCH in m.model_options["transformer_options"]
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="dfav2.nodes"):
                outs[plan_name, order] = H.ksample(m, family, cfg=3.5)
            s = H.last_summary(m)
            assert s.fallbacks == {} and s.attention_calls == 4 * n_layers, s.line()
            assert s.dense_by == "Model Attention Backend (attention_pytorch)", s.dense_by
            notes = [r.getMessage() for r in caplog.records if "routes every attention call" in r.getMessage()]
            assert len(notes) == 1 and f"placed {order} DFAApply" in notes[0], notes
            assert attention_backend.calls, "the backend node served no call"
            if plan_name == "mixed":
                assert s.engine_calls > 0 and s.heads["arrow"] > 0
    assert torch.equal(outs["full", "before"], alone) and torch.equal(outs["full", "after"], alone)
    assert torch.equal(outs["mixed", "before"], outs["mixed", "after"])
    assert not torch.equal(outs["mixed", "before"], alone) and torch.isfinite(ref).all()


# ------------------------------------------------------------------------------------- Model Sparse Attention


class SparseStandIn:
    """The core "Model Sparse Attention" node's slot protocol (comfy_extras/nodes_sparse_attention.py, after 0.33):
    its override chains the override that was on the hook, it is installed at patch time and again from
    ON_PREPARE_STATE every step unless already on top. On CPU the real node declines every call ("not on CUDA");
    this stand-in takes every call it gets and runs a visibly different attention (q scaled by 0.9), as the real
    kernel would on an eligible GPU call, so a silent bypass of DFA would show."""

    def __init__(self):
        self.installed = set()
        self.taken = 0

    def make_override(self, previous):
        def override(func, q, k, v, heads, **kwargs):
            self.taken += 1
            return func(q * 0.9, k, v, heads, **kwargs)

        override.previous = previous
        return override

    def install(self, to):
        current = to.get(K.SLOT)
        if current in self.installed:
            return
        o = self.make_override(current)
        self.installed.add(o)
        to[K.SLOT] = o

    def apply(self, model):
        import comfy.patcher_extension as pe

        m = model.clone()
        self.install(m.model_options["transformer_options"])
        m.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, "block_sparse_attention",
                                lambda patcher, timestep, model_options: self.install(model_options["transformer_options"]))
        return m


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_sparse_attention_protocol_in_either_order(models, family, caplog):
    """Placed after DFAApply, a node that re-installs itself on top every step would take every call and bypass
    the plan silently. DFA re-takes the top per forward and chains it: in either order DFA sees every call (no
    missed calls), the sparse override serves exactly the full heads, and an all-full plan equals sparse alone."""
    if family == "flux":
        H.need_flux()
    model = models[family]
    full_plan, ac_plan = H.plan_pair(model)
    n_layers = len(full_plan.model.layers)
    sparse = SparseStandIn()
    alone = H.ksample(sparse.apply(model), family)
    assert sparse.taken == 4 * n_layers and not torch.equal(alone, H.ksample(model, family))
    outs = {}
    for plan_name, plan in (("full", full_plan), ("mixed", ac_plan)):
        for order in ("before", "after"):
            sparse = SparseStandIn()
            m = A.apply_dfa(sparse.apply(model), plan=plan) if order == "before" else sparse.apply(A.apply_dfa(model, plan=plan))
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="dfav2.nodes"):
                outs[plan_name, order] = H.ksample(m, family)
            s = H.last_summary(m)
            assert s.fallbacks == {} and s.attention_calls == 4 * n_layers, s.line()
            assert s.dense_by and "SparseStandIn" in s.dense_by
            assert len([r for r in caplog.records if "routes every attention call" in r.getMessage()]) == 1
            if plan_name == "full":
                assert sparse.taken == s.attention_calls  # every (full) call went through the sparse override
            else:
                assert s.engine_calls > 0 and 0 < sparse.taken and s.heads["arrow"] > 0
                assert (s.cache_hits, s.cache_misses) == H.expected_cache_counts(plan, s.forwards)
    assert torch.equal(outs["full", "before"], alone) and torch.equal(outs["full", "after"], alone)
    assert torch.equal(outs["mixed", "before"], outs["mixed", "after"])


def test_real_sparse_attention_node_in_either_order(models):
    """The core node itself where the host has it: on CPU it declines every call and chains, so an all-full plan is
    bit-identical to the plain model in both orders and DFA sees every call."""
    try:
        from comfy_extras.nodes_sparse_attention import apply_block_sparse_attention
    except ImportError:
        pytest.skip(f"ComfyUI {H.host_version()} has no Model Sparse Attention node (added after 0.33, PR #16072); "
                    "test_sparse_attention_protocol_in_either_order covers its slot protocol")
    H.need_flux()
    model = models["flux"]
    full_plan, _ = H.plan_pair(model)

    def sparse(m):
        return apply_block_sparse_attention(m, tau=1.3, topk_ratio=0.0, vsa=False, start_percent=0.0, end_percent=1.0,
                                            min_tokens=0, dense_blocks=set(), sink_conditioning="off", extra_tokens=0,
                                            verbose=False)

    ref = H.ksample(model, "flux")
    for m in (A.apply_dfa(sparse(model), plan=full_plan), sparse(A.apply_dfa(model, plan=full_plan))):
        assert torch.equal(H.ksample(m, "flux"), ref)
        s = H.last_summary(m)
        assert s.fallbacks == {} and s.dense_by == "Model Sparse Attention"


# --------------------------------------------------------------------------- containers, preferred_attention


def test_override_objects_never_expose_container_function(models):
    """wrap_attn (0.33) hands AttentionTensorContainers to an override with a `container_function` attribute: ours
    have none, so they always get plain tensors, also when they chain an override that has one."""
    import comfy.ldm.modules.attention as attention

    H.need_flux()
    model = models["flux"]
    full_plan, ac_plan = H.plan_pair(model)
    patched = A.apply_dfa(model, plan=ac_plan)
    assert not hasattr(patched.model_options["transformer_options"][K.SLOT], "container_function")

    seen = []

    def int8_like(func, *args, **kwargs):  # what set_model_optimized_attention makes for comfy kitchen int8
        seen.append(type(args[0]))
        return func(*args, **kwargs)

    int8_like.container_function = lambda *a, **kw: pytest.fail("containers reached a chained override")
    to = A.standalone_run(model, ac_plan, backend="sdpa", prev=int8_like)
    run = to[K.TO_RUN]
    assert not hasattr(run, "container_function") and not hasattr(run.owner, "container_function")
    Container = getattr(attention, "AttentionTensorContainer", None)
    if Container is None:
        A.finish_run(to)
        pytest.skip(f"ComfyUI {H.host_version()} has no AttentionTensorContainer (added in 0.33)")
    fwd_to = K.forward_options(to, torch.zeros(1, 16, 32, 32), torch.tensor([0.5]), torch.zeros(1, 32, 64))
    fwd_to = {**fwd_to, "block_type": "double", "block_index": 0}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 288, 128, generator=g) for _ in range(3))
    wrapped = [Container(t) for t in (q, k, v)]
    out = attention.attention_pytorch(*wrapped, 2, skip_reshape=True, transformer_options=fwd_to)
    assert all(c.tensor is None for c in wrapped)  # the host unwrapped them for us
    assert out.shape == (1, 288, 256) and torch.isfinite(out).all()
    summary = A.finish_run(to)
    assert summary.engine_calls == 1 and summary.fallbacks == {}


def test_preferred_attention_mode_and_warning(models, monkeypatch, caplog):
    """0.30 / 0.33 have no per-checkpoint backend ("none"). A host whose wrap_attn pops `preferred_attention` before
    any override ("stripped") gets one warning per process from DFAApply; one that hands it over ("passed") has it
    honoured by the dense path (tests/test_router.py)."""
    assert HS.host_support().preferred_attention == "none"
    assert HS.preferred_attention_mode(None) == "none"
    stripped = 'def wrapper(*args, **kwargs):\n    preferred_attention = kwargs.pop("preferred_attention", None)\n'
    assert HS.preferred_attention_mode(stripped) == "stripped"
    assert HS.preferred_attention_mode("def w(q, k, v, preferred_attention=None): ...") == "passed"

    import dataclasses

    fake = dataclasses.replace(HS.host_support(), preferred_attention="stripped")
    monkeypatch.setattr(A, "host_support", lambda: fake)
    monkeypatch.setattr(A, "_PREFERRED_WARNED", [])
    model = models["sd3"]
    full_plan, _ = H.plan_pair(model)
    with caplog.at_level(logging.WARNING, logger="dfav2.nodes"):
        A.apply_dfa(model, plan=full_plan)
        A.apply_dfa(model, plan=full_plan)
    notes = [r.getMessage() for r in caplog.records if "preferred attention" in r.getMessage()]
    assert len(notes) == 1 and "Model Attention Backend" in notes[0]
