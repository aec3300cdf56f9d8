// Shows the plan summary (attention FLOPs kept, method shares) on DFACalibrate and DFALoadPlan after they run.
// The nodes send it as the standard `text` UI output; this only renders it in a read-only text box.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set(["DFACalibrate", "DFALoadPlan"]);
const WIDGET = "dfav2_summary";

app.registerExtension({
  name: "dfav2.summary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // display only: never saved into the workflow
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = text;
      this.setSize?.([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
      app.graph?.setDirtyCanvas(true, false);
    };
  },
});
