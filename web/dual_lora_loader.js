// Wan Dual LoRA Loader and Step Schedule: propose the partner file (high <-> low) and show the load report.
import { app } from "../../scripts/app.js";
import { partnerName } from "./lora_pairing.js";
import { showTextOnExecuted } from "./text_view.js";

const NODES = ["WanRewardDualLoraLoader", "WanRewardDualLoraStepSchedule"];
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

app.registerExtension({
  name: "wan-reward-lora.DualLoraLoader",
  nodeCreated(node) {
    if (!NODES.includes(node.comfyClass)) return;
    const high = node.widgets?.find((w) => w.name === "lora_high");
    const low = node.widgets?.find((w) => w.name === "lora_low");
    if (!high || !low) return;
    proposePartner(high, low);
    proposePartner(low, high);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (NODES.includes(nodeData.name)) showTextOnExecuted(nodeType, "load_report", "wan-reward-load-report", 240);
  },
});
