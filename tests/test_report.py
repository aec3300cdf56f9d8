"""nodes/report.py without a host: the per-run report and plan-list payloads, and no UI message without a server."""

from __future__ import annotations

import json
import sys

from dfav2.calibration import LayerSpec, ModelSignature, Plan
from dfav2.kernels import CACHE, FULL
from dfav2.nodes import report
from dfav2.nodes.summary import ForwardRecord, RunSummary

SIG = ModelSignature("sd3", (LayerSpec("joint.0", 2, 64), LayerSpec("joint.0.attn2", 2, 64, image_only=True)))


def _summary(**kw) -> RunSummary:
    base = dict(forwards=(ForwardRecord(1.0, 0, None), ForwardRecord(0.5, 1, None)), attention_calls=4, engine_calls=4,
                heads={"full": 6, "arrow": 0, "cache": 2}, cache_hits=2, cache_misses=0, fallbacks={},
                kept_flops=75, dense_flops=100)
    base.update(kw)
    return RunSummary(**base)


def test_report_payload_is_json_and_carries_the_run():
    p = report.report_payload(_summary(fallbacks={"mask": 3}), node="7", label="a.json", signature=SIG)
    assert json.loads(json.dumps(p)) == p
    assert p["node"] == "7" and p["plan"] == "a.json" and p["family"] == "sd3" and p["forwards"] == 2
    assert p["head_shares"] == {"full": 0.75, "arrow": 0.0, "cache": 0.25}
    assert abs(p["flops_saved"] - 0.25) < 1e-12 and p["dense_fallbacks"] == 3 and p["fallbacks"] == {"mask": 3}
    assert p["line"] == _summary(fallbacks={"mask": 3}).line()


def test_signature_key_tells_models_apart():
    plan = Plan.uniform(SIG, [1.0, 0.5], CACHE)
    assert report.signature_key(plan) == report.signature_key(SIG)
    other = ModelSignature("sd3", (LayerSpec("joint.0", 2, 64), LayerSpec("joint.0.attn2", 2, 64)))
    assert report.signature_key(other) != report.signature_key(SIG)
    assert report.signature_key(ModelSignature("flux", SIG.layers)).startswith("flux-2-")
    info = report.plan_info("p.json", Plan.uniform(SIG, [1.0, 0.5], FULL))
    assert info["family"] == "sd3" and info["steps"] == 2 and info["width"] is None


def test_send_is_a_no_op_without_a_server(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert report.send(report.REPORT_EVENT, {"x": 1}) is False
    assert report.register_routes() is False
