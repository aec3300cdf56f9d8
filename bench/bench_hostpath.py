"""Host (Python) time the pack's attention override adds per attention call, on CPU.

A tiny Flux built with ComfyUI's own class at Flux-dev depth (19 double + 38 single blocks = 57 attention calls per
forward) but 3 heads x 128 and a 64x64-px image (16 image tokens) + 8 text tokens, so attention and the matmuls
are small and the per-call work of the override is a visible share of a forward. Variants, timed interleaved
(round-robin) in one process, one thread:

  unpatched          the model as loaded (host attention, no override)
  hook_passthrough   a bare override that calls the host function (what the host's hook itself costs)
  <pack>:all_full    DFAApply run (adapter.standalone_run) with an all-full plan
  <pack>:mixed       a third of the heads full, a third arrow/8, a third cached (engine backend "sdpa")

`<pack>` is `after` (this checkout) and, with `--before PATH`, `before`: another checkout of the pack (e.g. a git
worktree of an older commit) loaded in the same process as the package `dfav2_before`, so both are timed side by
side against the same model and host. Per variant: median over `--rounds` rounds of the mean of `--inner`
forwards (time.perf_counter_ns) after warm-up; host us per call = (variant - unpatched) / calls per forward,
i.e. routing + the per-forward set-up (forward_options, amortised) + engine dispatch for the mixed plan.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_hostpath.py [--before ../hp_before] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ROOT, host_compat, import_host, load_pack  # noqa: E402

SLOT = "optimized_attention_override"  # transformer_options key ComfyUI's attention wrapper calls
TINY_FLUX: dict[str, Any] = dict(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=48, mlp_ratio=4.0, num_heads=3,
    depth=19, depth_single_blocks=38, axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True,
    guidance_embed=True, txt_ids_dims=[],
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_other_pack(root: Path, name: str) -> ModuleType:
    """Import the pack checkout at `root` as package `name` (relative imports keep it apart from `dfav2`)."""
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _pack_api(pkg: str) -> dict[str, Any]:
    """standalone_run / finish_run / forward_options / model_signature and the plan vocabulary of package `pkg`.
    Since 778a797 forward_options is in nodes.hooks and model_signature in nodes.layouts; before, nodes.adapter."""
    adapter = importlib.import_module(f"{pkg}.nodes.adapter")
    try:
        hooks: ModuleType = importlib.import_module(f"{pkg}.nodes.hooks")
        layouts: ModuleType = importlib.import_module(f"{pkg}.nodes.layouts")
    except ModuleNotFoundError:
        hooks = layouts = adapter
    plan = importlib.import_module(f"{pkg}.calibration.plan")
    methods = importlib.import_module(f"{pkg}.kernels.methods")
    return dict(standalone_run=adapter.standalone_run, finish_run=adapter.finish_run,
                forward_options=hooks.forward_options, model_signature=layouts.model_signature,
                plan=plan, methods=methods)


def _plans(api: dict[str, Any], model: Any, sigmas: list[float]) -> dict[str, Any]:
    plan_mod, m = api["plan"], api["methods"]
    sig = api["model_signature"](model)
    full = plan_mod.Plan.uniform(sig, sigmas, m.FULL, first_full=False, description="all full")
    heads = sig.layers[0].heads
    third = heads // 3
    mixed_layer = m.LayerDecision((m.FULL,) * third + (m.arrow(8),) * third + (m.CACHE,) * (heads - 2 * third))
    positions = tuple(
        plan_mod.PlanPosition(s, tuple(m.LayerDecision.uniform(m.FULL, l.heads) if i == 0 else mixed_layer
                                       for l in sig.layers))
        for i, s in enumerate(sigmas))
    mixed = plan_mod.Plan(sig, positions, None, "mixed: 1/3 full, 1/3 arrow/8, 1/3 cache")
    return {"all_full": full, "mixed": mixed}


def _commit(tree: Path) -> str:
    """The checked-out commit of a pack tree (recorded instead of a machine path)."""
    import subprocess

    r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, default=None, help="another checkout of the pack to time side by side")
    ap.add_argument("--res", type=int, default=64, help="image side in pixels (default 64: 16 image tokens)")
    ap.add_argument("--txt", type=int, default=8, help="text tokens (default 8)")
    ap.add_argument("--rounds", type=int, default=200, help="timed rounds per variant (default 200)")
    ap.add_argument("--inner", type=int, default=5, help="forwards per round (default 5)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed forwards per variant first (default 20)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/cpu_hostpath_<date>.json)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    # Like `main.py --base-directory`: folder_paths must not create input/ etc. in the host tree.
    host_path, why = host_compat().find_comfyui(ROOT)
    if host_path is None:
        raise SystemExit(f"bench: {why}")
    sys.path.insert(0, str(Path(host_path).resolve()))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    base_dir = tempfile.TemporaryDirectory(prefix="dfa_bench_")
    comfy.cli_args.args.base_directory = base_dir.name
    host_version = import_host(cpu=True)
    load_pack()
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    packs: dict[str, str] = {"after": "dfav2"}
    if a.before is not None:
        _load_other_pack(a.before.resolve(), "dfav2_before")
        packs = {"before": "dfav2_before", **packs}
    apis = {label: _pack_api(pkg) for label, pkg in packs.items()}

    torch.manual_seed(0)
    model = Flux(dtype=torch.float32, device=torch.device("cpu"), operations=comfy.ops.disable_weight_init, **TINY_FLUX)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    x = torch.randn(1, 16, a.res // 8, a.res // 8)
    ctx = torch.randn(1, a.txt, TINY_FLUX["context_in_dim"])
    y = torch.randn(1, TINY_FLUX["vec_in_dim"])
    g = torch.tensor([3.5])
    t = torch.tensor([0.5])
    sigma = torch.tensor([0.5])  # plan position 2 of [1, .75, .5, .25]: repeated forwards hit the cache
    sigmas = [1.0, 0.75, 0.5, 0.25]

    calls = [0]

    def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return func(*args, **kwargs)

    def passthrough(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    def forward(to: dict) -> torch.Tensor:
        with torch.no_grad():
            return model(x, t, ctx, y=y, guidance=g, transformer_options=to)

    def run_forward(api: dict[str, Any], base: dict) -> torch.Tensor:
        return forward(api["forward_options"](base, x, sigma, ctx))

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "unpatched": lambda: forward({}),
        "hook_passthrough": lambda: forward({"optimized_attention_override": passthrough}),
    }
    runs: dict[str, tuple[dict[str, Any], dict]] = {}
    plans: dict[str, Any] = {}
    for label, api in apis.items():
        for kind, plan in _plans(api, model, sigmas).items():
            base = api["standalone_run"](model, plan, backend="sdpa")
            runs[f"{label}:{kind}"] = (api, base)
            plans[f"{label}:{kind}"] = plan
            variants[f"{label}:{kind}"] = functools.partial(run_forward, api, base)

    ref = forward({})
    forward({"optimized_attention_override": counting})
    n_calls = calls[0]
    diffs = {name: (fn() - ref).abs().max().item() for name, fn in variants.items()}
    for fn in variants.values():
        for _ in range(a.warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.rounds):  # round-robin: drift and neighbours on the shared CPU hit every variant alike
        for name, fn in variants.items():
            t0 = time.perf_counter_ns()
            for _ in range(a.inner):
                fn()
            samples[name].append((time.perf_counter_ns() - t0) / a.inner / 1e3)
    # Direct: time inside the override minus time inside the host function it was handed (what the override adds
    # around the host attention; for the mixed plan this includes the engine's own SDPA/cache tensor work).
    acc = [0, 0, 0]  # ns in override, ns in host func, calls

    def probe(to: dict) -> None:
        inner = to[SLOT]

        def shim(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            def timed(*a2: Any, **k2: Any) -> Any:
                t1 = time.perf_counter_ns()
                r = func(*a2, **k2)
                acc[1] += time.perf_counter_ns() - t1
                return r

            t0 = time.perf_counter_ns()
            out = inner(timed, *args, **kwargs)
            acc[0] += time.perf_counter_ns() - t0
            acc[2] += 1
            return out

        forward({**to, SLOT: shim})

    def run_probe(api: dict[str, Any], base: dict) -> None:
        probe(api["forward_options"](base, x, sigma, ctx))

    probes: dict[str, Callable[[], None]] = {"hook_passthrough": lambda: probe({SLOT: passthrough})}
    for name, (api, base) in runs.items():
        probes[name] = functools.partial(run_probe, api, base)
    in_call: dict[str, list[float]] = {name: [] for name in probes}
    for _ in range(a.rounds):
        for name, probe_fn in probes.items():
            acc[:] = [0, 0, 0]
            probe_fn()
            in_call[name].append((acc[0] - acc[1]) / acc[2] / 1e3)
    summaries = {name: api["finish_run"](base) for name, (api, base) in runs.items()}
    setup_us: dict[str, float] = {}  # the per-forward part alone, on a fresh run of the same plan
    for name, (api, base) in runs.items():
        fresh = api["standalone_run"](model, plans[name], backend="sdpa")
        ts = []
        for _ in range(1000):
            t0 = time.perf_counter_ns()
            api["forward_options"](fresh, x, sigma, ctx)
            ts.append((time.perf_counter_ns() - t0) / 1e3)
        setup_us[name] = statistics.median(ts)

    med = {name: statistics.median(v) for name, v in samples.items()}
    rows: list[dict[str, Any]] = []
    for name, v in samples.items():
        q = statistics.quantiles(v, n=4)
        rows.append({
            "variant": name, "us_per_forward": med[name], "us_per_forward_iqr": [q[0], q[2]],
            # median over rounds of (variant - unpatched in the same round): paired, so slow drift cancels
            "host_us_per_call": statistics.median((s - u) / n_calls for s, u in zip(v, samples["unpatched"])),
            "in_call_us": statistics.median(in_call[name]) if name in in_call else None,
            "forward_setup_us": setup_us.get(name),
            "max_abs_diff_vs_unpatched": diffs[name],
            "summary": summaries[name].line() if name in summaries else None,
        })
    info = {
        "date": datetime.date.today().isoformat(), "cpu": _cpu_model(), "torch_threads": a.threads,
        "python": platform.python_version(), "torch": torch.__version__, "comfyui": host_version,
        "packs": {label: _commit(ROOT if pkg == "dfav2" else a.before) for label, pkg in packs.items()},
        "geometry": {"res": a.res, "txt": a.txt, "img_tokens": (a.res // 16) ** 2, **{k: TINY_FLUX[k] for k in (
            "hidden_size", "num_heads", "depth", "depth_single_blocks")}},
        "attention_calls_per_forward": n_calls, "rounds": a.rounds, "inner": a.inner, "warmup": a.warmup,
        "timer": "time.perf_counter_ns; us_per_forward: median over rounds of the mean of `inner` forwards; "
                 "host_us_per_call: median over rounds of (variant - unpatched) / calls; in_call_us: median over "
                 "rounds (one forward each) of the mean per call of (time in override - time in the host function)",
        "rows": rows,
    }
    print(f"# host time per attention call: ComfyUI {host_version} Flux class, {info['cpu']}, {a.threads} thread(s), "
          f"{a.res}px ({info['geometry']['img_tokens']} img + {a.txt} txt tokens), {n_calls} attention calls/forward, "
          f"median of {a.rounds} x {a.inner} forwards")
    print("| variant | us / forward (IQR) | host us / call vs unpatched | us in override, less host func | "
          "forward_options us | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, hi = r["us_per_forward_iqr"]
        setup = "—" if r["forward_setup_us"] is None else f"{r['forward_setup_us']:.1f}"
        direct = "—" if r["in_call_us"] is None else f"{r['in_call_us']:.1f}"
        print(f"| {r['variant']} | {r['us_per_forward']:.0f} ({lo:.0f}–{hi:.0f}) | {r['host_us_per_call']:+.1f} | "
              f"{direct} | {setup} | {r['max_abs_diff_vs_unpatched']:.3g} |")
    for name, s in summaries.items():
        print(f"{name}: {s.line()}")
    out = a.out or ROOT / "bench" / "results" / f"cpu_hostpath_{info['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}")
    bad = [n for n in runs if n.endswith(":all_full") and diffs[n] != 0.0]
    bad += [n for n, s in summaries.items() if getattr(s, "fallbacks", None)]
    if bad:
        print(f"FAILED: all-full output differs from unpatched, or dense fallbacks, in {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
