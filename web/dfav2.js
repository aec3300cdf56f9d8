// DiTFastAttnV2 in the ComfyUI front end (public APIs only: app.registerExtension, api events/fetchApi,
// node.addDOMWidget, widget.options, app.extensionManager.toast).
//  - DFACalibrate / DFALoadPlan: the plan summary (their `text` UI output) in a read-only box that fits the text; the
//    node grows to show it in full and pushes nodes it would cover down. Kept in node.properties, so it survives a
//    reload of the workflow.
//  - DFAApply: the per-run report the server sends at the end of each sampling run ("dfav2.report": head shares,
//    cache hits, attention FLOPs saved, dense fallbacks) in the same kind of box; a toast when calls ran dense.
//  - The plan dropdowns show each plan's model family and calibration size (GET /dfav2/plans), mark plans made for
//    another model than the one of the last run, say when a wired dfa_plan input wins over the dropdown, flag
//    missing plan files, and refresh after a calibration (no need to press `r`).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXT = "dfav2.ui";
const PLAN_NODES = new Set(["DFAApply", "DFALoadPlan", "DFAPlanInfo", "DFACompare"]); // nodes with a plan dropdown
const SUMMARY_NODES = new Set(["DFACalibrate", "DFALoadPlan", "DFAPlanInfo", "DFACompare"]); // `text` UI output
const IMAGE_ROOM = 360; // height kept free under the widgets of nodes that also preview images (plan picture, A/B)
const TEXT_WIDGET = "dfav2_text";
const PROP_TEXT = "dfav2_text"; // node.properties: the last summary / report (saved with the workflow)
const PROP_MODEL = "dfav2_model"; // node.properties of DFAApply: {family, signature, model} of the last run
const NO_PLAN = "none";

let plans = new Map(); // file name -> {family, signature, model, width, height, delta, steps} or {error}
let plansLoaded = false; // until the first successful GET /dfav2/plans the dropdowns keep the server's entries

function toast(severity, detail, life = 8000) {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary: "DiTFastAttnV2", detail, life });
}

function graphNodes() {
  return app.graph?.nodes ?? [];
}

// ------------------------------------------------------------------------------------------- text box

const BOX_STYLE = {
  font: "12px monospace",
  lineHeight: "16px",
  whiteSpace: "pre-wrap",
  overflowWrap: "anywhere",
  padding: "6px 8px",
  boxSizing: "border-box",
};

function textHeight(text, width) {
  // Height of `text` wrapped at `width` px, measured in an off-screen element of the same style.
  const probe = document.createElement("div");
  Object.assign(probe.style, BOX_STYLE, { position: "absolute", visibility: "hidden", left: "-10000px", top: "0",
    width: `${Math.max(width, 100)}px` });
  probe.textContent = text || " ";
  document.body.appendChild(probe);
  const h = probe.offsetHeight;
  probe.remove();
  return h;
}

function overlaps(a, b) {
  return a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3];
}

function growAndMakeRoom(node, size) {
  // Resize `node`; nodes that the grown node would newly cover are moved down below it.
  const before = [...node.getBounding()];
  node.setSize(size);
  const after = node.getBounding();
  const gap = 20;
  for (const other of graphNodes()) {
    if (other === node) continue;
    const b = other.getBounding();
    if (overlaps(after, b) && !overlaps(before, b) && b[1] >= before[1]) {
      const dy = after[1] + after[3] + gap - b[1];
      other.pos = [other.pos[0], other.pos[1] + dy];
    }
  }
}

function persist(change) {
  // Record a change of the workflow (node.properties) so the front end saves it: undo history and the draft kept
  // across a reload are updated on litegraph's before/after-change pair.
  const canvas = app.canvas;
  canvas?.emitBeforeChange?.();
  try {
    change();
  } finally {
    canvas?.emitAfterChange?.();
  }
}

function showText(node, text, { save = true } = {}) {
  node.properties = node.properties ?? {};
  if (save && node.properties[PROP_TEXT] !== text) persist(() => { node.properties[PROP_TEXT] = text; });
  else node.properties[PROP_TEXT] = text;
  let widget = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (!widget) {
    const box = document.createElement("div");
    box.className = "dfav2-text";
    Object.assign(box.style, BOX_STYLE, {
      color: "var(--input-text, #ddd)",
      background: "var(--comfy-input-bg, #222)",
      borderRadius: "6px",
      overflow: "hidden",
      userSelect: "text",
    });
    box.title = "DiTFastAttnV2: read-only; kept with the workflow. Select to copy.";
    widget = node.addDOMWidget(TEXT_WIDGET, "dfav2_text", box, {
      serialize: false, // display only: the text lives in node.properties
      getValue: () => box.textContent,
      setValue: (v) => { box.textContent = v ?? ""; },
      getMinHeight: () => widget?._dfav2Height ?? 40,
      getMaxHeight: () => widget?._dfav2Height ?? 40,
      hideOnZoom: false,
    });
  }
  widget.element.textContent = text;
  const width = Math.max(node.size[0], 420);
  const margin = widget.margin ?? 10; // the box is drawn inside the widget's margins
  widget._dfav2Height = textHeight(text, width - 2 * margin) + 2 * margin + 2;
  const min = node.computeSize();
  const room = node.imgs?.length || node.type === "DFAPlanInfo" || node.type === "DFACompare" ? IMAGE_ROOM : 0;
  growAndMakeRoom(node, [width, Math.max(node.size[1], min[1] + room)]);
  app.graph?.setDirtyCanvas(true, true);
}

// -------------------------------------------------------------------------------------------- plans

function describePlan(info) {
  if (!info) return null;
  if (info.error) return "not a valid plan";
  const size = info.width && info.height ? ` ${info.width}×${info.height}` : "";
  const delta = info.delta != null ? ` δ${info.delta}` : "";
  return `${info.family}${size}, ${info.steps} steps${delta}`;
}

function planWidget(node) {
  return node.widgets?.find((w) => w.name === "plan");
}

function wiredPlan(node) {
  const input = node.inputs?.find((i) => i.name === "dfa_plan");
  return input?.link != null;
}

function optionLabel(node, value) {
  if (value == null) return "";
  if (node.type !== "DFALoadPlan" && wiredPlan(node)) {
    return value === NO_PLAN ? "← the wired dfa_plan input is used" : `${value} (ignored: the wired dfa_plan input wins)`;
  }
  if (value === NO_PLAN) return node.type === "DFALoadPlan" ? "none" : "none: pick a plan or wire dfa_plan";
  const info = plans.get(value);
  if (!info) return plansLoaded ? `⚠ missing: ${value}` : value;
  const model = node.properties?.[PROP_MODEL];
  let mark = "";
  if (model && !info.error) {
    if (info.family !== model.family) mark = `✗ other family (model is ${model.family}) `;
    else if (info.signature !== model.signature) mark = "✗ other model ";
    else mark = "✓ ";
  }
  return `${mark}${value} · ${describePlan(info)}`;
}

function decoratePlanWidget(node) {
  const w = planWidget(node);
  if (!w || w._dfav2) return;
  w._dfav2 = true;
  w.options = w.options ?? {};
  w.options.getOptionLabel = (value) => optionLabel(node, value);
}

function sortedNames(node) {
  // Plans that fit the model of the last run first, then the rest; `none` last.
  const model = node.properties?.[PROP_MODEL];
  const names = [...plans.keys()].sort();
  const fits = (n) => model && plans.get(n)?.signature === model.signature;
  return [...names.filter(fits), ...names.filter((n) => !fits(n)), NO_PLAN];
}

function updatePlanValues(node) {
  const w = planWidget(node);
  if (!w) return;
  decoratePlanWidget(node);
  if (plansLoaded) w.options.values = sortedNames(node);
}

async function refreshPlans() {
  try {
    const r = await api.fetchApi("/dfav2/plans");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const data = await r.json();
    plans = new Map((data.plans ?? []).map((p) => [p.name, p]));
    plansLoaded = true;
  } catch (e) {
    console.warn("DiTFastAttnV2: could not read the plan list (/dfav2/plans); the dropdowns keep their entries.", e);
    return;
  }
  for (const node of graphNodes()) if (PLAN_NODES.has(node.type)) updatePlanValues(node);
  app.graph?.setDirtyCanvas(true, true);
}

function checkMissingPlans() {
  // After a workflow is opened: say which selected plan files are not there.
  if (!plansLoaded) return;
  const missing = [];
  for (const node of graphNodes()) {
    if (!PLAN_NODES.has(node.type)) continue;
    const v = planWidget(node)?.value;
    if (v && v !== NO_PLAN && !plans.has(v) && !wiredPlan(node)) missing.push(v);
  }
  if (missing.length) {
    toast("warn", `Plan file(s) not found in models/dfa_plans: ${[...new Set(missing)].join(", ")}. Queue the workflow ` +
      "with DFACalibrate that writes it (same plan_name), or pick another plan in the dropdown.", 15000);
  }
}

// ------------------------------------------------------------------------------------------- report

function formatReport(d) {
  const shares = Object.entries(d.head_shares ?? {})
    .filter(([, v]) => v > 0)
    .map(([k, v]) => `${k} ${(100 * v).toFixed(0)}%`)
    .join(" / ");
  const fb = d.dense_fallbacks
    ? `${d.dense_fallbacks} (${Object.entries(d.fallbacks).map(([k, v]) => `${k}: ${v}`).join(", ")})`
    : "0";
  return [
    `last run: ${d.plan === "connected plan" ? "the wired dfa_plan" : `plan ${d.plan}`}`,
    `model: ${d.model}`,
    `${d.forwards} forwards, ${d.attention_calls} attention calls`,
    `heads: ${shares || "none routed"}`,
    `cache hits ${d.cache_hits}, misses ${d.cache_misses}`,
    `est. attention FLOPs saved: ${(100 * d.flops_saved).toFixed(1)}%`,
    `dense fallbacks: ${fb}`,
  ].join("\n");
}

function findNode(id) {
  if (id == null) return null;
  const direct = app.graph?.getNodeById(id) ?? app.graph?.getNodeById(Number(id));
  if (direct) return direct;
  const last = String(id).split(":").pop(); // a node inside a subgraph: "parent:child"
  const g = app.canvas?.graph ?? app.graph;
  return g?.getNodeById(last) ?? g?.getNodeById(Number(last)) ?? null;
}

function onReport(event) {
  const d = event.detail ?? {};
  const node = findNode(d.node);
  if (node) {
    node.properties = node.properties ?? {};
    node.properties[PROP_MODEL] = { family: d.family, signature: d.signature, model: d.model };
    showText(node, formatReport(d)); // saves both properties
    updatePlanValues(node);
  }
  if (d.dense_fallbacks) {
    toast("warn", `${d.dense_fallbacks} attention calls ran the host's dense attention ` +
      `(${Object.keys(d.fallbacks).join(", ")}): they were not compressed. The server log says why, once per run.`);
  }
}

// ----------------------------------------------------------------------------------------- extension

app.registerExtension({
  name: EXT,
  async setup() {
    api.addEventListener("dfav2.report", onReport);
    await refreshPlans();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData.name;
    if (!SUMMARY_NODES.has(name) && !PLAN_NODES.has(name)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (PLAN_NODES.has(name)) updatePlanValues(this);
      return r;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      const text = this.properties?.[PROP_TEXT];
      if (text) requestAnimationFrame(() => showText(this, text, { save: false })); // after the saved size is applied
      if (PLAN_NODES.has(name)) updatePlanValues(this);
      return r;
    };

    if (SUMMARY_NODES.has(name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const text = (message?.text ?? []).join("\n");
        if (text) showText(this, text);
        if (name === "DFACalibrate") refreshPlans(); // the new plan file appears in every plan dropdown
      };
    }

    if (PLAN_NODES.has(name)) {
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        const r = onConnectionsChange?.apply(this, arguments);
        this.setDirtyCanvas?.(true, true); // the dropdown label says whether the wired plan wins
        return r;
      };
    }
  },
  async afterConfigureGraph() {
    await refreshPlans();
    checkMissingPlans();
  },
});
