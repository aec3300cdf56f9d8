"""DFAApply under ComfyUI's MultiGPU CFG Split on 2 real GPUs (issue 13 item 5: state per device).

The tiny Flux of the host tests (tests/host/dfa_hostenv.py), loaded by the host's own loader (ComfyUI puts it on
cuda:0; fp32 through ComfyUI's --fp32-unet unless --dtype auto), sampled with cfg 3.5 (cond and uncond both run),
seed 0, in these settings:

  a, a2                        unpatched, one GPU (twice: the run-to-run jitter)
  b, b2                        unpatched + MultiGPU CFG Split over 2 GPUs (cond on one, uncond on the other)
  c_dfa_then_split / c_split_then_dfa   DFAApply all-full (dense "host") and the split, in either order
  d_single                     DFAApply with the host tests' arrow + cache plan, one GPU
  d_dfa_then_split / d_split_then_dfa   the same plan with the split

Checks: c == b (within b's own jitter, recorded whether bit-identical); every DFA run under the split has one
engine per GPU, both serving calls and cache hits, each cache hit served from a tensor on its own GPU, the plan's
cache counts and no dense fallbacks; d (split) is within max(--atol, 2 * |a - b|) of d_single.

    . .devenv/env.sh; python3 bench/check_multigpu.py $OUT/check_multigpu.json    # >= 2 CUDA GPUs
    COMFYUI_PATH=... python3 bench/check_multigpu.py --cpu-smoke smoke.json       # the script itself, on CPU

With fewer than 2 CUDA GPUs (and no --cpu-smoke) it says so and exits 0. --cpu-smoke runs everything with ComfyUI
on CPU and a fake second device ("cpu:0" in ComfyUI's device list): the split's clone, threads and cond/uncond
split run for real, but tensors of both land on "cpu", so one engine serves both (per-device state needs GPUs).
tests/host/test_host_stack.py (test_multigpu_cfg_split_on_two_gpus) runs the same `run_check`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CFG, SEED = 3.5, 0


@contextlib.contextmanager
def probes():
    """Records each DFA run's engines (device -> engine, before the run drops them) and, for every call that was
    handed stored heads, (device of q, device of the stored heads, hit). Restores the originals afterwards."""
    import dfav2.kernels.engine as E
    from dfav2.nodes.router import Run

    rec: dict = {"runs": [], "uses": []}
    orig_attention, orig_finish = E.headwise_attention, Run.finish

    def headwise_attention(q, k, v, *args, cached=None, **kwargs):
        out, hit = orig_attention(q, k, v, *args, cached=cached, **kwargs)
        if cached is not None:
            rec["uses"].append((str(q.device), str(cached.values.device), bool(hit)))
        return out, hit

    def finish(self):
        engines = dict(self.consumers)
        summary = orig_finish(self)
        rec["runs"].append((engines, summary))
        return summary

    E.headwise_attention, Run.finish = headwise_attention, finish
    try:
        yield rec
    finally:
        E.headwise_attention, Run.finish = orig_attention, orig_finish


def _maxdiff(x, y) -> float:
    return float((x.float().cpu() - y.float().cpu()).abs().max())


def run_check(H, model, *, atol: float = 1e-3) -> dict:
    """The settings above on `model` (a host-loaded tiny Flux, on ComfyUI's main device).
    Returns {"rows", "checks", "pass"}; each check is {"name", "ok", "detail"}."""
    import torch
    from dfav2.nodes import adapter as A
    from dfav2.nodes import layouts as Ly

    sig, sigmas = Ly.model_signature(model), H.schedule_sigmas(model)
    full_plan, mixed_plan = H.all_full_plan(sig, sigmas), H.arrow_cache_plan(sig, sigmas)
    main_dev = str(model.load_device)
    checks: list[dict] = []
    rows: list[dict] = []
    out: dict = {}
    dfa: dict = {}

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    def do_split(m):
        from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode

        return MultiGPUCFGSplitNode.execute(m, 2).args[0]

    def sample(name: str, m, plan=None) -> None:
        with probes() as rec:
            out[name] = H.ksample(m, "flux", cfg=CFG, seed=SEED)
        if plan is None:
            return
        assert len(rec["runs"]) == 1, f"{name}: {len(rec['runs'])} DFA runs recorded"
        engines, summary = rec["runs"][0]
        per_dev = {str(d): {"engine_id": id(e), "calls": e.stats.calls, "cache_hits": e.stats.cache_hits,
                            "cache_misses": e.stats.cache_misses, "heads": dict(e.stats.heads)}
                   for d, e in engines.items()}
        uses = rec["uses"]
        dfa[name] = dict(plan=plan, summary=summary, devices=per_dev, uses=uses,
                         stored_heads_on_other_device=sum(q != c for q, c, _ in uses),
                         hits_by_device={d: sum(1 for q, _, h in uses if h and q == d) for d in per_dev})

    def dfa_checks(name: str, devices: set[str]) -> None:
        r = dfa[name]
        s, plan, per_dev = r["summary"], r["plan"], r["devices"]
        check(f"{name}: no dense fallbacks", not s.fallbacks, str(s.fallbacks))
        check(f"{name}: one engine per device {sorted(devices)}", set(per_dev) == devices and len(
            {v["engine_id"] for v in per_dev.values()}) == len(per_dev), f"engines on {sorted(per_dev)}")
        check(f"{name}: every device served calls", all(v["calls"] > 0 for v in per_dev.values()),
              ", ".join(f"{d}: {v['calls']}" for d, v in per_dev.items()))
        if plan is mixed_plan:
            expected = H.expected_cache_counts(plan, s.forwards)
            check(f"{name}: cache hits/misses as the plan implies", (s.cache_hits, s.cache_misses) == expected,
                  f"{(s.cache_hits, s.cache_misses)} vs expected {expected}")
            check(f"{name}: cache hits on every device", all(v["cache_hits"] > 0 for v in per_dev.values()),
                  ", ".join(f"{d}: {v['cache_hits']}" for d, v in per_dev.items()))
            check(f"{name}: stored heads only reused on their own device", r["stored_heads_on_other_device"] == 0
                  and len(r["uses"]) > 0, f"{r['stored_heads_on_other_device']} of {len(r['uses'])} on another device")

    # -- the runs ----------------------------------------------------------------------------------------------
    full_host = dict(plan=full_plan, dense="host")
    for name in ("a", "a2"):
        sample(name, model)
    sample("d_single", A.apply_dfa(model, plan=mixed_plan), mixed_plan)
    extra = sorted(str(c.load_device) for c in do_split(model).get_additional_models_with_key("multigpu"))
    check("split: one MultiGPU clone on a second device", len(extra) == 1 and extra[0] != main_dev,
          f"primary {main_dev}, clones on {extra}")
    for name in ("b", "b2"):
        sample(name, do_split(model))
    sample("c_dfa_then_split", do_split(A.apply_dfa(model, **full_host)), full_plan)
    sample("c_split_then_dfa", A.apply_dfa(do_split(model), **full_host), full_plan)
    sample("d_dfa_then_split", do_split(A.apply_dfa(model, plan=mixed_plan)), mixed_plan)
    sample("d_split_then_dfa", A.apply_dfa(do_split(model), plan=mixed_plan), mixed_plan)

    # -- the checks -------------------------------------------------------------------------------------------
    # The devices tensors land on: cuda:0 and cuda:1 on 2 GPUs; one "cpu" for the CPU smoke run's fake 2nd device.
    both = {str(torch.empty(0, device=d).device) for d in (model.load_device, *extra)}
    effect = _maxdiff(out["d_single"], out["a"])
    check("d_single: the mixed plan changes the result", effect > 0, f"max |d_single - a| = {effect:.3g}")
    dfa_checks("d_single", {main_dev})
    jitter_b, split_noise = _maxdiff(out["b"], out["b2"]), _maxdiff(out["b"], out["a"])
    tol = max(atol, 2 * split_noise)
    ref_of = {"a": "a2", "d_single": "a", "b": "a", "b2": "b"}
    for name in ("c_dfa_then_split", "c_split_then_dfa"):
        diff = _maxdiff(out[name], out["b"])
        check(f"{name} == b", diff <= jitter_b, f"max diff {diff:.3g} (bit-identical: {diff == 0}), "
              f"b's jitter {jitter_b:.3g}")
        dfa_checks(name, both)
        ref_of[name] = "b"
    for name in ("d_dfa_then_split", "d_split_then_dfa"):
        diff = _maxdiff(out[name], out["d_single"])
        check(f"{name} ~ d_single", diff <= tol, f"max diff {diff:.3g}, tolerance {tol:.3g} = max(atol, "
              f"2 * |a - b| = {2 * split_noise:.3g}); the plan's own effect {effect:.3g}")
        dfa_checks(name, both)
        ref_of[name] = "d_single"

    for name, ref in ref_of.items():
        r = dfa.get(name)
        rows.append({"setting": name, "vs": ref, "max_abs_diff": _maxdiff(out[name], out[ref]),
                     "bit_identical": bool((out[name].cpu() == out[ref].cpu()).all()),
                     "devices": r["devices"] if r else None, "hits_by_device": r["hits_by_device"] if r else None,
                     "stored_heads_on_other_device": r["stored_heads_on_other_device"] if r else None,
                     "summary": r["summary"].line() if r else None})
    return {"rows": rows, "checks": checks, "pass": all(c["ok"] for c in checks)}


def environment(comfy_version: str) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        commit = None
    n = torch.cuda.device_count()
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "comfyui": comfy_version, "pack_commit": commit, "cuda_devices": n,
            "gpus": [torch.cuda.get_device_name(i) for i in range(n)], "cfg": CFG, "seed": SEED}


def print_table(result: dict) -> None:
    print("| setting | vs | max abs diff | bit-identical | per device: engine calls / cache hits |")
    print("|---|---|---:|---|---|")
    for r in result["rows"]:
        per = "; ".join(f"{d}: {v['calls']} / {v['cache_hits']}" for d, v in (r["devices"] or {}).items()) or "—"
        print(f"| {r['setting']} | {r['vs']} | {r['max_abs_diff']:.3g} | {r['bit_identical']} | {per} |")
    for c in result["checks"]:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON path to write")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, split over a fake 2nd device (script check)")
    ap.add_argument("--atol", type=float, default=1e-3, help="least tolerance of d (split) vs d_single")
    ap.add_argument("--dtype", choices=("fp32", "auto"), default="fp32",
                    help="fp32: ComfyUI's --fp32-unet (sharp comparisons; default); auto: the host's (bf16 on H200)")
    a = ap.parse_args()
    import torch

    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n = torch.cuda.device_count()
    if not a.cpu_smoke and n < 2:
        msg = f"needs 2 CUDA GPUs (found {n}); nothing checked (--cpu-smoke: the script itself on CPU)"
        print(f"check_multigpu: {msg}")
        out_path.write_text(json.dumps({"status": "skipped", "reason": msg, "cuda_devices": n}, indent=1) + "\n")
        return 0

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT / "tests" / "host"))
    from _bootstrap import load_pack

    import dfa_hostenv as H  # the host tests' harness: finds ComfyUI (COMFYUI_PATH), tiny models, KSampler

    tmp = Path(tempfile.mkdtemp(prefix="dfa_check_multigpu_"))
    error = H.import_host(tmp / "base", cpu=True if a.cpu_smoke else None)  # not --cpu where there are GPUs
    if error:
        print(f"check_multigpu: {error}")
        return 2
    load_pack()
    import comfy.cli_args
    import comfy.model_management as mm

    # --fp32-unet for the whole process: the split's clone is reloaded (at the split) through the same loader.
    comfy.cli_args.args.fp32_unet = a.dtype == "fp32"

    info = environment(H.host_version())
    info["comfy_device"] = str(mm.get_torch_device())
    if a.cpu_smoke:
        mm.get_all_torch_devices = lambda exclude_current=False: [torch.device("cpu"), torch.device("cpu", 0)]
    model = H.load_model("flux", H.save_model(H.build_flux(), tmp / "tiny_flux.safetensors"))
    info["model_dtype"] = str(model.model_dtype()).replace("torch.", "")
    print(f"# DFAApply x MultiGPU CFG Split: ComfyUI {info['comfyui']}, torch {info['torch']}, "
          f"{info['gpus'] or 'cpu'}, model on {model.load_device} ({info['model_dtype']}), cfg {CFG}, seed {SEED}")
    info["mode"] = "cpu-smoke (fake 2nd device)" if a.cpu_smoke else "GPUs"
    try:
        result = run_check(H, model, atol=a.atol)
    except Exception:  # a crash is a result too: write it
        result = {"rows": [], "checks": [{"name": "run", "ok": False, "detail": traceback.format_exc()}], "pass": False}
    print_table(result)
    info.update(result, status="pass" if result["pass"] else "fail")
    out_path.write_text(json.dumps(info, indent=1, default=str) + "\n")
    print(f"{'PASS' if result['pass'] else 'FAILED'}; wrote {out_path}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
