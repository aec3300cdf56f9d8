"""The pack in a real ComfyUI front end (headless Chromium, Playwright): web/dfav2.js registers once, the templates
list shows the examples with thumbnails, every example loads with known nodes, chained plan names and no overlapping
nodes, the reference-model example runs as-is and shows the plan summary, the plan picture, the A/B images and numbers
and Apply's per-run report (in full, kept after a reload), and a Calibrate -> Apply -> KSampler graph built in the UI
runs, refreshes the plan dropdowns and marks plans of another model family. No console errors from the pack. See
conftest.py for what is needed."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

PACK = "ComfyUI-DFAv2"
EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
REFERENCE = "Reference model - try it as-is"
REF_PLAN = "dfa_ref_sd35m_512.json"
PLAN_NODES = ("DFAApply", "DFALoadPlan", "DFAPlanInfo", "DFACompare")  # nodes with a plan dropdown

# Boxes of all nodes (getBounding: title included), pairs that overlap, and nodes smaller than their content.
LAYOUT_JS = """() => {
  const nodes = app.graph.nodes;
  const box = (n) => Array.from(n.getBounding());
  const hit = (a, b) => a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3];
  const overlaps = [];
  for (let i = 0; i < nodes.length; i++)
    for (let j = i + 1; j < nodes.length; j++)
      if (hit(box(nodes[i]), box(nodes[j]))) overlaps.push(`${nodes[i].title} / ${nodes[j].title}`);
  const cramped = nodes.filter((n) => {
    const min = n.computeSize();
    return n.size[0] + 0.5 < min[0] || n.size[1] + 0.5 < min[1];
  }).map((n) => `${n.title}: ${Array.from(n.size)} < ${Array.from(n.computeSize())}`);
  const unknown = nodes.filter((n) => n.type !== 'Note' && !(n.type in LiteGraph.registered_node_types)).map((n) => n.type);
  const unlinked = [];
  for (const n of nodes)
    for (const inp of n.inputs ?? [])
      if (inp.link == null && !inp.widget && !['clip', 'positive', 'negative', 'dfa_plan'].includes(inp.name))
        unlinked.push(`${n.title}.${inp.name}`);
  return { overlaps, cramped, unknown, unlinked, count: nodes.length };
}"""

# The DiTFastAttnV2 text box of a node: its text and whether it shows all of it.
TEXT_JS = """(type) => app.graph.nodes.filter((n) => n.type === type).map((n) => {
  const w = (n.widgets ?? []).find((w) => w.name === 'dfav2_text');
  const el = w?.element;
  return { id: n.id, text: el?.textContent ?? null, prop: n.properties?.dfav2_text ?? null,
           overflow: el ? el.scrollHeight - el.clientHeight : null, visible: el ? el.offsetParent !== null : null,
           box: Array.from(n.getBounding()) };
})"""


def _template_names(server) -> list[str]:
    return sorted(server.get("/api/workflow_templates").get(PACK, []))


def _widgets(wf: dict, node_type: str) -> list[list]:
    return [n["widgets_values"] for n in wf["nodes"] if n["type"] == node_type]


def test_examples_chain_by_plan_name():
    """Every plan an example loads from the dropdown is written by an example's DFACalibrate (same plan_name)."""
    written, loaded = set(), {}
    for f in sorted(EXAMPLES.glob("*.json")):
        wf = json.loads(f.read_text())
        written |= {w[12] + ".json" for w in _widgets(wf, "DFACalibrate")}
        for t in PLAN_NODES:
            for w in _widgets(wf, t):
                if w[0] != "none":
                    loaded[f.stem] = w[0]
        for w in _widgets(wf, "DFACalibrate"):
            assert w[10] == 0.1, f"{f.name}: DFACalibrate delta {w[10]} is not the default 0.1"
        assert (EXAMPLES / f"{f.stem}.jpg").is_file(), f"{f.name}: no thumbnail {f.stem}.jpg for the templates list"
    assert loaded, "no example loads a plan file"
    for example, plan in loaded.items():
        assert plan in written, f"{example} loads {plan}, which no example's DFACalibrate writes ({sorted(written)})"


def test_front_end_registers_once_and_lists_the_examples(ui, server):
    exts = ui.js("() => app.extensions.map((e) => e.name).filter((n) => n.startsWith('dfav2'))")
    assert exts == ["dfav2.ui"]
    served = [e for e in server.get("/extensions") if e.endswith("/dfav2.js")]
    assert served == [f"/extensions/{PACK}/dfav2.js"], served
    names = _template_names(server)
    assert len(names) == len(list(EXAMPLES.glob("*.json"))) and REFERENCE in names

    thumbs: list[str] = []
    ui.page.on("response", lambda r: r.ok and f"/workflow_templates/{PACK}/" in r.url and r.url.endswith(".jpg")
               and thumbs.append(r.url))
    ui.page.get_by_text("Templates", exact=True).first.click()
    ui.page.get_by_text(PACK, exact=True).first.click()
    # Each card shows its thumbnail (fetched from the pack's example_workflows, shown as a blob; ours are 480 px).
    ui.page.wait_for_function(
        """(n) => Array.from(document.querySelectorAll('img')).filter((i) => i.complete && i.naturalWidth === 480).length >= n""",
        arg=len(names), timeout=30_000)
    time.sleep(1.0)
    ui.shot("templates")
    assert len(set(thumbs)) == len(names), thumbs
    cards = ui.js("() => document.body.innerText")
    for name in names:  # the whole title is shown (the file name is the title)
        assert name in cards, f"template {name!r} has no card with its full title"
    ui.page.keyboard.press("Escape")
    assert not ui.pack_errors(), ui.pack_errors()


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.json")))
def test_example_loads_without_overlap(ui, name):
    ui.load_template(name)
    lay = ui.js(LAYOUT_JS)
    assert lay["count"] > 3
    assert not lay["unknown"], f"unknown node types {lay['unknown']}"
    assert not lay["overlaps"], f"overlapping nodes: {lay['overlaps']}"
    assert not lay["cramped"], f"nodes smaller than their content: {lay['cramped']}"
    assert not lay["unlinked"], f"inputs without a link: {lay['unlinked']}"
    ui.fit()
    ui.shot("example_" + name.replace(" ", "_"))
    wf = json.loads((EXAMPLES / f"{name}.json").read_text())
    if any(w[0] != "none" for t in PLAN_NODES for w in _widgets(wf, t)):
        # The plan this example loads is not there yet: the user is told what to do.
        ui.page.get_by_text("not found in models/dfa_plans").first.wait_for(timeout=10_000)
        ui.shot("example_" + name.replace(" ", "_") + "_missing_plan")
    assert not ui.pack_errors(), ui.pack_errors()


def test_reference_example_runs_as_is(ui, server):
    """The reference-model example, queued unchanged: plan summary on DFACalibrate (in full, no overlap), Apply's
    report, both previews; the summary survives a reload; the new plan is in the dropdowns without pressing r."""
    ui.load_template(REFERENCE)
    ui.queue()
    last = ui.wait_done(timeout=1200)
    assert last["status"]["status_str"] == "success", json.dumps(last["status"])[:3000]
    # The plan picture, the A/B images (uncompressed, compressed, difference) and the saved image are on the nodes.
    ui.page.wait_for_function("""() => {
        const imgs = (t) => app.graph.nodes.find((n) => n.type === t)?.imgs?.length ?? 0;
        return imgs('DFAPlanInfo') === 1 && imgs('DFACompare') === 3 && imgs('SaveImage') === 1;
    }""", timeout=60_000)
    pic = ui.js("""() => { const i = app.graph.nodes.find((n) => n.type === 'DFAPlanInfo').imgs[0];
                           return [i.naturalWidth, i.naturalHeight]; }""")
    assert pic[0] >= 200 and pic[1] >= 100, f"plan picture {pic}"
    info = ui.js(TEXT_JS, "DFAPlanInfo")[0]
    assert info["text"] and "methods: full" in info["text"] and info["overflow"] <= 1, info
    ab = ui.js(TEXT_JS, "DFACompare")[0]
    assert ab["text"] and ab["overflow"] <= 1, ab
    assert re.search(r"PSNR \d+\.\d+ dB, SSIM 0\.\d{4}", ab["text"]), ab["text"]
    assert re.search(r"time: uncompressed \d+\.\d+ s, compressed \d+\.\d+ s, speed-up \d+\.\d+x", ab["text"]), ab["text"]
    cal = ui.js(TEXT_JS, "DFACalibrate")[0]
    assert cal["text"] and "methods:" in cal["text"] and "estimated attention speed-up" in cal["text"], cal
    assert REF_PLAN in cal["text"]
    assert cal["overflow"] <= 1, f"the summary does not fit its box ({cal['overflow']} px hidden)"
    rep = ui.js(TEXT_JS, "DFAApply")[0]
    assert rep["text"] and "est. attention FLOPs saved" in rep["text"] and "dense fallbacks: 0" in rep["text"], rep
    assert "heads: full" in rep["text"] and rep["overflow"] <= 1
    lay = ui.js(LAYOUT_JS)
    assert not lay["overlaps"], f"overlapping nodes after the run: {lay['overlaps']}"
    ui.fit()
    ui.shot("reference_run")

    # The dropdowns know the new plan without `r`; a new Apply node starts at 'none', not at some other plan.
    new = ui.js("""(plan) => {
        const n = LiteGraph.createNode('DFAApply'); app.graph.add(n);
        const w = n.widgets.find((w) => w.name === 'plan');
        const r = { value: w.value, values: [...w.options.values], label: w.options.getOptionLabel?.(plan) };
        app.graph.remove(n);
        return r;
    }""", REF_PLAN)
    assert new["value"] == "none" and REF_PLAN in new["values"], new
    assert "sd3" in new["label"] and "512×512" in new["label"], new

    # Reload: the workflow comes back with both texts.
    ui.page.reload()
    ui.wait_ready()
    time.sleep(1.5)
    cal2 = ui.js(TEXT_JS, "DFACalibrate")
    assert cal2 and cal2[0]["text"] == cal["text"], "the Calibrate summary did not survive a reload"
    assert cal2[0]["overflow"] <= 1
    rep2 = ui.js(TEXT_JS, "DFAApply")
    assert rep2 and rep2[0]["text"] == rep["text"], "Apply's report did not survive a reload"
    ab2 = ui.js(TEXT_JS, "DFACompare")
    assert ab2 and ab2[0]["text"] == ab["text"], "the A/B report did not survive a reload"
    ui.fit()
    ui.shot("reference_after_reload")
    assert not ui.pack_errors(), ui.pack_errors()


BUILD_JS = """(o) => {
  app.graph.clear();
  const add = (type, pos, values = {}) => {
    const n = LiteGraph.createNode(type);
    n.pos = pos;
    app.graph.add(n);
    for (const [k, v] of Object.entries(values)) {
      const w = n.widgets.find((w) => w.name === k);
      if (!w) throw new Error(`${type} has no widget ${k}`);
      w.value = v;
    }
    return n;
  };
  const link = (a, ai, b, bname) => a.connect(ai, b, b.inputs.findIndex((i) => i.name === bname));
  const model = add('DFARefModelLoader', [0, 0], { model: 'sd35m' });
  const caps = add('DFARefTextEncode', [0, 150], { captions: o.captions });
  const neg = add('DFARefTextEncode', [0, 400], { captions: '' });
  const cal = add('DFACalibrate', [450, 0], { width: o.res, height: o.res, steps: o.steps, cfg: 4.0, seed: 0,
                                              delta: o.delta, plan_name: o.plan_name });
  const apply = add('DFAApply', [950, 0]);
  const lat = add('EmptySD3LatentImage', [950, 600], { width: o.res, height: o.res });  // below Apply's advanced widgets and report
  const ks = add('KSampler', [1400, 0], { steps: o.steps, cfg: 4.0, seed: 3, control_after_generate: 'fixed' });
  const dec = add('VAEDecode', [1400, 400]);
  const prev = add('PreviewImage', [1750, 0]);
  link(model, 0, cal, 'model'); link(caps, 0, cal, 'positive'); link(neg, 0, cal, 'negative');
  link(model, 0, apply, 'model'); link(cal, 0, apply, 'dfa_plan');
  link(apply, 0, ks, 'model'); link(caps, 0, ks, 'positive'); link(neg, 0, ks, 'negative');
  link(lat, 0, ks, 'latent_image'); link(model, 1, dec, 'vae'); link(ks, 0, dec, 'samples');
  link(dec, 0, prev, 'images');
  return { apply: apply.id, cal: cal.id };
}"""


def test_built_calibrate_apply_ksampler_graph(ui, server):
    """Calibrate -> Apply -> KSampler built node by node in the UI on the small reference model (256 px, 4 steps):
    summary and report appear; the plan dropdown then marks plans by model family and says when a wired plan wins."""
    ids = ui.js(BUILD_JS, {"captions": "a large red circle in the center, on a plain blue background\n"
                                       "two small green squares at the top left, on a striped gray background",
                           "res": 256, "steps": 6, "delta": 0.4, "plan_name": "browser_sd35m_256"})
    ui.fit()
    ui.queue()
    last = ui.wait_done(timeout=900)
    assert last["status"]["status_str"] == "success", json.dumps(last["status"])[:3000]
    cal = ui.js(TEXT_JS, "DFACalibrate")[0]
    assert cal["text"] and "browser_sd35m_256.json" in cal["text"] and cal["overflow"] <= 1, cal
    rep = ui.js(TEXT_JS, "DFAApply")[0]
    assert rep["text"] and "6 forwards" in rep["text"] and "dense fallbacks: 0" in rep["text"], rep
    assert "the wired dfa_plan" in rep["text"] and "cache" in rep["text"], rep  # delta 0.4: a mixed plan
    assert not ui.js(LAYOUT_JS)["overlaps"]
    ui.fit()
    ui.shot("built_graph_run")

    labels = ui.js("""(id) => {
        const n = app.graph.getNodeById(id);
        const w = n.widgets.find((w) => w.name === 'plan');
        const wired = { none: w.options.getOptionLabel('none'), values: [...w.options.values] };
        n.disconnectInput(n.inputs.findIndex((i) => i.name === 'dfa_plan'));
        return { wired, values: [...w.options.values], mine: w.options.getOptionLabel('browser_sd35m_256.json'),
                 other: w.options.getOptionLabel('other_family_flux.json'),
                 missing: w.options.getOptionLabel('gone.json') };
    }""", ids["apply"])
    assert "wired dfa_plan input is used" in labels["wired"]["none"], labels
    assert "browser_sd35m_256.json" in labels["wired"]["values"], "the plan list was not refreshed after calibrating"
    assert labels["values"][0] == "browser_sd35m_256.json" or labels["values"][0].startswith("browser_"), labels
    assert labels["mine"].startswith("✓") and "sd3 256×256" in labels["mine"], labels
    assert "other family" in labels["other"] and "flux" in labels["other"], labels
    assert "missing" in labels["missing"], labels
    # Open the dropdown as a user would: a click on the plan widget; the menu shows the marks.
    xy = ui.js("""(id) => {
        const n = app.graph.getNodeById(id);
        const w = n.widgets.find((w) => w.name === 'plan');
        const p = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] * 0.6, n.pos[1] + (w.last_y ?? w.y) + 10]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.left + p[0], r.top + p[1]];
    }""", ids["apply"])
    ui.page.mouse.click(*xy)
    ui.page.wait_for_selector(".litecontextmenu", timeout=10_000)
    menu = ui.page.inner_text(".litecontextmenu")
    assert "✓ browser_sd35m_256.json" in menu and "✗ other family (model is sd3) other_family_flux.json" in menu, menu
    ui.shot("built_graph_plan_marks")
    ui.page.keyboard.press("Escape")
    assert not ui.pack_errors(), ui.pack_errors()
