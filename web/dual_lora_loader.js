// Wan Dual LoRA Loader: propose the partner file (high <-> low) and show the load report.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";
import { partnerName } from "./lora_pairing.js";

const NODE = "WanRewardDualLoraLoader";
const NONE = "None";

function comboValues(widget) {
  const values = widget.options?.values ?? [];
  return typeof values === "function" ? values() : values;
}

// When `source` changes, fill `target` with the partner file if it exists and `target`
// is empty or still holds our own earlier proposal: a file the user chose stays.
function proposePartner(source, target) {
  const callback = source.callback;
  source.callback = function (...args) {
    const result = callback?.apply(this, args);
    source.wanProposed = null; // the user set this one
    const partner = partnerName(source.value, comboValues(target));
    if (partner && (target.value === NONE || target.value === target.wanProposed)) {
      target.value = partner;
      target.wanProposed = partner;
      app.graph?.setDirtyCanvas(true, false);
    }
    return result;
  };
}

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === "load_report");
  if (!widget) {
    widget = ComfyWidgets.STRING(node, "load_report", ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.8;
    }
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "wan-reward-lora.DualLoraLoader",
  nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    const high = node.widgets?.find((w) => w.name === "lora_high");
    const low = node.widgets?.find((w) => w.name === "lora_low");
    if (!high || !low) return;
    proposePartner(high, low);
    proposePartner(low, high);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = output?.text;
      if (text) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
