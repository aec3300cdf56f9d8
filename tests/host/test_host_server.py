"""A real headless ComfyUI server on 127.0.0.1 with this pack in custom_nodes: /object_info shows the nodes, the
plan dropdown lists models/dfa_plans (+ extra_model_paths.yaml), and API-format workflows
(loader -> DFAApply -> KSampler -> SaveLatent) run, with two models and different plans in one prompt, and
loader -> DFACalibrate -> DFAApply -> KSampler runs as one prompt."""

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import dfa_hostenv as H
from comfy_server import PACK_DIR_NAME, ComfyServer

H.skip_module_without_host()
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("host")]

import torch  # noqa: E402

from dfav2.calibration.plan import save_plan  # noqa: E402
from dfav2.nodes import adapter as A  # noqa: E402
from dfav2.nodes import host as HS  # noqa: E402
from dfav2.nodes import layouts as Ly  # noqa: E402



class Server(ComfyServer):
    """The shared server (comfy_server.py) plus `run`: queue an API prompt and wait for its status."""

    def run(self, prompt: dict, timeout: float = 120) -> dict:
        body = json.dumps({"prompt": prompt, "client_id": str(uuid.uuid4())}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                pid = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:  # validation errors come back as 400 with a JSON body
            return {"status_str": "invalid", "messages": json.loads(e.read())}
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                self.last_outputs = h[pid].get("outputs", {})  # node id -> its ui result
                st = h[pid]["status"]
                if st.get("completed") or st.get("status_str") == "error":
                    return st
            time.sleep(0.05)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_paths, models):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "models" / "diffusion_models").mkdir(parents=True)
    for fam in ("flux", "sd35m"):
        shutil.copy(tiny_paths[fam], base / "models" / "diffusion_models" / tiny_paths[fam].name)
    plans_dir = base / "models" / "dfa_plans"
    extra_dir = base / "elsewhere" / "plans"
    plans_dir.mkdir(parents=True)
    extra_dir.mkdir(parents=True)
    plans = {}
    for fam in ("flux", "sd35m"):
        sig, sigmas = Ly.model_signature(models[fam]), H.schedule_sigmas(models[fam])
        plans[f"{fam}_full.json"] = H.all_full_plan(sig, sigmas)
        plans[f"{fam}_ac.json"] = H.arrow_cache_plan(sig, sigmas)
    for name, plan in plans.items():
        save_plan(plan, (extra_dir if name == "sd35m_ac.json" else plans_dir) / name)
    (plans_dir / "readme.txt").write_text("not a plan")
    (base / "extra_model_paths.yaml").write_text(f"dfa_test:\n  base_path: {base / 'elsewhere'}\n  dfa_plans: plans\n")
    (base / "custom_nodes").mkdir()
    os.symlink(H.PACK_ROOT, base / "custom_nodes" / PACK_DIR_NAME)
    shutil.copytree(H.HERE / "host_test_nodes", base / "custom_nodes" / "dfa_host_test_nodes")
    srv = Server(H.COMFY_PATH, base, timeout=90.0,
                 extra_args=("--extra-model-paths-config", str(base / "extra_model_paths.yaml")))
    try:
        yield srv
    finally:
        srv.stop()


def _latent(server: Server, prefix: str) -> torch.Tensor:
    import safetensors.torch

    files = sorted((server.base / "output" / "latents").glob(f"{prefix}_*.latent"))
    assert files, f"no latent saved for {prefix}"
    return safetensors.torch.load_file(str(files[-1]))["latent_tensor"]


def _chain(wf: dict, nid: int, *, loader: str, unet: str, pooled: int, plan: str, enabled: bool, seed: int, prefix: str,
           cfg: float = 3.5) -> None:
    s = str
    wf[s(nid)] = {"class_type": loader, "inputs": {"unet_name": unet, **({"weight_dtype": "default"} if loader == "UNETLoader" else {})}}
    wf[s(nid + 1)] = {"class_type": "DFATestConditioning", "inputs": {"tokens": 32, "context_dim": 64, "pooled_dim": pooled, "seed": 1}}
    wf[s(nid + 2)] = {"class_type": "DFATestConditioning", "inputs": {"tokens": 32, "context_dim": 64, "pooled_dim": pooled, "seed": 2}}
    wf[s(nid + 3)] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}}
    wf[s(nid + 4)] = {"class_type": "DFAApply", "inputs": {"model": [s(nid), 0], "plan": plan, "enabled": enabled,
                                                           "start_percent": 0.0, "end_percent": 1.0}}
    wf[s(nid + 5)] = {"class_type": "KSampler", "inputs": {
        "model": [s(nid + 4), 0], "seed": seed, "steps": 4, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
        "positive": [s(nid + 1), 0], "negative": [s(nid + 2), 0], "latent_image": [s(nid + 3), 0], "denoise": 1.0}}
    wf[s(nid + 6)] = {"class_type": "SaveLatent", "inputs": {"samples": [s(nid + 5), 0], "filename_prefix": f"latents/{prefix}"}}


def _flux_loader() -> str:
    return "UNETLoader" if HS.host_support().flux_block_identity else "DFATestTinyFluxLoader"


def test_object_info_lists_the_nodes_and_plans(server):
    info = server.get("/object_info/DFAApply")["DFAApply"]
    assert info["display_name"] == "DiTFastAttnV2 Apply" and info["category"] == "model_patches/DiTFastAttnV2"
    assert info["output"] == ["MODEL"]
    req, opt = info["input"]["required"], info["input"].get("optional", {})
    assert list(req) == ["model", "plan", "enabled", "start_percent", "end_percent"] and "dfa_plan" in opt
    assert opt["dfa_plan"][0] == "DFA_PLAN"
    plan_spec = req["plan"]
    options = plan_spec[0] if isinstance(plan_spec[0], list) else plan_spec[1]["options"]
    # models/dfa_plans and the extra_model_paths.yaml folder, .json only, plus "none"
    assert sorted(options) == sorted(["flux_full.json", "flux_ac.json", "sd35m_full.json", "sd35m_ac.json", "none"])
    assert "DFALoadPlan" in server.get("/object_info")
    templates = server.get("/api/workflow_templates")
    examples = sorted(p.stem for p in (H.PACK_ROOT / "example_workflows").glob("*.json"))
    assert len(examples) >= 5 and sorted(templates.get(PACK_DIR_NAME, [])) == examples
    assert info["input"]["required"]["plan"][1].get("default") == "none"  # not some other model's plan
    for node, outputs in (("DFAPlanInfo", ["IMAGE", "STRING"]), ("DFACompare", ["IMAGE", "IMAGE", "IMAGE", "STRING"]),
                          ("DFACalibrate", ["DFA_PLAN", "STRING"])):
        node_info = server.get(f"/object_info/{node}")[node]
        assert node_info["output"] == outputs and node_info["output_node"] is True, node
    # every example's DFACompare widget values line up with DFACompare's widgets (+ the seed's control_after_generate)
    req = server.get("/object_info/DFACompare")["DFACompare"]["input"]["required"]
    widgets = [k for k, spec in req.items() if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "COMBO")]
    compares = [n for e in examples
                for n in json.loads((H.PACK_ROOT / "example_workflows" / f"{e}.json").read_text())["nodes"]
                if n["type"] == "DFACompare"]
    assert compares
    for node in compares:
        assert len(node["widgets_values"]) == len(widgets) + 1 and node["widgets_values"][2] == "fixed"
    assert f"{PACK_DIR_NAME}" not in "".join(l for l in server.log_text().splitlines() if "IMPORT FAILED" in l)
    # The front-end file that shows plan summaries on the nodes is served from web/, once (not also under the
    # pyproject name: it would register twice).
    assert [e for e in server.get("/extensions") if e.endswith("/dfav2.js")] == [f"/extensions/{PACK_DIR_NAME}/dfav2.js"]
    # The plan list the dropdowns use: family, signature and calibration size per plan file.
    plans = {p["name"]: p for p in server.get("/dfav2/plans")["plans"]}
    assert set(plans) == {"flux_full.json", "flux_ac.json", "sd35m_full.json", "sd35m_ac.json"}
    assert plans["flux_ac.json"]["family"] == "flux" and plans["sd35m_ac.json"]["family"] == "sd3"
    assert plans["flux_ac.json"]["signature"] == plans["flux_full.json"]["signature"] != plans["sd35m_ac.json"]["signature"]
    # The reference-model nodes (the example that runs as-is uses them).
    for node in ("DFARefModelLoader", "DFARefTextEncode"):
        assert node in server.get(f"/object_info/{node}")
    assert server.get("/object_info/DFARefModelLoader")["DFARefModelLoader"]["output"] == ["MODEL", "VAE"]


def test_two_models_with_different_plans_in_one_prompt(server):
    """One prompt: tiny Flux with an all-full plan and patched/unpatched twins, tiny SD3.5-M with an arrow+cache plan;
    then the same graph with new seeds (the executed DFAApply outputs are reused from the execution cache)."""
    flux_ok = HS.host_support().flux_block_identity
    for seed in (0, 1):
        wf: dict = {}
        tag = f"s{seed}"
        _chain(wf, 100, loader="UNETLoader", unet="tiny_sd35m.safetensors", pooled=64, plan="sd35m_ac.json",
               enabled=True, seed=seed, prefix=f"sd_ac_{tag}")
        _chain(wf, 200, loader="UNETLoader", unet="tiny_sd35m.safetensors", pooled=64, plan="sd35m_ac.json",
               enabled=False, seed=seed, prefix=f"sd_off_{tag}")
        if flux_ok:
            _chain(wf, 300, loader="UNETLoader", unet="tiny_flux.safetensors", pooled=32, plan="flux_full.json",
                   enabled=True, seed=seed, prefix=f"flux_full_{tag}")
            _chain(wf, 400, loader="UNETLoader", unet="tiny_flux.safetensors", pooled=32, plan="flux_ac.json",
                   enabled=False, seed=seed, prefix=f"flux_off_{tag}")
        st = server.run(wf)
        assert st.get("status_str") == "success", json.dumps(st)[:2000]
        sd_ac, sd_off = _latent(server, f"sd_ac_{tag}"), _latent(server, f"sd_off_{tag}")
        assert torch.isfinite(sd_ac).all() and not torch.equal(sd_ac, sd_off)
        if flux_ok:
            assert torch.equal(_latent(server, f"flux_full_{tag}"), _latent(server, f"flux_off_{tag}"))
    log = server.log_text()
    assert "DiTFastAttnV2: 4 forwards" in log and "dense fallbacks 0" in log
    assert "DiTFastAttnV2: dense" not in log and "using the host's dense attention" not in log


def test_flux_on_an_old_host_names_the_version(server):
    if HS.host_support().flux_block_identity:
        pytest.skip(f"ComfyUI {H.host_version()} supports Flux; the version message is for hosts < {HS.MIN_HOST_FLUX}")
    wf: dict = {}
    _chain(wf, 100, loader=_flux_loader(), unet="tiny_flux.safetensors", pooled=32, plan="flux_full.json",
           enabled=True, seed=0, prefix="flux_old")
    st = server.run(wf)
    assert st.get("status_str") == "error"
    assert "0.3.75" in json.dumps(st)


def _calibrate_workflow(*, family: str, plan_name: str, delta: float, seed: int, prefix: str) -> dict:
    flux = family == "flux"
    unet, pooled = ("tiny_flux.safetensors", 32) if flux else ("tiny_sd35m.safetensors", 64)
    loader = _flux_loader() if flux else "UNETLoader"
    wf = {
        "1": {"class_type": loader, "inputs": {"unet_name": unet, **({"weight_dtype": "default"} if loader == "UNETLoader" else {})}},
        "2": {"class_type": "DFATestConditioning", "inputs": {"tokens": 32, "context_dim": 64, "pooled_dim": pooled, "seed": 1}},
        "3": {"class_type": "DFATestConditioning", "inputs": {"tokens": 32, "context_dim": 64, "pooled_dim": pooled, "seed": 2}},
        "4": {"class_type": "DFACalibrate", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "prompts": "unused\nwhen positive is connected",
            "negative_prompt": "", "width": 256, "height": 256, "steps": 4, "cfg": 1.0, "guidance": 3.5,
            "sampler_name": "euler", "scheduler": "simple", "seed": 0, "delta": delta,
            "candidates": "cache + arrow 8/16/32 (default)", "plan_name": plan_name, "overwrite": False}},
        "5": {"class_type": "DFAApply", "inputs": {"model": ["1", 0], "plan": "none", "enabled": True, "start_percent": 0.0,
                                                   "end_percent": 1.0, "dfa_plan": ["4", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": seed, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    return wf


def test_calibrate_apply_ksampler_in_one_prompt(server):
    """Calibrate -> Apply -> KSampler as one API-format prompt; the plan file lands in models/dfa_plans; re-queueing
    with a new sampler seed reuses the cached calibration; a changed calibration input with the same plan_name fails
    before calibrating and leaves the file alone."""
    from dfav2.calibration.plan import load_plan

    info = server.get("/object_info/DFACalibrate")["DFACalibrate"]
    assert info["display_name"] == "DiTFastAttnV2 Calibrate" and info["category"] == "model_patches/DiTFastAttnV2"
    assert info["output"] == ["DFA_PLAN", "STRING"]
    assert {"clip", "positive", "negative", "fp8"} == set(info["input"].get("optional", {}))
    family = "flux" if HS.host_support().flux_block_identity else "sd35m"
    name = f"srv_{family}"
    st = server.run(_calibrate_workflow(family=family, plan_name=name, delta=0.5, seed=0, prefix="cal0"))
    assert st.get("status_str") == "success", json.dumps(st)[:3000]
    path = server.base / "models" / "dfa_plans" / f"{name}.json"
    plan = load_plan(path)
    assert plan.model.family == ("flux" if family == "flux" else "sd3") and len(plan.positions) == 4
    assert torch.isfinite(_latent(server, "cal0")).all()
    before = path.read_bytes()

    st = server.run(_calibrate_workflow(family=family, plan_name=name, delta=0.5, seed=1, prefix="cal1"))
    assert st.get("status_str") == "success", json.dumps(st)[:3000]  # DFACalibrate cached: not run again
    assert _latent(server, "cal1").shape == _latent(server, "cal0").shape

    st = server.run(_calibrate_workflow(family=family, plan_name=name, delta=0.3, seed=1, prefix="cal2"))
    assert st.get("status_str") == "error" and "delta: file 0.5, now 0.3" in json.dumps(st)
    assert path.read_bytes() == before
    log = server.log_text()
    assert "DiTFastAttnV2 calibration wrote" in log or path.exists()


def test_apply_sends_each_runs_report_to_the_client(server):
    """The client that queued a prompt gets one `dfav2.report` per sampling run of an applied plan (web/dfav2.js
    shows it on the DFAApply node): the node id, the model, head shares, cache hits, FLOPs saved, dense fallbacks."""
    import asyncio

    import aiohttp

    wf: dict = {}
    _chain(wf, 100, loader="UNETLoader", unet="tiny_sd35m.safetensors", pooled=64, plan="sd35m_ac.json",
           enabled=True, seed=11, prefix="report")

    async def run() -> list[dict]:
        cid = str(uuid.uuid4())
        reports = []
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{server.url}/ws?clientId={cid}") as ws:
            async with s.post(f"{server.url}/prompt", json={"prompt": wf, "client_id": cid}) as r:
                pid = (await r.json())["prompt_id"]
            while True:
                msg = await asyncio.wait_for(ws.receive(), 120)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                d = json.loads(msg.data)
                data = d.get("data") or {}
                if d["type"] == "dfav2.report":
                    reports.append(data)
                elif d["type"] == "execution_error":
                    raise AssertionError(json.dumps(data)[:2000])
                elif data.get("prompt_id") == pid and (
                        d["type"] == "execution_success" or (d["type"] == "executing" and data.get("node") is None)):
                    return reports

    reports = asyncio.run(run())
    assert len(reports) == 1, reports
    r = reports[0]
    assert r["node"] == "104" and r["plan"] == "sd35m_ac.json" and r["family"] == "sd3"
    assert r["forwards"] == 4 and r["dense_fallbacks"] == 0 and r["fallbacks"] == {}
    assert abs(sum(r["head_shares"].values()) - 1.0) < 1e-9 and r["heads"]["cache"] > 0
    assert 0.0 < r["flops_saved"] < 1.0 and r["cache_hits"] > 0
    assert "est. attention FLOPs saved" in r["line"]


def test_calibrate_alone_and_plan_info_are_queueable_output_nodes(server):
    """A prompt with only a loader, conditioning and DFACalibrate runs (Calibrate is an output node) and returns the
    summary as its ui text; DFAPlanInfo on the written file returns the picture as a preview image plus the text."""
    family = "flux" if HS.host_support().flux_block_identity else "sd35m"
    wf = _calibrate_workflow(family=family, plan_name="alone", delta=0.5, seed=0, prefix="unused")
    wf = {k: v for k, v in wf.items() if k in ("1", "2", "3", "4")}
    st = server.run(wf)
    assert st.get("status_str") == "success", json.dumps(st)[:3000]
    text = server.last_outputs["4"]["text"]
    assert len(text) == 1 and "alone.json" in text[0] and "attention FLOPs kept" in text[0]
    assert (server.base / "models" / "dfa_plans" / "alone.json").is_file()
    st = server.run({"1": {"class_type": "DFAPlanInfo", "inputs": {"plan": "alone.json", "width": 0, "height": 0}}})
    assert st.get("status_str") == "success", json.dumps(st)[:3000]
    out = server.last_outputs["1"]
    assert "methods: full" in out["text"][0] and len(out["images"]) == 1 and out["images"][0]["type"] == "temp"
    assert (server.base / "temp" / out["images"][0]["subfolder"] / out["images"][0]["filename"]).is_file()
