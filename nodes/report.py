"""What reaches the web UI (web/dfav2.js): Apply's per-run report and the plan list with each plan's model.

`report_payload` and `plan_info` are plain functions (tested without a host). `send` pushes an event to the
browser through the running ComfyUI server and is a no-op where there is none (in-process host, tests, the CLI):
it never imports the server module itself.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..calibration.plan import Plan
from .summary import RunSummary

__all__ = ["REPORT_EVENT", "PLANS_ROUTE", "report_payload", "plan_info", "signature_key", "send", "register_routes"]

log = logging.getLogger(__name__)

#: Event DFAApply's patch sends at the end of each sampling run (web/dfav2.js shows it on the node).
REPORT_EVENT = "dfav2.report"
#: GET: the plan files with their model family and signature (the plan dropdown marks and refreshes with it).
PLANS_ROUTE = "/dfav2/plans"


def signature_key(plan_or_signature: Any) -> str:
    """A short stable key of a model signature: family, layer count and head shapes (what a plan must match)."""
    sig = getattr(plan_or_signature, "model", plan_or_signature)
    shapes = ",".join(f"{l.name}:{l.heads}x{l.head_dim}{'i' if l.image_only else ''}" for l in sig.layers)
    import hashlib

    return f"{sig.family}-{len(sig.layers)}-{hashlib.sha1(shapes.encode()).hexdigest()[:10]}"


def report_payload(summary: RunSummary, *, node: str | None, label: str, signature: Any) -> dict[str, Any]:
    """The JSON sent to the browser after one sampling run of an applied plan."""
    total = sum(summary.heads.values())
    return {
        "node": node,
        "plan": label,
        "family": signature.family,
        "model": signature.describe(),
        "signature": signature_key(signature),
        "line": summary.line(),
        "forwards": len(summary.forwards),
        "attention_calls": summary.attention_calls,
        "heads": dict(summary.heads),
        "head_shares": {k: (v / total if total else 0.0) for k, v in summary.heads.items()},
        "fp8_heads": summary.fp8_heads,  # counted in `heads` under their kind too
        "cache_hits": summary.cache_hits,
        "cache_misses": summary.cache_misses,
        "flops_saved": summary.flops_saved,
        "fallbacks": dict(summary.fallbacks),
        "dense_fallbacks": sum(summary.fallbacks.values()),
        "text_mask_calls": summary.text_mask_calls,
    }


def plan_info(name: str, plan: Plan) -> dict[str, Any]:
    """One entry of GET /dfav2/plans: what the plan dropdown shows next to a file name."""
    cal = plan.calibration
    return {
        "name": name,
        "family": plan.model.family,
        "model": plan.model.describe(),
        "signature": signature_key(plan),
        "steps": len(plan.positions),
        "width": cal.width if cal else None,
        "height": cal.height if cal else None,
        "delta": cal.delta if cal else None,
    }


def send(event: str, payload: dict[str, Any]) -> bool:
    """Send `event` to the client that queued the prompt (all clients when unknown). False when no ComfyUI
    server runs in this process."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or getattr(instance, "loop", None) is None:
        return False
    try:
        instance.send_sync(event, payload, getattr(instance, "client_id", None))
    except Exception as exc:  # noqa: BLE001 - a UI message must never fail a sampling run
        log.debug("DiTFastAttnV2: could not send %s to the UI: %s", event, exc)
        return False
    return True


_REGISTERED: list[bool] = []


def register_routes() -> bool:
    """Add GET /dfav2/plans to the running server (once). False when no server runs in this process."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or _REGISTERED:
        return bool(_REGISTERED)
    from aiohttp import web

    from .plans import plan_infos

    async def plans(request: Any) -> Any:
        return web.json_response({"plans": plan_infos()})

    instance.routes.get(PLANS_ROUTE)(plans)
    _REGISTERED.append(True)
    return True
